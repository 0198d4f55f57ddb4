"""The SQLite writer: quick jobs on the loop's thread, slow ones on its own, never two at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ergon_server.errors import StoreError
from ergon_server.model import NewFlow
from ergon_server.storage.sqlite import SqliteStore, _Writer


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[_Writer]:
    writer = _Writer(str(tmp_path / "w.db"))
    await writer.open()
    await writer.run(lambda w: w.execute("CREATE TABLE t (thread INTEGER, slow INTEGER)"))
    yield writer
    await writer.close()


async def job(writer: _Writer, *, slow_s: float = 0.0) -> int:
    """Run one insert as a job; returns the id of the thread it ran on."""

    async def body(w: _Writer) -> int:
        if slow_s:
            # Blocking on purpose: the job stands for a slow disk, or a large batch.
            time.sleep(slow_s)  # noqa: ASYNC251
        await w.execute("INSERT INTO t VALUES (?, ?)", (threading.get_ident(), int(slow_s > 0)))
        return threading.get_ident()

    return await writer.run(body)


async def back_on_the_loop(writer: _Writer) -> None:
    """Run quick jobs until one runs on the loop's thread and leaves the next one there.

    A busy machine or disk may make a few of them slower than the writer's threshold.
    """
    for _ in range(50):
        if await job(writer) == threading.get_ident() and writer.idle_on_loop:
            return
    pytest.fail("quick jobs never came back to the event loop's thread")


async def test_quick_jobs_run_on_the_loop_and_a_slow_one_sends_the_next_to_the_thread(
    writer: _Writer,
) -> None:
    loop_thread = threading.get_ident()
    await back_on_the_loop(writer)
    assert await job(writer, slow_s=0.02) == loop_thread
    # The slow job showed the disk (or the batch) is slow: the loop must not wait on the next.
    assert await job(writer) != loop_thread
    await back_on_the_loop(writer)
    rows = await writer.run(lambda w: w.execute_fetchall("SELECT count(*), sum(slow) FROM t"))
    assert rows[0][1] == 1


async def test_no_job_runs_on_the_loop_while_one_runs_on_the_thread(writer: _Writer) -> None:
    loop_thread = threading.get_ident()
    await back_on_the_loop(writer)
    await job(writer, slow_s=0.02)
    first = asyncio.ensure_future(job(writer))
    second = asyncio.ensure_future(job(writer, slow_s=0.1))
    assert await first != loop_thread
    # `first` was quick, which would bring jobs back to the loop; but `second` still runs on
    # the thread, so the next job queues behind it instead of running beside it.
    assert await job(writer) != loop_thread
    assert second.done()
    assert await second != loop_thread


async def test_the_connection_refuses_use_outside_a_job(writer: _Writer) -> None:
    with pytest.raises(StoreError, match="outside a job"):
        await writer.execute("SELECT 1")


async def test_a_job_that_awaits_something_else_is_refused_and_rolled_back(
    writer: _Writer,
) -> None:
    async def wanders_off(w: _Writer) -> None:
        await w.execute("BEGIN IMMEDIATE")
        try:
            await w.execute("INSERT INTO t VALUES (1, 0)")
            await asyncio.sleep(0)  # not the connection: the writer cannot drive this
        except BaseException:
            await w.execute("ROLLBACK")
            raise

    with pytest.raises(StoreError, match="awaited something other than its connection"):
        await writer.run(wanders_off)
    # Its transaction is not left open: the next one starts, and its insert is gone.
    await writer.run(lambda w: w.execute("BEGIN IMMEDIATE"))
    await writer.run(lambda w: w.execute("COMMIT"))
    rows = await writer.run(lambda w: w.execute_fetchall("SELECT COUNT(*) FROM t"))
    assert rows == [(0,)]


async def test_reads_do_not_queue_behind_a_write_in_flight_on_the_thread(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await store.schedule_flows([NewFlow("f1", "T", b"{}")], 1_000)
        writer = store._writer
        assert writer is not None
        await writer.run(lambda w: w.execute("CREATE TABLE t (thread INTEGER, slow INTEGER)"))
        await job(writer, slow_s=0.02)  # now the next job goes to the thread
        slow = asyncio.ensure_future(job(writer, slow_s=0.5))
        await asyncio.sleep(0.05)
        assert not writer.idle_on_loop
        # A reader connection answers while the writer is busy.
        record = await asyncio.wait_for(store.get_flow("f1"), 0.3)
        assert record is not None and record.flow_id == "f1" and not slow.done()
        await slow
        await back_on_the_loop(writer)
        assert writer.idle_on_loop
        # And while it idles on the loop, reads run there too (and see the last commit).
        await store.schedule_flows([NewFlow("f2", "T", b"{}")], 1_000)
        record = await store.get_flow("f2")
        assert record is not None and record.flow_id == "f2"
    finally:
        await store.close()
