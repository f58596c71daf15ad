"""Benchmarks: scripts that time the project against its reference in the same run and print ratios.

Each runs as `python -m benchmarks.<name>`, prints readable lines, and ends with one `name=value` line
for scripts to pick up. Timings are never asserted in tests.

On a shared machine (a VM whose host is busy) single runs can be several times slower than the
rest; the scripts print each candidate's fastest and slowest repeat beside the median so a noisy
run shows as one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median: float  # seconds
    fastest: float
    slowest: float

    def __str__(self) -> str:
        return f"{self.median * 1e3:8.1f} ms (repeats {self.fastest * 1e3:.1f} to {self.slowest * 1e3:.1f})"


def time_interleaved(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, Timing]:
    """Time each candidate `repeats` times after `warmup` untimed rounds.

    Rounds run every candidate once, in turn, so that a slow spell of the machine lands on all of
    them rather than on whichever happened to run then.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(ts), min(ts), max(ts)) for name, ts in times.items()}
