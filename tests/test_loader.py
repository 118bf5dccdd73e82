"""The prefetching loader: order, exactly ``count`` calls, waits counted, errors handed over, early exit."""

import threading
import time

import pytest

from seg.core.loader import Prefetcher


def test_batches_come_in_order_and_make_is_called_exactly_count_times():
    calls = []

    def make():
        calls.append(threading.current_thread().name)
        return len(calls)

    with Prefetcher(make, 5) as source:
        assert [source.next() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert len(calls) == 5 and set(calls) == {"seg-prefetch"}  # made off the training thread


def test_the_next_batch_is_made_while_the_consumer_works():
    made = []

    def make():
        made.append(time.perf_counter())
        return len(made)

    with Prefetcher(make, 3) as source:
        source.next()
        time.sleep(0.2)  # the step computes; batch 2 is made meanwhile
        start = time.perf_counter()
        source.next()
        assert made[1] < start  # it was ready before the consumer asked
    assert source.waited < 0.15


def test_waiting_is_counted():
    def make():
        time.sleep(0.1)
        return 0

    with Prefetcher(make, 3) as source:
        for _ in range(3):
            source.next()
    assert 0.25 < source.waited < 1.0


def test_a_failing_batch_raises_in_the_consumer():
    def make():
        raise ValueError("bad patch")

    with Prefetcher(make, 3) as source, pytest.raises(ValueError, match="bad patch"):
        source.next()


def test_leaving_early_stops_the_producer():
    with Prefetcher(lambda: 0, 1000) as source:
        source.next()
    assert not source._thread.is_alive()
