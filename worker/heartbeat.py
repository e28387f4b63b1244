"""A heartbeat on a thread of its own, so that a long batch, download or upload never looks like a dead worker."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds while the ``with`` block runs; stops once ``beat`` returns False.

    The thread needs the GIL only for a moment per beat, which torch, PIL, zlib and hashlib release
    while they work. A gap of more than two intervals between beats is logged: something held the
    GIL (or the database) that long, and a few such gaps in a row make a live worker look dead.
    """

    def __init__(self, name: str, interval: float, beat: Callable[[], bool]):
        self.name = name
        self.interval = interval
        self._beat = beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_until_stopped, name=f"heartbeat {name}", daemon=True)

    def _beat_until_stopped(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                if not self._beat():
                    return
            except Exception:  # the database may be briefly away; the next beat tries again
                log.exception("%s: heartbeat failed", self.name)
                continue
            now = time.monotonic()
            if now - last > 2 * self.interval:
                log.warning("%s: %.1f s between two heartbeats (interval %.1f s)", self.name, now - last, self.interval)
            last = now

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
