"""Dynamic batching inside a replica: when the engine is free, the oldest waiting request and every
compatible one behind it (same batch key, in arrival order, up to max_images) run as one engine batch.

Why not `ray.serve.batch`: it closes the next batch while the current one computes (with whatever
arrived in its wait window), so under load the engine sees small batches while compatible requests
queue behind it; and it mixes incompatible requests in one call. Here a batch is formed only when the
engine is free, from everything waiting then. A request whose caller gave up (timeout, disconnect) is
dropped before it costs compute, and a running batch whose callers have all given up is told so (the
event handed to `run`), so that the engine stops between steps and serves the others instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

R = TypeVar("R")  # a request


@dataclass
class _Waiting(Generic[R]):
    request: R
    future: asyncio.Future


class Batcher(Generic[R]):
    def __init__(self, run: Callable[[list[R], threading.Event], Awaitable[list[Any]]], key: Callable[[R], Hashable],
                 size: Callable[[R], int], max_images: int, wait_s: float,
                 prepare: Callable[[R], R] = lambda r: r):
        """run(batch, abandoned) -> one result per request; `abandoned` is set (from the event loop's thread)
        once every caller of the batch has given up; key: compatibility; size: images of a request;
        prepare: applied to each request as its batch is formed (e.g. the adaptive ratio of that moment)."""
        self._run, self._key, self._size, self._prepare = run, key, size, prepare
        self.max_images = max_images
        self.wait_s = wait_s
        self._waiting: list[_Waiting[R]] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiting if not w.future.done())

    async def submit(self, request: R) -> Any:
        if self._size(request) > self.max_images:
            raise ValueError(f"a request of {self._size(request)} images exceeds the batch limit {self.max_images}")
        fut = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(request, fut))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await fut  # cancelled with the caller: the worker then skips it

    async def _work(self) -> None:
        while True:
            self._waiting = [w for w in self._waiting if not w.future.done()]
            if not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if self.wait_s > 0 and self._compatible_images() < self.max_images:
                await asyncio.sleep(self.wait_s)  # the engine is free: give late arrivals a moment to join
            batch = self._take()
            if not batch:
                continue
            abandoned = threading.Event()

            def _on_done(_: asyncio.Future, batch: list[_Waiting[R]] = batch, ev: threading.Event = abandoned) -> None:
                if all(w.future.cancelled() for w in batch):
                    ev.set()

            for w in batch:
                w.future.add_done_callback(_on_done)
            try:
                results = await self._run([w.request for w in batch], abandoned)
            except Exception as e:  # noqa: BLE001 - every caller gets the error, none is left waiting
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            for w, res in zip(batch, results, strict=True):
                if not w.future.done():
                    w.future.set_result(res)

    def _compatible_images(self) -> int:
        live = [w for w in self._waiting if not w.future.done()]
        if not live:
            return 0
        key = self._key(self._prepare(live[0].request))
        return sum(self._size(w.request) for w in live if self._key(self._prepare(w.request)) == key)

    def _take(self) -> list[_Waiting[R]]:
        live = [w for w in self._waiting if not w.future.done()]
        if not live:
            return []
        for w in live:
            w.request = self._prepare(w.request)
        key = self._key(live[0].request)
        batch, images = [], 0
        for w in live:
            n = self._size(w.request)
            if self._key(w.request) == key and images + n <= self.max_images:
                batch.append(w)
                images += n
        taken = {id(w) for w in batch}
        self._waiting = [w for w in live if id(w) not in taken]
        return batch
