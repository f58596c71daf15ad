"""What the benchmarks share: measuring one side in its own process, and printing results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


def run_worker(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run `python -m module args` and return its last stdout line (JSON) with its peak RSS in MiB.

    Each side runs in a process of its own so that its peak memory is its own and not the other side's.
    """
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


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


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout."""
    print(json.dumps(result), flush=True)
