"""Groups concurrent requests into one call (SEED RL style): a batch is run when it holds
``max_batch`` rows or ``max_wait_ms`` after its first request arrived, whichever comes first.

    batcher = Batcher(run_batch, max_batch=64, max_wait_ms=5, executor=pool)
    result, batch_rows = await batcher.submit(payload, rows=len(obs))

``run_batch(payloads) -> results`` (one result per payload, same order) runs in ``executor``, so the
event loop never waits on it; one batch runs at a time, and requests arriving meanwhile form the
next one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from loupe.errors import LoupeError


@dataclasses.dataclass
class BatchStats:
    """What a batcher has done so far."""

    #: batches run
    batches: int = 0
    #: requests served
    requests: int = 0
    #: batch size (rows) -> batches of that size
    sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    #: batches run because max_batch rows were waiting
    full: int = 0
    #: batches run because max_wait_ms had passed
    timed_out: int = 0
    #: seconds the first request of the last batch waited before the batch ran
    last_wait_s: float = 0.0


@dataclasses.dataclass
class _Item:
    payload: Any
    rows: int
    future: asyncio.Future
    arrived: float


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        max_batch: int,
        max_wait_ms: float,
        executor: Executor | None = None,
    ):
        if max_batch < 1:
            raise LoupeError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise LoupeError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.executor = executor
        self.stats = BatchStats()
        self._waiting: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def submit(self, payload: Any, rows: int) -> tuple[Any, int]:
        """Queue one request of ``rows`` rows -> (its result, rows in the batch that served it)."""
        if not 1 <= rows <= self.max_batch:
            raise LoupeError(f"a request holds 1..{self.max_batch} rows, got {rows}")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        item = _Item(payload, rows, loop.create_future(), time.perf_counter())
        self._waiting.append(item)
        self._arrived.set()
        return await item.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._waiting:
            if not item.future.done():
                item.future.cancel()

    def _take(self) -> list[_Item]:
        batch, rows = [], 0
        while self._waiting and rows + self._waiting[0].rows <= self.max_batch:
            item = self._waiting.popleft()
            if item.future.cancelled():  # its caller gave up while it waited
                continue
            batch.append(item)
            rows += item.rows
        return batch

    def _rows_waiting(self) -> int:
        return sum(i.rows for i in self._waiting)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._waiting[0].arrived + self.max_wait_s
            while self._rows_waiting() < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            full = self._rows_waiting() >= self.max_batch
            batch = self._take()
            if not batch:
                continue
            rows = sum(i.rows for i in batch)
            st = self.stats
            st.batches += 1
            st.requests += len(batch)
            st.sizes[rows] += 1
            st.full += full
            st.timed_out += not full
            st.last_wait_s = time.perf_counter() - batch[0].arrived
            try:
                results = await loop.run_in_executor(
                    self.executor, self.run_batch, [i.payload for i in batch]
                )
            except Exception as exc:  # the callers see the error; the loop goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(batch, results):
                if not item.future.done():
                    item.future.set_result((result, rows))
