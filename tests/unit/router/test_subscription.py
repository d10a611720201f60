"""The router's side of a decode worker's token stream: one subscription, many requests."""

from __future__ import annotations

import asyncio
import functools

import pytest

pytest.importorskip("ray")

from ray.exceptions import RayActorError  # noqa: E402

from decode_worker.messages import TokenChunk  # noqa: E402
from router.workers import StreamEnded, WorkerUnavailable, _Subscription  # noqa: E402


def chunk(rid: str, tokens: tuple[int, ...], finished: bool = False, q: float = 0.0) -> TokenChunk:
    return TokenChunk(rid, tokens, "x" * len(tokens), finished, "length" if finished else None,
                      5, 0, 0, decode_queue_s=q)  # fmt: skip


def sync(test):  # noqa: ANN001, ANN201 - runs an async test in a fresh event loop
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(asyncio.wait_for(test(), 10))

    return run


class _Method:
    def __init__(self, fn) -> None:  # noqa: ANN001
        self.remote = fn


class FakeActor:
    """`watch` records its batches; `subscribe` yields what the test puts in `items`
    (a list of chunks, or an exception to raise), each item as an awaitable "ref"."""

    def __init__(self) -> None:
        self.watched: list[list[tuple[str, float]]] = []
        self.items: asyncio.Queue = asyncio.Queue()
        self.subscribed: list[str] = []
        self.watch = _Method(lambda name, batch: self.watched.append(list(batch)))
        self.subscribe = _Method(self._subscribe)

    def _subscribe(self, name: str):  # noqa: ANN202
        self.subscribed.append(name)

        async def gen():  # noqa: ANN202
            while True:
                item = await self.items.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                fut = asyncio.get_running_loop().create_future()
                fut.set_result(item)
                yield fut

        return gen()


@sync
async def test_watches_are_batched_and_chunks_reach_their_request() -> None:
    actor = FakeActor()
    sub = _Subscription(actor, "d0")
    a = sub.open("a", 10.0)
    b = sub.open("b", 20.0)
    await asyncio.sleep(0)
    assert actor.watched == [[("a", 10.0), ("b", 20.0)]]  # one call for both
    await actor.items.put([chunk("a", (1,), q=0.5), chunk("b", (7,))])
    first = await a.next(1.0)
    assert first.token_ids == (1,) and first.decode_queue_s == 0.5
    assert (await b.next(1.0)).token_ids == (7,)
    await actor.items.put([chunk("a", (2,))])
    await actor.items.put([chunk("a", (3,), finished=True), chunk("zombie", (9,))])
    await asyncio.sleep(0.01)
    merged = await a.next(1.0)  # both waiting chunks, as one
    assert merged.token_ids == (2, 3) and merged.finished and merged.finish_reason == "length"
    assert list(sub._streams) == ["b"]
    b.close()
    assert sub._streams == {}
    await actor.items.put(None)


@sync
async def test_a_dead_worker_fails_every_open_request() -> None:
    actor = FakeActor()
    sub = _Subscription(actor, "d0")
    a, b = sub.open("a", 10.0), sub.open("b", 10.0)
    await actor.items.put([chunk("a", (1,))])
    await actor.items.put(RayActorError())
    assert (await a.next(1.0)).token_ids == (1,)
    with pytest.raises(WorkerUnavailable):
        await a.next(1.0)
    with pytest.raises(WorkerUnavailable):
        await b.next(1.0)
    assert sub.ended


@sync
async def test_a_generator_that_ends_early_is_stream_ended() -> None:
    actor = FakeActor()
    sub = _Subscription(actor, "d0")
    a = sub.open("a", 10.0)
    await actor.items.put(None)
    with pytest.raises(StreamEnded):
        await a.next(1.0)


@sync
async def test_next_times_out_without_losing_later_chunks() -> None:
    actor = FakeActor()
    sub = _Subscription(actor, "d0")
    a = sub.open("a", 10.0)
    with pytest.raises(TimeoutError):
        await a.next(0.01)
    await actor.items.put([chunk("a", (4,), finished=True)])
    assert (await a.next(1.0)).token_ids == (4,)
    await actor.items.put(None)


@sync
async def test_close_ends_the_pump_and_its_open_requests() -> None:
    actor = FakeActor()
    sub = _Subscription(actor, "d0")
    a = sub.open("a", 10.0)
    await asyncio.sleep(0)
    await sub.close()
    assert sub.ended
    with pytest.raises(StreamEnded):
        await a.next(1.0)


@sync
async def test_a_restarted_worker_ends_the_old_subscription_and_gets_a_new_one() -> None:
    from router.workers import RayDecodeClient

    actor = FakeActor()
    client = RayDecodeClient("d0", actor, "d0:1")  # type: ignore[arg-type]
    old = client.open_stream("a", 10.0)
    await asyncio.sleep(0)
    client.restarted()  # the old process is gone: its request ends now, to be retried
    with pytest.raises(StreamEnded):
        await old.next(1.0)
    new = client.open_stream("b", 10.0)
    await asyncio.sleep(0)
    assert len(actor.subscribed) == 2 and actor.subscribed[0] != actor.subscribed[1]
    await actor.items.put([chunk("b", (5,), finished=True)])
    assert (await new.next(1.0)).token_ids == (5,)
    await client.close()
