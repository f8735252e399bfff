"""The replica's dynamic batcher (pure asyncio, no Ray): batches form when the engine is free, only
compatible requests share one, oldest first, abandoned requests cost nothing, errors reach everyone."""

from __future__ import annotations

import asyncio

import pytest

from tstitch_trt.serve.batcher import Batcher


class Engine:
    """Records each batch; each run takes `seconds` (the engine is busy meanwhile)."""

    def __init__(self, seconds: float = 0.05, fail: bool = False):
        self.batches: list[list[tuple[str, int]]] = []
        self.seconds = seconds
        self.fail = fail

    async def run(self, reqs, abandoned=None):
        self.batches.append(list(reqs))
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("engine failed")
        return [f"done {r}" for r in reqs]


def _batcher(engine: Engine, max_images: int = 4, wait_s: float = 0.0) -> Batcher:
    # a request is (key, images)
    return Batcher(engine.run, key=lambda r: r[0], size=lambda r: r[1], max_images=max_images, wait_s=wait_s)


def test_arrivals_during_a_batch_form_the_next_one_whole():
    async def main():
        engine = Engine()
        b = _batcher(engine, max_images=8)
        first = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.sleep(0.01)  # the engine is now busy with the first request alone
        rest = [asyncio.create_task(b.submit(("a", 1))) for _ in range(5)]
        results = await asyncio.gather(first, *rest)
        return engine.batches, results

    batches, results = asyncio.run(main())
    assert [len(x) for x in batches] == [1, 5]
    assert results == ["done ('a', 1)"] * 6


def test_only_compatible_requests_share_a_batch_oldest_first_up_to_the_limit():
    async def main():
        engine = Engine()
        b = _batcher(engine, max_images=4)
        busy = asyncio.create_task(b.submit(("x", 1)))
        await asyncio.sleep(0.01)
        reqs = [("a", 2), ("b", 1), ("a", 1), ("a", 2), ("b", 3), ("a", 1)]
        tasks = [asyncio.create_task(b.submit(r)) for r in reqs]
        await asyncio.gather(busy, *tasks)
        return engine.batches

    batches = asyncio.run(main())
    # oldest ("a", 2) first, with the a's behind it that fit in 4 images; then the b's; then the a left over
    assert batches == [[("x", 1)], [("a", 2), ("a", 1), ("a", 1)], [("b", 1), ("b", 3)], [("a", 2)]]


def test_an_abandoned_request_is_never_run():
    async def main():
        engine = Engine()
        b = _batcher(engine)
        busy = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit(("a", 2)))
        kept = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller timed out while it waited
        await asyncio.gather(busy, kept)
        return engine.batches

    assert asyncio.run(main()) == [[("a", 1)], [("a", 1)]]


def test_an_engine_error_reaches_every_caller_and_the_batcher_goes_on():
    async def main():
        engine = Engine(fail=True)
        b = _batcher(engine)
        got = await asyncio.gather(b.submit(("a", 1)), b.submit(("a", 1)), return_exceptions=True)
        engine.fail = False
        return got, await b.submit(("a", 1))

    got, after = asyncio.run(main())
    assert all(isinstance(g, RuntimeError) for g in got) and after == "done ('a', 1)"


def test_wait_gives_late_arrivals_a_moment_when_the_engine_is_idle():
    async def main():
        engine = Engine(seconds=0.0)
        b = _batcher(engine, max_images=8, wait_s=0.05)
        first = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.gather(first, second)
        return engine.batches

    assert [len(x) for x in asyncio.run(main())] == [2]


def test_an_oversized_request_is_refused():
    with pytest.raises(ValueError, match="exceeds the batch limit 4"):
        asyncio.run(_batcher(Engine()).submit(("a", 5)))


class Watcher(Engine):
    """An engine that records, for each batch, whether it was told all its callers gave up."""

    def __init__(self):
        super().__init__(seconds=0.1)
        self.abandoned: list[bool] = []
        self.steps_run: list[int] = []

    async def run(self, reqs, abandoned=None):
        self.batches.append(list(reqs))
        steps = 0
        while steps < 20 and not abandoned.is_set():  # a step loop that checks the event between steps
            await asyncio.sleep(0.01)
            steps += 1
        self.abandoned.append(abandoned.is_set())
        self.steps_run.append(steps)
        return [f"done {r}" for r in reqs]


def test_a_running_batch_is_told_when_every_caller_gave_up_and_only_then():
    async def main():
        engine = Watcher()
        b = _batcher(engine, max_images=4)
        # batch 1: one of two callers gives up, the other still waits -> the engine runs on
        kept = asyncio.create_task(b.submit(("a", 1)))
        gone = asyncio.create_task(b.submit(("a", 1)))
        await asyncio.sleep(0.03)
        gone.cancel()
        assert await kept == "done ('a', 1)"
        # batch 2: its only caller gives up mid-run -> the engine is told, and the next request is served
        alone = asyncio.create_task(b.submit(("b", 1)))
        await asyncio.sleep(0.03)
        alone.cancel()
        after = await b.submit(("c", 1))
        return engine, after

    engine, after = asyncio.run(main())
    assert engine.abandoned == [False, True, False] and after == "done ('c', 1)"
    steps = engine.steps_run  # the abandoned batch stopped early; the others ran all 20 steps
    assert steps[0] == steps[2] == 20 and steps[1] < 10, steps
