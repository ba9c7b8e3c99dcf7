"""The `Store` contract for stops of unknown channels: once per id (queued or remembered), a
bounded queue counted without reading it, and a bounded memory of finished stops.

Every test runs against each backend (see conftest.py).
"""

from __future__ import annotations

import pytest

from tests.storage.helpers import T0

WEEK = 7 * 86400.0


@pytest.mark.gen_test(timeout=10)
async def test_an_unknown_channel_is_queued_once_and_the_queue_is_bounded(store):
    assert await store.channels.count_stops() == 0
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0, 3) == "queued"
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-other", T0 + 1, 3) == "known"
    assert await store.channels.enqueue_stop("ch-2", "res-2", "cal-1", T0)  # our own channel's stop
    assert await store.channels.enqueue_unknown_stop("ch-2", "res-2", T0 + 1, 3) == "known"
    assert await store.channels.count_stops() == 2
    assert await store.channels.enqueue_unknown_stop("ch-3", "res-3", T0 + 2, 3) == "queued"
    assert await store.channels.enqueue_unknown_stop("ch-4", "res-4", T0 + 2, 3) == "full"
    assert await store.channels.enqueue_unknown_stop("ch-3", "res-3", T0 + 2, 3) == "known"
    assert await store.channels.count_stops() == 3
    stops = {s.channel_id: s for s in await store.channels.list_stops()}
    assert sorted(stops) == ["ch-1", "ch-2", "ch-3"]
    assert (stops["ch-1"].resource_id, stops["ch-1"].calendar_id) == ("res-1", None)
    assert (stops["ch-1"].attempts, stops["ch-1"].next_attempt_at) == (0, T0)
    assert [s.channel_id for s in await store.channels.due_stops(T0 + 1)] == ["ch-1", "ch-2"]
    # Room again once a stop leaves the queue, whichever way it leaves.
    await store.channels.remove_stop("ch-2")
    assert await store.channels.count_stops() == 2
    assert await store.channels.enqueue_unknown_stop("ch-4", "res-4", T0 + 3, 3) == "queued"
    await store.channels.finish_stop("ch-1", T0 + WEEK, T0 + 4, 100)
    await store.channels.finish_stop("ch-unknown", T0 + WEEK, T0 + 4, 100)  # not queued: remembered
    assert await store.channels.count_stops() == 2
    assert sorted(s.channel_id for s in await store.channels.list_stops()) == ["ch-3", "ch-4"]


@pytest.mark.gen_test(timeout=10)
async def test_a_finished_stop_is_remembered_until_its_time(store):
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0, 10) == "queued"
    await store.channels.finish_stop("ch-1", T0 + WEEK, T0 + 1, 100)
    assert await store.channels.list_stops() == []
    # Google sends on it again (the stop ran, or was given up): nothing more is queued.
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0 + 2, 10) == "known"
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0 + WEEK - 1, 10) == "known"
    assert await store.channels.list_stops() == []
    # Its time is over: the id is a stranger again.
    assert await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0 + WEEK, 10) == "queued"
    # Finishing again keeps the later of the two times.
    await store.channels.finish_stop("ch-1", T0 + 2 * WEEK, T0 + WEEK, 100)
    await store.channels.finish_stop("ch-1", T0 + WEEK + 5, T0 + WEEK, 100)
    assert (
        await store.channels.enqueue_unknown_stop("ch-1", "res-1", T0 + 2 * WEEK - 1, 10) == "known"
    )


@pytest.mark.gen_test(timeout=10)
async def test_the_remembered_ids_are_bounded_the_soonest_forgotten_go_first(store):
    for number, until in enumerate([50, 10, 40, 20, 30]):
        await store.channels.finish_stop(f"ch-{number}", T0 + until, T0, 3)
    # Bound 3: the two remembered for the shortest time (ch-1 until +10, ch-3 until +20) went.
    known = {
        f"ch-{n}": await store.channels.enqueue_unknown_stop(f"ch-{n}", "res", T0 + 1, 100)
        for n in range(5)
    }
    assert known == {
        "ch-0": "known",
        "ch-1": "queued",
        "ch-2": "known",
        "ch-3": "queued",
        "ch-4": "known",
    }
    # Ids whose time is over never push out ones still remembered.
    await store.channels.finish_stop("ch-5", T0 + 100, T0 + 45, 3)
    await store.channels.finish_stop("ch-6", T0 + 100, T0 + 45, 3)
    assert await store.channels.enqueue_unknown_stop("ch-0", "res", T0 + 46, 100) == "known"
    assert await store.channels.enqueue_unknown_stop("ch-5", "res", T0 + 46, 100) == "known"
    assert await store.channels.enqueue_unknown_stop("ch-6", "res", T0 + 46, 100) == "known"


@pytest.mark.gen_test(timeout=10)
async def test_the_stop_count_and_the_memory_survive_a_restart(store, backend):
    await store.channels.enqueue_stop("ch-1", "res-1", "cal-1", T0)
    assert await store.channels.enqueue_unknown_stop("ch-2", "res-2", T0, 10) == "queued"
    await store.channels.finish_stop("ch-3", T0 + WEEK, T0, 100)
    again = backend.make()
    await again.open()
    try:
        assert await again.channels.count_stops() == 2
        assert await again.channels.enqueue_unknown_stop("ch-3", "res-3", T0 + 1, 10) == "known"
        assert await again.channels.enqueue_unknown_stop("ch-4", "res-4", T0 + 1, 3) == "queued"
        assert await again.channels.enqueue_unknown_stop("ch-5", "res-5", T0 + 1, 3) == "full"
    finally:
        await again.close()
