"""What the gRPC services share: request deserialization that turns undecodable input into INVALID_ARGUMENT
naming the field, and one engine request's events as an async stream that aborts the request if its reader goes
away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import DecodeError

from .engine import Engine, EngineUnavailable, QueueFull
from .outputs import Event, Finished
from .request import InvalidRequest, Request


def _invalid_utf8_field(data: bytes, desc: pb_descriptor.Descriptor, prefix: str = "") -> str | None:
    """Walks the wire format to name the first string field holding invalid UTF-8 (protobuf only says 'error')."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
            field = desc.fields_by_number.get(number)
            if field is None:
                continue
            name = prefix + field.name
            if field.type == pb_descriptor.FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
                found = _invalid_utf8_field(payload, field.message_type, name + ".")
                if found:
                    return found
        else:
            return None
    return None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise DecodeError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


class Malformed:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that turns undecodable input into INVALID_ARGUMENT instead of INTERNAL."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            try:
                field = _invalid_utf8_field(data, message_type.DESCRIPTOR)
            except (DecodeError, IndexError):
                field = None
            if field:
                return Malformed(f"{field}: not valid UTF-8")
            return Malformed(f"the request is not a valid {message_type.DESCRIPTOR.name}: {exc}")

    return parse


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def unary(fn: Any, request_type: Any) -> grpc.RpcMethodHandler:
    """A unary method whose undecodable requests reach `fn` as Malformed."""
    return grpc.unary_unary_rpc_method_handler(fn, lenient(request_type), _serialize)


def server_stream(fn: Any, request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(fn, lenient(request_type), _serialize)


def bidi_stream(fn: Any, request_type: Any) -> grpc.RpcMethodHandler:
    return grpc.stream_stream_rpc_method_handler(fn, lenient(request_type), _serialize)


def malformed(request: Any) -> str | None:
    """Why `request` could not be decoded (its handler answers INVALID_ARGUMENT with this), or None."""
    return request.reason if isinstance(request, Malformed) else None


class RequestFailed(Exception):
    """A request the engine would not take (or failed): the status code and message its caller should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_events(engine: Engine, req: Request) -> AsyncGenerator[list[Event]]:
    """Submits `req` now (raises RequestFailed when the engine refuses it) and returns its events in batches (a
    slow reader gets the backlog in one batch); the last batch ends with the request's Finished. A reader that
    stops early (close the generator, e.g. with contextlib.aclosing) aborts the request, which frees its KV
    blocks at once; one that never starts reading must abort it itself."""
    queue: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def sink(event: Event) -> None:
        # RuntimeError: the server's loop has closed (shutdown) and nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, event)

    try:
        engine.submit(req, sink)
    except InvalidRequest as exc:
        raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
    except QueueFull as exc:
        raise RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
    except EngineUnavailable as exc:
        raise RequestFailed(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
    return _events(engine, req, queue)


async def _events(engine: Engine, req: Request, queue: asyncio.Queue[Event]) -> AsyncGenerator[list[Event]]:
    finished = False
    try:
        while not finished:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            finished = isinstance(events[-1], Finished)
            yield events
    finally:
        if not finished:
            engine.abort([req.id])


async def request_events(engine: Engine, req: Request) -> AsyncGenerator[list[Event]]:
    """Submits `req` when first read and yields its events (open_events); raises RequestFailed when the engine
    refuses it. A reader that stops early (client cancel, deadline, a failed write: close this generator, e.g.
    with contextlib.aclosing) aborts the request, which frees its KV blocks at once."""
    events = open_events(engine, req)
    async with contextlib.aclosing(events):
        async for batch in events:
            yield batch
