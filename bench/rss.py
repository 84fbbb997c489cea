"""Peak resident memory of this process, sampled by a thread, optionally per named phase."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil

GIB = 1024**3


class PeakRss:
    """Highest RSS seen while the block runs; with `phase`, also the highest per phase name.

    `phase` is polled at every sample, so a phase shorter than the interval may be missed; for the
    overall peak the benches also read the kernel's own maximum (exporter.verify.peak_rss_bytes).
    """

    def __init__(self, interval_s: float = 0.02, phase: Callable[[], str | None] | None = None):
        self.process = psutil.Process()
        self.interval_s = interval_s
        self.phase = phase
        self.peak = 0
        self.by_phase: dict[str, int] = {}
        self._stop = threading.Event()

    def _record(self) -> None:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        name = self.phase() if self.phase else None
        if name is not None:
            self.by_phase[name] = max(self.by_phase.get(name, 0), rss)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self._record()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()
