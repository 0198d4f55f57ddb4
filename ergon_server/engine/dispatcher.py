"""Push-based dispatch with credits: ready flows go to the least-loaded session of their type.

A session never holds more flows than its capacity. Each pass claims in rounds of small chunks,
least-loaded session first, so a backlog is spread evenly instead of filling the first session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Iterable

from ergon_server.clock import Clock
from ergon_server.engine.config import EngineConfig
from ergon_server.engine.sessions import AssignmentOut, RevokeOut, Session
from ergon_server.errors import ErgonError
from ergon_server.metrics import Metrics
from ergon_server.model import ClaimedFlow, Lease
from ergon_server.storage.base import Store
from ergon_worker_sdk.tracing import Tracer

log = logging.getLogger(__name__)


class Dispatcher:
    """Owns the live sessions of this server and the leases they hold here."""

    def __init__(self, store: Store, clock: Clock, config: EngineConfig, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._config = config
        self._sessions: dict[str, Session] = {}
        # flow_id -> the live session of this server that holds its lease.
        self._owners: dict[str, Session] = {}
        # flow_id -> the last journal sequence its holder was given with the flow (0: unknown,
        # as for a re-attached lease); entries after it were recorded during this lease.
        self._given: dict[str, int] = {}
        self._wake = asyncio.Event()
        # Sessions whose last claim found less work than they had room for: freeing room in
        # one does not call for a pass (any new work comes with its own wake).
        self._starved: set[str] = set()
        self._tracer = Tracer("ergon_server")
        self.dispatched_total = 0

    @property
    def sessions(self) -> list[Session]:
        """The live sessions."""
        return list(self._sessions.values())

    def wake(self) -> None:
        """Ask for a dispatch pass soon (work or capacity appeared)."""
        self._wake.set()

    def add(self, session: Session, held: Iterable[tuple[str, int]] = ()) -> None:
        """Start dispatching to a session, which already holds the given leases."""
        self._sessions[session.session_id] = session
        for flow_id, lease_token in held:
            self.adopt(session, flow_id, lease_token)
        self.wake()

    def remove(self, session: Session) -> None:
        """Stop dispatching to a session; its leases stay in the store until they expire."""
        session.close()
        self._sessions.pop(session.session_id, None)
        for flow_id in session.held:
            if self._owners.get(flow_id) is session:
                del self._owners[flow_id]
                self._given.pop(flow_id, None)

    def adopt(self, session: Session, flow_id: str, lease_token: int, given: int = 0) -> None:
        """Record that a session runs a flow under a lease, given its journal up to `given`."""
        session.held[flow_id] = lease_token
        self._owners[flow_id] = session
        self._given[flow_id] = given

    def held_flows(self) -> list[tuple[Session, str, int, int]]:
        """Every lease held here: (session, flow_id, lease_token, journal sequence given)."""
        return [
            (session, flow_id, session.held[flow_id], self._given.get(flow_id, 0))
            for flow_id, session in self._owners.items()
            if flow_id in session.held
        ]

    def forget(
        self, flow_id: str, lease_token: int | None = None, *, ended: bool = False
    ) -> Session | None:
        """Free the slot of a flow that ended, moved or was given back; returns its session.

        `ended`: the flow is terminal, so the only new work is the freed slot, which a session
        that already ran out of work has no use for.
        """
        session = self._owners.get(flow_id)
        if session is None:
            return None
        if lease_token is not None and session.held.get(flow_id) != lease_token:
            return None
        del self._owners[flow_id]
        self._given.pop(flow_id, None)
        session.held.pop(flow_id, None)
        if not (ended and session.session_id in self._starved):
            self.wake()
        return session

    def holder(self, flow_id: str, lease_token: int) -> Session | None:
        """The live session of this server running the flow under that lease, if any."""
        session = self._owners.get(flow_id)
        if session is None or session.held.get(flow_id) != lease_token:
            return None
        return session

    def revoke(self, flow_id: str, reason: str, lease_token: int | None = None) -> None:
        """Tell the session running a flow here to stop, and free its slot.

        With `lease_token`, only a session holding that lease is told; None: whoever holds it.
        """
        session = self._owners.get(flow_id)
        if session is None:
            return
        held = session.held.get(flow_id, 0)
        if lease_token is not None and held != lease_token:
            return
        self.forget(flow_id)
        session.send(RevokeOut(flow_id, held, reason))

    async def run(self) -> None:
        """Dispatch until cancelled."""
        while True:
            self._wake.clear()
            try:
                delay_ms = await self._dispatch_pass()
            except ErgonError as error:
                log.warning("dispatch pass failed, retrying: %s", error.message)
                delay_ms = self._config.dispatch_poll_interval_ms
            if delay_ms > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay_ms / 1000):
                        await self._wake.wait()

    async def _dispatch_pass(self) -> int:
        """Claim for sessions with free capacity; returns how long to sleep, in ms."""
        # A session silent for a whole lease TTL is black-holed (its leases are expiring for
        # that reason): handing it flows again would only cost them another TTL each.
        silent_before = self._clock.now_ms() - self._config.lease_ttl_ms
        eligible = [
            s
            for s in self._sessions.values()
            if s.free > 0 and (s.last_heard_ms is None or s.last_heard_ms >= silent_before)
        ]
        starved: list[Session] = []
        handed_over = 0
        # Until this pass knows better (and if it fails), every session may want a pass.
        self._starved = set()
        while eligible:
            eligible.sort(key=lambda s: s.load)
            now = self._clock.now_ms()
            expires_at = now + self._config.lease_ttl_ms
            asks = [min(s.free, max(1, math.ceil(s.capacity / 4))) for s in eligible]
            claims = await _gather(
                [
                    self._store.claim_flows(s.session_id, s.flow_types, ask, expires_at, now)
                    for s, ask in zip(eligible, asks, strict=True)
                ]
            )
            next_round: list[Session] = []
            failure: BaseException | None = None
            for session, ask, flows in zip(eligible, asks, claims, strict=True):
                if isinstance(flows, BaseException):
                    failure = flows
                    continue
                try:
                    await self._hand_over(session, flows)
                except ErgonError as error:
                    # Giving back a gone session's flows failed: their leases lapse as any
                    # unrenewed lease does. The other sessions' claims are still handed over.
                    failure = error
                    continue
                handed_over += len(flows)
                if len(flows) < ask:
                    starved.append(session)
                elif session.free > 0:
                    next_round.append(session)
            eligible = next_round
            if failure is not None:
                # Claims that succeeded were handed over above; the failed one is retried.
                raise failure
        self._starved = {s.session_id for s in starved}
        if not starved:
            return self._config.dispatch_poll_interval_ms
        if handed_over:
            # The store's read may run on this thread without yielding: let the streams
            # write the assignments first, as they are what a worker waits for.
            await asyncio.sleep(0)
        types = sorted({t for s in starved for t in s.flow_types})
        next_ready = await self._store.next_ready_at(types)
        poll = self._config.dispatch_poll_interval_ms
        if next_ready is None:
            return poll
        return max(1, min(poll, next_ready - self._clock.now_ms()))

    async def _hand_over(self, session: Session, flows: list[ClaimedFlow]) -> None:
        if not flows:
            return
        if session.closed or session.capacity == 0:
            # The worker went away, or stopped taking flows (it is shutting down), while we
            # claimed: give the flows back at once rather than let them wait out the lease.
            await self._store.release_flows(
                [Lease(f.flow_id, f.lease_token) for f in flows], self._clock.now_ms()
            )
            self.wake()
            return
        with self._tracer.span(
            "ergon.dispatch", **{"ergon.flows": len(flows), "ergon.worker_id": session.worker_id}
        ):
            for flow in flows:
                # The journal comes in sequence order.
                given = flow.journal[-1].sequence if flow.journal else 0
                self.adopt(session, flow.flow_id, flow.lease_token, given)
                session.assigned_total += 1
                session.send(AssignmentOut(flow))
        self.dispatched_total += len(flows)
        self._metrics.dispatched.inc(len(flows))
        now = self._clock.now_ms()
        for flow in flows:
            self._metrics.dispatch_latency.observe(max(0, now - flow.ready_at) / 1000)


async def _gather(
    claims: list[Awaitable[list[ClaimedFlow]]],
) -> list[list[ClaimedFlow] | BaseException]:
    """Each claim's flows or its error; one claim is awaited as is (no task, no loop turn)."""
    if len(claims) == 1:
        try:
            return [await claims[0]]
        except Exception as error:
            return [error]
    return await asyncio.gather(*claims, return_exceptions=True)
