"""Data loading that overlaps the training step: the next batch is made in a background thread while the
current step computes.

``Prefetcher(make, count)`` calls ``make()`` exactly ``count`` times, in order, one batch ahead of the
consumer, and counts the seconds the consumer waited. A stage prefetches one epoch at a time: at an epoch's
end every batch has been consumed, so the random state a checkpoint saves is the one an uninterrupted run
would have at that point, and resume stays exact.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_DONE = object()


class Prefetcher:
    """``count`` batches of ``make()``, made in a background thread ``depth`` ahead (a context manager)."""

    def __init__(self, make: Callable[[], Any], count: int, depth: int = 1):
        self.make, self.count = make, count
        self.waited = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="seg-prefetch", daemon=True)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for _ in range(self.count):
                if self._stop.is_set() or not self._put(("batch", self.make())):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(("error", exc))
            return
        self._put(("done", _DONE))

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def next(self) -> Any:
        """The next batch (waiting for it if it is not made yet); the producer's exception if it failed."""
        start = time.perf_counter()
        kind, item = self._queue.get()
        self.waited += time.perf_counter() - start
        if kind == "error":
            raise item
        if kind == "done":
            raise RuntimeError(f"Prefetcher: all {self.count} batches were consumed")
        return item
