"""Scheduling policies: the decisions the engine's step scheduler delegates.

A policy answers three questions, each in the engine's units (KV blocks, engine steps):
which waiting request to try next, whether a candidate may join the running set, and, when memory really runs
out, which running request to preempt. FCFS is the vLLM-like baseline; A_min and its peers plug in here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..request import Request


class Policy(ABC):
    name: str

    @abstractmethod
    def order_waiting(self, waiting: Sequence[Request]) -> list[Request]:
        """The order in which waiting requests are considered for admission."""

    @abstractmethod
    def admissible(self, candidate: Request, running: Sequence[Request], free_blocks: int, block_size: int) -> bool:
        """Whether `candidate` may join `running`, given blocks free before its own allocation."""

    @abstractmethod
    def victim(self, running: Sequence[Request]) -> Request:
        """The running request to preempt when the cache cannot hold the next step."""


class FCFS(Policy):
    """Arrival order; admits while the request's current tokens fit (no look-ahead); preempts the newest."""

    name = "fcfs"

    def order_waiting(self, waiting: Sequence[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: r.seq)

    def admissible(self, candidate: Request, running: Sequence[Request], free_blocks: int, block_size: int) -> bool:
        need = -(-(candidate.num_tokens + 1) // block_size) - len(candidate.block_table)
        return need <= free_blocks

    def victim(self, running: Sequence[Request]) -> Request:
        return max(running, key=lambda r: r.admitted_seq)


POLICIES: dict[str, type[Policy]] = {"fcfs": FCFS}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r} (choose from {', '.join(sorted(POLICIES))})") from None
