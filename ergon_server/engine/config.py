"""Tunables of the engine, with production defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine behaves.

    Attributes:
        lease_ttl_ms: A flow's lease lapses this long after its session's last heartbeat; the
            flow is then re-queued with a new token.
        heartbeat_interval_ms: How often workers must heartbeat (and the server pings).
        expiry_scan_interval_ms: How often expired leases are looked for.
        dispatch_poll_interval_ms: Longest the dispatcher sleeps without being woken (a safety
            net; it is woken on every schedule, completion and registration).
        max_payload_bytes: Largest payload (input, result, signal) accepted, serialized.
        allow_unregistered_flow_types: Accept flows of types no worker ever registered.
        max_wait_ms: Longest a WaitFlow long-poll is held.
        timer_poll_interval_ms: Longest the timer loop sleeps without being woken: the bound
            on how late a timer registered elsewhere (another replica) can fire.
        park_initial_delay_ms: First retry delay of a flow parked for a history mismatch;
            it doubles at each park.
        park_max_delay_ms: The cap on that delay.
        max_page_size: Most flows (or journal entries) one page of a listing holds.
        max_streams_per_client: Most worker streams one client (bearer token, or else
            connection) may hold open at once; more are refused with RESOURCE_EXHAUSTED.
    """

    lease_ttl_ms: int = 15_000
    heartbeat_interval_ms: int = 5_000
    expiry_scan_interval_ms: int = 1_000
    dispatch_poll_interval_ms: int = 1_000
    max_payload_bytes: int = 2 * 1024 * 1024
    allow_unregistered_flow_types: bool = False
    max_wait_ms: int = 60_000
    timer_poll_interval_ms: int = 1_000
    park_initial_delay_ms: int = 1_000
    park_max_delay_ms: int = 60_000
    max_streams_per_client: int = 200
    max_page_size: int = 1000

    def __post_init__(self) -> None:
        if self.max_page_size < 1:
            raise ValueError("max_page_size must be at least 1")
        if self.max_streams_per_client < 1:
            raise ValueError("max_streams_per_client must be at least 1")
        if self.lease_ttl_ms <= 0 or self.heartbeat_interval_ms <= 0:
            raise ValueError("lease TTL and heartbeat interval must be positive")
        if self.heartbeat_interval_ms * 2 > self.lease_ttl_ms:
            raise ValueError(
                "the heartbeat interval must be at most half the lease TTL, "
                f"got {self.heartbeat_interval_ms} ms and {self.lease_ttl_ms} ms"
            )
