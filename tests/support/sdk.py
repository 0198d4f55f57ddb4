"""Helpers for SDK tests that run real workers against an in-process server."""

from __future__ import annotations

from ergon_worker_sdk import Client, Worker, WorkerHandle


async def start(
    client: Client, *types: type, name: str = "w", capacity: int = 10
) -> tuple[Worker, WorkerHandle]:
    """Register the flow types on a new worker and start it."""
    worker = Worker(client, name, max_concurrency=capacity)
    await worker.register(*types)
    return worker, await worker.start()
