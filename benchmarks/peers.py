"""Peers run on the same workload in the same run, when installed: the ratio is what counts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Peer:
    """A system to compare with: `run(workload, flows)` returns a result row."""

    name: str
    run: Callable[[str, int], Awaitable[dict[str, Any]]]


def available(wanted: list[str]) -> list[Peer]:
    """The peers asked for (all known ones if none named) that are installed."""
    return []
