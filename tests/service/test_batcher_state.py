"""The micro-batcher, the hot-swap state and the settings, in-process on a fake index."""

from __future__ import annotations

import asyncio
import threading

import pytest

from api.errors import NotReadyError, OverloadedError, QueryTimeoutError
from engine.query import Limits, Query
from service.batcher import MicroBatcher
from service.commands import _settings_from, register
from service.settings import Settings
from service.state import IndexState
from tests.service.fakes import FakeOpener

LIMITS = Limits(max_prompt_tokens=50, max_completion_tokens=50)


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Yield to the event loop until ``condition()`` holds (an ordering point, not a delay)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def _started(tmp_path, *, delay=0.0, encode_gate=None, **kwargs):
    opener = FakeOpener(encode_delay_s=delay, encode_gate=encode_gate)
    state = IndexState(opener, tmp_path)
    await state.reload()
    batcher = MicroBatcher(
        state,
        LIMITS,
        **{"max_batch_size": 8, "max_wait_ms": 20, "max_queue": 64, "timeout_s": 10, **kwargs},
    )
    batcher.start()
    return opener, state, batcher


def test_concurrent_queries_share_batches_and_keep_their_own_results(tmp_path):
    async def scenario():
        opener, state, batcher = await _started(tmp_path, delay=0.05)
        queries = [Query(f"prompt {i}", f" completion {i}", k=5) for i in range(24)]
        singles = [(await batcher.submit([q]))[0] for q in queries[:6]]
        together = await asyncio.gather(*(batcher.submit([q]) for q in queries))
        await batcher.stop()
        return opener, singles, [o for (o,) in together]

    opener, singles, together = asyncio.run(scenario())
    for single, outcome in zip(singles, together[:6], strict=True):
        assert [h.id for h in outcome.hits] == [h.id for h in single.hits]
    assert len({tuple(h.id for h in o.hits) for o in together}) == 24  # all distinct
    calls = opener.opened[0].encode_calls
    assert sum(calls) == 6 + 24 and max(calls) == 8  # batches formed, bounded by max_batch_size


def test_wait_adapts_to_the_previous_batch(tmp_path):
    """A lone client never waits for mates; clients that came back together are gathered
    together again (the wait lasts until the previous batch's size is reached)."""

    async def scenario():
        # A 3 s wait against a 1.5 s timeout: any query that sat out the full wait would fail.
        opener, _, batcher = await _started(tmp_path, max_wait_ms=3000, timeout_s=1.5)
        lone = [await batcher.submit([Query(f"lone {i}", "c", k=2)]) for i in range(3)]
        first = await asyncio.gather(
            *(batcher.submit([Query(f"a {i}", "c", k=2)]) for i in range(4))
        )

        async def late(i):  # the same 4 clients, back one after another
            await _until(lambda: batcher.depth >= i)  # the ones before it are waiting
            return await batcher.submit([Query(f"b {i}", "c", k=2)])

        second = await asyncio.gather(*(late(i) for i in range(4)))
        await batcher.stop()
        return opener, lone, first, second

    opener, lone, first, second = asyncio.run(scenario())
    assert all(o.error is None for (o,) in [*lone, *first, *second])
    assert opener.opened[0].encode_calls == [1, 1, 1, 4, 4]


def test_groups_out_of_step_are_merged_into_one_pass(tmp_path):
    """Clients that queued while another group's pass ran are counted as active: the next
    pass waits for the running group to come back instead of alternating half-size passes."""

    first_pass, release = threading.Event(), threading.Event()

    def gate(_: int) -> None:  # the first pass runs until every b query is queued behind it
        if not first_pass.is_set():
            first_pass.set()
            assert release.wait(10)

    async def scenario():
        # No pass waits out max_wait (each reaches its target), so a long one bounds nothing
        # but a stall: the merge never depends on how fast a loaded machine runs.
        opener, _, batcher = await _started(
            tmp_path, max_wait_ms=10_000, timeout_s=30, encode_gate=gate
        )

        async def client(name, after_first_pass):  # a: two queries in turn; b: one
            if after_first_pass:
                await asyncio.to_thread(first_pass.wait, 10)
            turns = 1 if after_first_pass else 2
            return [await batcher.submit([Query(f"{name} {j}", "c", k=2)]) for j in range(turns)]

        async def release_when_b_waits():
            await _until(lambda: batcher.depth >= 4)
            release.set()

        runs, _ = await asyncio.gather(
            asyncio.gather(
                *(client(f"a{i}", False) for i in range(4)),
                *(client(f"b{i}", True) for i in range(4)),
            ),
            release_when_b_waits(),
        )
        await batcher.stop()
        return opener, runs

    opener, runs = asyncio.run(scenario())
    assert all(o.error is None for run in runs for (o,) in run)
    # a's first queries; then b's (queued during it) and a's second, merged into one pass.
    assert opener.opened[0].encode_calls == [4, 8]


def test_a_bad_query_does_not_fail_its_batch_mates(tmp_path):
    async def scenario():
        _, _, batcher = await _started(tmp_path)
        good, bad = Query("p", "c", k=3), Query("x" * 80, "c", k=3)
        outcomes = await asyncio.gather(batcher.submit([good]), batcher.submit([bad]))
        await batcher.stop()
        return [o for (o,) in outcomes]

    good, bad = asyncio.run(scenario())
    assert good.error is None and len(good.hits) == 3
    assert bad.error is not None and bad.error.code == "input_too_long" and bad.hits == []


def test_full_queue_refuses_at_once_and_timeout_is_bounded(tmp_path):
    async def scenario():
        _, _, batcher = await _started(
            tmp_path, delay=0.3, max_batch_size=1, max_queue=2, timeout_s=0.5
        )
        tasks = [asyncio.create_task(batcher.submit([Query(f"p{i}", "c", k=1)])) for i in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    kinds = [type(r).__name__ for r in results]
    assert kinds.count("OverloadedError") >= 3  # 1 running + 2 queued fit, the rest refused
    assert all(isinstance(r, list | OverloadedError | QueryTimeoutError) for r in results)


def test_swap_waits_for_leases_and_refuses_bad_index(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "SEED").write_text("7")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "BAD").write_text("")

    async def scenario():
        opener = FakeOpener()
        state = IndexState(opener, tmp_path)
        with pytest.raises(NotReadyError):
            state.current  # noqa: B018 - the property raises
        await state.reload()
        first = state.current
        with state.lease() as leased:
            new, previous = await state.reload(good)
            assert previous is first and not first.closed  # in-flight: still open
            assert state.current is new and new.version == "fake0007"
            assert leased.search(leased.vectors[:1], 1)[1][0, 0] == 0  # still usable
        assert first.closed  # closed when the lease came back
        with pytest.raises(Exception) as refused:
            await state.reload(bad)
        assert refused.value.code == "checksum_mismatch"
        assert state.current is new and not new.closed

    asyncio.run(scenario())


def test_settings_from_env_and_flags(monkeypatch):
    import argparse

    monkeypatch.setenv("INFLUENCE_API_KEYS", "k1, k2")
    monkeypatch.setenv("INFLUENCE_MAX_QUEUE", "9")
    monkeypatch.setenv("INFLUENCE_CORS_ORIGINS", "http://a.example")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"] and settings.max_queue == 9
    assert settings.cors_origins == ["http://a.example"]
    assert "k1" not in repr(settings)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", "/tmp/x", "--port", "9001", "--max-queue", "3"])
    flagged = _settings_from(args)
    assert flagged.port == 9001 and flagged.max_queue == 3 and str(flagged.index_dir) == "/tmp/x"
    assert flagged.api_keys == ["k1", "k2"]  # env still applies where no flag is given


def test_search_knobs_reach_the_opened_index(monkeypatch, tmp_path):
    """--nprobe / --ef-search / --rerank-candidates (or INFLUENCE_*) become the index's
    SearchParams when the service opens it."""
    import argparse

    from engine import index as engine_index
    from indexer.faiss_index import SearchParams
    from service.app import default_opener

    monkeypatch.setenv("INFLUENCE_EF_SEARCH", "300")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["serve", "--index", str(tmp_path), "--nprobe", "64", "--rerank-candidates", "512"]
    )
    settings = _settings_from(args)
    seen = {}
    monkeypatch.setattr(
        engine_index.InfluenceIndex,
        "open",
        classmethod(lambda cls, d, opts: seen.update(opts=opts)),
    )
    default_opener(settings)(tmp_path)
    assert seen["opts"].search_params == SearchParams(nprobe=64, ef_search=300, candidates=512)
    assert default_opener(Settings(index_dir=tmp_path)) and Settings().rerank_candidates is None


def test_service_state_freezes_the_loaded_heap_out_of_gc_scans(tmp_path):
    """After a load the long-lived objects are frozen (no full-collection stalls under load);
    a later reload unfreezes first, so a replaced index's cycles can still be collected."""
    import gc
    import weakref

    class Cyclic:
        def __init__(self):
            self.me = self

    async def scenario():
        state = IndexState(FakeOpener(), tmp_path, freeze_heap=True)
        await state.reload()
        frozen = gc.get_freeze_count()
        garbage = Cyclic()
        ref = weakref.ref(garbage)
        gc.collect()
        gc.freeze()  # garbage is now frozen, as an old index's cycles would be
        del garbage
        assert ref() is not None  # not collectable while frozen
        await state.reload()
        return frozen, ref

    try:
        frozen, ref = asyncio.run(scenario())
        assert frozen > 1000
        assert ref() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
