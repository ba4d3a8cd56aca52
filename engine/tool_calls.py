"""Tool calling for the OpenAI-compatible API, through structured outputs.

A chat request's `tools` (OpenAI's function tools: a name, a description, a JSON Schema of parameters) reach the
model's chat template, which shows them to the model in its own format where it has one. With `tool_choice`
"required" the answer is constrained to a JSON list of calls, `[{"name": one of the tools, "parameters": that
tool's schema}, ...]` (one call when `parallel_tool_calls` is false); with a named function, to that function's
parameters. Either way every call the client gets back is valid JSON of its function's schema, whatever the model.
`tool_choice` "auto" (the default when tools are given) needs a parser for each model family's own tool-call
markup, which this server does not have, and is refused by name; "none" answers in text. Assistant messages'
`tool_calls` and `tool` messages of earlier turns go to the template as Hugging Face templates expect them.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .request import InvalidRequest, StructuredOutput

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Tools:
    specs: list[dict[str, Any]]  # OpenAI's tool objects, as the chat template receives them
    mode: str  # "none", "required" or "named"
    name: str | None = None  # the named function
    parallel: bool = True  # required: several calls allowed

    def _parameters(self, name: str) -> Any:
        spec = next(t["function"] for t in self.specs if t["function"]["name"] == name)
        return spec.get("parameters") or {"type": "object"}

    @property
    def param(self) -> str:
        """The field a constraint's schema came from (where a schema that does not compile is reported)."""
        if self.mode == "named":
            index = next(i for i, t in enumerate(self.specs) if t["function"]["name"] == self.name)
            return f"tools[{index}].function.parameters"
        return "tools"

    def constraint(self) -> StructuredOutput | None:
        """What the answer is constrained to (None: free text)."""
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutput("json_schema", json.dumps(self._parameters(self.name)))
        if self.mode == "required":
            names = [t["function"]["name"] for t in self.specs]
            calls = [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": self._parameters(name)},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name in names
            ]
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            if not self.parallel:
                schema["maxItems"] = 1
            return StructuredOutput("json_schema", json.dumps(schema))
        return None

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI's tool_calls from a complete constrained answer (None when it does not parse: cut short)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.mode == "named":
            assert self.name is not None
            pairs = [(self.name, value)]
        else:
            pairs = [(item["name"], item["parameters"]) for item in value]
        return [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
            for name, args in pairs
        ]


def read_tools(body: dict[str, Any]) -> Tools | None:
    """The request's tools and tool_choice, checked; raises InvalidRequest naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls", "must be true or false")
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("tools", "must be a list of function tools")
    specs, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequest(where, 'must be {"type": "function", "function": {...}}')
        fn = tool["function"]
        unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise InvalidRequest(
                f"{where}.function.{unknown[0]}", "unknown; takes name, description, parameters, strict"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequest(f"{where}.function.name", "must be 1-64 letters, digits, _ or -")
        if name in names:
            raise InvalidRequest(f"{where}.function.name", f"{name!r} is already a tool")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise InvalidRequest(f"{where}.function.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise InvalidRequest(f"{where}.function.parameters", "must be a JSON Schema object")
        specs.append({"type": "function", "function": fn})
    if choice in (None, "auto"):
        raise InvalidRequest(
            "tool_choice",
            '"auto" (the default with tools) needs a parser for the model\'s own tool-call markup, which this server '
            'does not have: send "required", a named function ({"type": "function", "function": {"name": ...}}) '
            'or "none"',
        )
    if choice == "none":
        return Tools(specs, "none")
    if choice == "required":
        return Tools(specs, "required", parallel=parallel is not False)
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(
            "tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": {"name"}}'
        )
    if fn["name"] not in names:
        raise InvalidRequest("tool_choice.function.name", f"{fn['name']!r} is not among the tools")
    return Tools(specs, "named", name=fn["name"])


def message_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's tool_calls, for the chat template: arguments decoded from JSON where they are."""
    if not isinstance(value, list):
        raise InvalidRequest(where, "must be a list of tool calls")
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise InvalidRequest(
                f"{where}[{j}]", 'must be {"id", "type": "function", "function": {"name", "arguments"}}'
            )
        try:
            arguments: Any = json.loads(fn["arguments"])
        except ValueError:
            arguments = fn["arguments"]
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out
