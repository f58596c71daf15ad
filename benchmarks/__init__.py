"""Benchmarks: scripts that time the project against its reference in the same run and print ratios.

Each runs as `python -m benchmarks.<name>`, prints readable lines, and ends with one `name=value` line
for scripts to pick up. Timings are never asserted in tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def median_seconds(
    candidates: Mapping[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, float]:
    """The median wall time of each candidate, over `repeats` rounds after `warmup` untimed ones.

    Rounds run every candidate once, in turn, so that a slow spell of a shared machine (another
    process, a busy neighbour VM) lands on all of them rather than on whichever ran then.
    """
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_ in range(warmup + repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
