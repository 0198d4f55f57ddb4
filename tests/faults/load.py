"""A mixed load (steps, timers, signals) and the exact checks made on it after faults.

`MixedLoad` schedules flows of three kinds from the worker app and sends each `Signalled`
flow its two signals at random moments (while servers die, the client retries with the same
request id); it can also run flows with `Client.run`, each call waiting for its own outcome (a
call a kill cuts is retried with the same request id and must find its flow, not make another).
`FaultPoint`s are taken at every fault: what the store had recorded and what the workers had
run at that instant. `verify` then asserts what the guarantees promise:

- every flow scheduled (acknowledged) exists once and COMPLETED with its own right result;
- each journal key once, steps with attempts 1, timers and both signals present, in order;
- no timer fired early (recorded >= created + its duration);
- each signal stored once and consumed once, FIFO (the result is `a+b`, never `b+a`);
- a step recorded at a fault point never ran again afterwards; a step ran more than once only
  if, at some fault point, it had started and its result was not recorded.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ergon_worker_sdk import Client, FlowStatus
from tests.support.processes import read_events
from tests.support.store_check import Snapshot, check_consistency, snapshot
from tests.support.worker_app import Signalled, Sleeper, ThreeSteps


@dataclass
class FaultPoint:
    """The store and the events file at the moment of a fault."""

    what: str
    snap: Snapshot
    runs: Counter[tuple[str, str]]
    started: set[tuple[str, str]]

    @property
    def unfinished(self) -> int:
        return self.snap.unfinished

    @property
    def in_flight_steps(self) -> set[tuple[str, str]]:
        """Steps that had started and whose result was not recorded."""
        return self.started - self.snap.completed_steps

    def open_waits(self, kind: str) -> int:
        return sum(1 for w in self.snap.waits if w["kind"] == kind and w["status"] == "OPEN")


def fault_point(what: str, store_url: str, events: Path) -> FaultPoint:
    # Store first, then events: a step the snapshot holds as recorded wrote its step-done
    # line before it was recorded, so that line is in the events read after.
    snap = snapshot(store_url)
    lines = read_events(events)
    runs = Counter((e[1], e[2]) for e in lines if e[0] == "step-done")
    started = {(e[1], e[2]) for e in lines if e[0] == "step-start"}
    return FaultPoint(what, snap, runs, started)


@dataclass
class Expected:
    kind: str
    params: dict[str, Any]


@dataclass
class MixedLoad:
    client: Client
    rng: random.Random
    signal_delay_s: float = 4.0
    expected: dict[str, Expected] = field(default_factory=dict)
    _senders: list[asyncio.Task[None]] = field(default_factory=list)
    _runners: list[asyncio.Task[None]] = field(default_factory=list)
    _n: int = 0

    async def schedule(self, count: int) -> list[str]:
        """Schedule `count` flows: 60% ThreeSteps, 20% Sleeper, 20% Signalled."""
        flows: list[Any] = []
        kinds: list[Expected] = []
        for _ in range(count):
            self._n += 1
            n, roll = self._n, self.rng.random()
            if roll < 0.6:
                flows.append(ThreeSteps(n))
                kinds.append(Expected("steps", {"n": n}))
            elif roll < 0.8:
                seconds = round(self.rng.uniform(0.3, 3.0), 2)
                flows.append(Sleeper(seconds))
                kinds.append(Expected("timer", {"seconds": seconds}))
            else:
                nap = round(self.rng.choice([0.0, self.rng.uniform(0.2, 1.5)]), 2)
                flows.append(Signalled(n, nap))
                kinds.append(Expected("signal", {"n": n, "nap": nap}))
        ids = await self.client.schedule_many(flows)
        for flow_id, kind in zip(ids, kinds, strict=True):
            assert flow_id not in self.expected, f"schedule returned {flow_id} twice"
            self.expected[flow_id] = kind
            if kind.kind == "signal":
                self._senders.append(asyncio.create_task(self._send_signals(flow_id, kind)))
        return ids

    def run_soon(self, count: int, within: float) -> None:
        """Start `count` ThreeSteps flows with `Client.run`, each awaiting its outcome."""
        for _ in range(count):
            self._n += 1
            self._runners.append(asyncio.create_task(self._run(self._n, within)))

    @property
    def runs_in_flight(self) -> int:
        """`Client.run` calls not yet answered."""
        return sum(1 for task in self._runners if not task.done())

    async def _run(self, n: int, within: float) -> None:
        try:
            outcome = await self.client.run(ThreeSteps(n), timeout=within)
        except TimeoutError:
            raise AssertionError(f"run of ThreeSteps({n}) did not end in {within} s") from None
        # Expected only now (the server chose the id): a duplicate shows as an extra flow.
        want = Expected("steps", {"n": n})
        assert outcome.flow_id not in self.expected, f"run returned {outcome.flow_id} twice"
        self.expected[outcome.flow_id] = want
        assert (outcome.status, outcome.result) == (FlowStatus.COMPLETED, _result(want)), outcome

    async def _send_signals(self, flow_id: str, kind: Expected) -> None:
        n = kind.params["n"]
        await asyncio.sleep(self.rng.uniform(0, self.signal_delay_s))
        await self.client.signal(flow_id, "go", f"a{n}")
        await asyncio.sleep(self.rng.uniform(0, self.signal_delay_s / 2))
        await self.client.signal(flow_id, "go", f"b{n}")

    async def wait_all(self, within: float, store_url: str | None = None) -> None:
        """Every signal sent (acknowledged) and every flow ended COMPLETED, right result.

        Flows that have not ended in time are described (with their store rows when
        `store_url` is given), so a stuck flow can be understood from the failure alone.
        """
        await asyncio.gather(*self._senders, *self._runners)
        ids = list(self.expected)
        try:
            outcomes = await asyncio.gather(*(self.client.wait(f, timeout=within) for f in ids))
        except TimeoutError:
            raise AssertionError(await self._describe_unfinished(ids, store_url)) from None
        wrong = []
        for flow_id, outcome in zip(ids, outcomes, strict=True):
            want = self.expected[flow_id]
            if outcome.status is not FlowStatus.COMPLETED or outcome.result != _result(want):
                wrong.append((flow_id, want, outcome.status, outcome.result, outcome.error))
        assert not wrong, f"{len(wrong)} flows ended wrong: {wrong[:3]}"

    async def _describe_unfinished(self, ids: list[str], store_url: str | None) -> str:
        records = await asyncio.gather(*(self.client.get(f) for f in ids))
        stuck = [r for r in records if not r.status.terminal]
        snap = await asyncio.to_thread(snapshot, store_url) if store_url else None
        lines = [f"{len(stuck)} flows did not end:"]
        for record in stuck[:5]:
            history = await self.client.history(record.flow_id)
            lines.append(
                f"- {record.flow_id} {self.expected[record.flow_id]} status={record.status.name} "
                f"attempt={record.attempt} journal={[(e.key, e.status) for e in history]}"
            )
            if snap is not None:
                lines.append(f"  row={snap.flows.get(record.flow_id)}")
                lines += [f"  wait={w}" for w in snap.waits if w["flow_id"] == record.flow_id]
                lines += [f"  signal={g}" for g in snap.signals if g["flow_id"] == record.flow_id]
        return "\n".join(lines)

    def verify(self, store_url: str, events: Path, faults: list[FaultPoint]) -> dict[str, int]:
        """The exact end-of-run checks; returns figures for the report."""
        final = snapshot(store_url)
        check_consistency(final, set(self.expected))
        by_flow: dict[str, list[dict[str, Any]]] = {}
        for entry in final.journal:
            by_flow.setdefault(entry["flow_id"], []).append(entry)
        signals = Counter(s["flow_id"] for s in final.signals)
        for flow_id, want in self.expected.items():
            entries = by_flow.get(flow_id, [])
            shape = [(e["key"], e["kind"]) for e in entries]
            assert shape == _journal_shape(want), (flow_id, shape)
            for entry in entries:
                if entry["kind"] == "STEP":
                    assert entry["attempts"] == 1, (flow_id, entry)
                if entry["kind"] == "TIMER":
                    created = final.flows[flow_id]["created_at"]
                    if want.kind == "timer":
                        assert entry["recorded_at"] - created >= want.params["seconds"] * 1000, (
                            f"timer of {flow_id} fired early: {entry}"
                        )
            if want.kind == "signal":
                assert signals[flow_id] == 2, f"{flow_id} has {signals[flow_id]} signals"
        for wait in final.waits:
            if wait["kind"] == "TIMER":
                entry = next(e for e in by_flow[wait["flow_id"]] if e["key"] == wait["key"])
                assert entry["recorded_at"] >= wait["fire_at"], f"early: {wait} {entry}"

        lines = read_events(events)
        runs = Counter((e[1], e[2]) for e in lines if e[0] == "step-done")
        for (flow_id, key), entry in {(e["flow_id"], e["key"]): e for e in final.journal}.items():
            if entry["kind"] == "STEP":
                assert runs[(flow_id, key.split("#")[0])] >= 1, f"{flow_id} {key} never ran"
        for point in faults:
            for step in point.snap.completed_steps:
                assert runs[step] == point.runs[step], (
                    f"{step} was recorded at '{point.what}' and ran again afterwards"
                )
        reruns = {step: n for step, n in runs.items() if n > 1}
        for step in reruns:
            assert any(step in p.in_flight_steps for p in faults), (
                f"{step} ran {runs[step]} times but was never in flight at a fault"
            )
        return {
            "flows": len(self.expected),
            "steps_recorded": sum(1 for e in final.journal if e["kind"] == "STEP"),
            "timers": sum(1 for e in final.journal if e["kind"] == "TIMER"),
            "signals": len(final.signals),
            "step_reruns": sum(n - 1 for n in reruns.values()),
        }


def _result(want: Expected) -> Any:
    if want.kind == "steps":
        return want.params["n"] * 2 + 1
    if want.kind == "timer":
        return "slept"
    n = want.params["n"]
    return f"{n}:a{n}+b{n}"


def _journal_shape(want: Expected) -> list[tuple[str, str]]:
    if want.kind == "steps":
        return [("one#1", "STEP"), ("two#1", "STEP"), ("three#1", "STEP")]
    if want.kind == "timer":
        return [("timer#1", "TIMER")]
    shape = [("prepare#1", "STEP"), ("signal:go#1", "SIGNAL"), ("signal:go#2", "SIGNAL")]
    if want.params["nap"]:
        shape.append(("timer#1", "TIMER"))
    return [*shape, ("finish#1", "STEP")]
