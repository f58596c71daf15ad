"""Every CPU benchmark in one run, each headline filed with the host and the code that produced it.

    python -m benchmarks.all [--only train,book] [--skip book] [--out benchmarks/results] [--timeout-s 3600]
    python -m benchmarks.all --list

Runs the benchmarks of SUITE (the README's benchmark table, with the arguments its figures come from) one
after another, each in its own process: run side by side they would compete for the cores. On 2 cores
the whole suite takes about 50 minutes on an AMX host and 85 on an AVX512-BF16 one, the book's runs
(three seeds in bf16, one in fp32, and its curves over the same windows) more than half of it. Each one's
output (stdout and stderr) goes to `<out>/<run>/<entry>.log`, and its last line, `name=value`, is its
headline. `<out>/<run>.json` holds the host (CPU model, which bf16 hardware it has, threads, torch and
Python versions), the code (git commit, and whether the tree had uncommitted changes), and per benchmark
the headline, its exit code, its wall time, the load average before and after it, and the share of CPU
time the hypervisor stole for other machines while it ran (/proc/stat's steal): on a shared machine the
load is what a skeptic asks about first. `<run>` is the date, the host's class (AMX, AVX512-BF16,
AVX-512 or AVX2: what decides the training dtype, llm/hardware.py) and the commit, with `-2`, `-3`, ...
after it where that name is taken: no run overwrites another's.

The summary is rewritten after every benchmark, atomically: a suite stopped halfway keeps what finished.
A benchmark that fails or runs past `--timeout-s` is recorded with its exit code and the rest go on; the
suite's exit code is 1 if any failed. The default, an hour, is a guard against a hang: the book's entry
(three seeds of the book's fp32 loop) runs past half an hour where fp32 matmuls are slow (an AMD EPYC with
AVX512-BF16 and no AMX). The GPU benchmark is not in the suite: `scripts/gpu-check` runs it.
Last line: `benchmarks_failed=N`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llm.files import atomic_path, write_json_atomic
from llm.lineage import code_version

HEADLINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S+)$")


@dataclass(frozen=True)
class Entry:
    name: str  # how --only, --skip and the log's file name call it
    module: str  # benchmarks.<module>
    args: tuple[str, ...] = ()


SUITE: tuple[Entry, ...] = (
    Entry("train", "train"),
    Entry("train-fp32", "train", ("--dtype", "fp32")),
    Entry("book", "book", ("--seed", "123,124,125")),  # the equal-loss ratio hangs on the seed's draw
    Entry("book-fp32", "book", ("--precision", "fp32")),  # what a host without native bf16 trains in
    Entry("book-curves", "book_curves"),  # whether the book's equal-loss spread is the draw's
    Entry("breakdown-fp32", "breakdown", ("--dtype", "fp32", "--no-compile")),
    Entry("breakdown-book", "breakdown", ("--against", "book")),
    Entry("headgrad", "headgrad"),
    Entry("headblocks", "headblocks"),
    Entry("headsoftmax", "headsoftmax"),
    Entry("dropout", "dropout"),
    Entry("attention", "attention"),
    Entry("kvcache", "kvcache"),
    Entry("sampling", "sampling"),
    Entry("allocator", "allocator"),
    Entry("overhead", "overhead"),
    Entry("loader", "loader"),
    Entry("tokenize", "tokenize"),
)


def command_line(entry: Entry) -> str:
    return " ".join(["python -m", f"benchmarks.{entry.module}", *entry.args])


def host_class(capabilities: dict) -> str:
    """What computes bf16 here, the README's name for the host: AMX, AVX512-BF16, AVX-512 or AVX2."""
    if capabilities.get("amx_bf16"):
        return "AMX"
    if capabilities.get("avx512_bf16"):
        return "AVX512-BF16"
    if capabilities.get("avx512"):
        return "AVX-512"
    return "AVX2" if capabilities.get("avx2") else platform.machine()


def host_and_code() -> dict:
    capabilities = torch.cpu.get_capabilities()
    commit, uncommitted = code_version()
    return {
        "host": {
            "cpu": capabilities.get("cpu_name", platform.processor() or "unknown"),
            "class": host_class(capabilities),
            "avx512_bf16": bool(capabilities.get("avx512_bf16")),
            "amx_bf16": bool(capabilities.get("amx_bf16")),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "code": {"commit": commit, "uncommitted_changes": uncommitted},
    }


def last_headline(output: str) -> tuple[str, float] | None:
    """The benchmark's `name=value`, its last non-empty line, or None where it ended otherwise."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    match = HEADLINE.match(lines[-1]) if lines else None
    if match is None:
        return None
    try:
        return match[1], float(match[2])
    except ValueError:
        return None


def cpu_times() -> list[int] | None:
    """The machine's CPU time counters since boot (/proc/stat's first line, in clock ticks), or None
    where there is no /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(field) for field in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_percent(before: list[int] | None, after: list[int] | None) -> float | None:
    """Of the CPU time that passed between two readings, the share the hypervisor gave to other
    machines (/proc/stat's 8th field, steal): on a shared VM, how much neighbours took while a benchmark
    ran. None where the counters are missing or did not move."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    elapsed = [a - b for a, b in zip(after[:8], before[:8])]  # user .. steal; guest time is inside user
    total = sum(elapsed)
    return round(100 * elapsed[7] / total, 2) if total > 0 else None


def run_entry(entry: Entry, log: Path, timeout_s: float) -> dict:
    """Run one benchmark, its output into `log` (whole once renamed there); its record for the summary."""
    command = [sys.executable, "-m", f"benchmarks.{entry.module}", *entry.args]
    load_before, ticks_before = os.getloadavg(), cpu_times()
    started = time.perf_counter()
    with atomic_path(log) as tmp, open(tmp, "w", encoding="utf-8") as out:
        # A session of its own, so that a timeout stops the servers and workers it started too
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_code, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            exit_code, timed_out = None, True
        finally:
            if proc.poll() is None:  # past its time, or the suite itself interrupted (Ctrl-C reaches only us)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.flush()
        output = tmp.read_text(encoding="utf-8", errors="replace")
    headline = last_headline(output) if exit_code == 0 else None
    return {
        "command": command_line(entry),
        "headline": None if headline is None else {"name": headline[0], "value": headline[1]},
        "exit_code": exit_code,
        "timed_out": timed_out,
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_steal_percent": steal_percent(ticks_before, cpu_times()),
        "log": log.name,
    }


def failed(record: dict) -> bool:
    return record["exit_code"] != 0 or record["headline"] is None


def select(suite: Sequence[Entry], only: str | None, skip: str | None) -> list[Entry]:
    names = {entry.name for entry in suite}
    for option, value in (("--only", only), ("--skip", skip)):
        unknown = sorted(set(value.split(",")) - names) if value else []
        if unknown:
            raise SystemExit(f"{option}: no benchmark named {', '.join(unknown)} in the suite; "
                             f"the names are {', '.join(e.name for e in suite)}")
    chosen = [e for e in suite if not only or e.name in only.split(",")]
    return [e for e in chosen if not skip or e.name not in skip.split(",")]


def reserve_run(out: Path, base: str) -> str:
    """`base`, or `base-2`, `base-3`, ... where an earlier run of the same day, host and commit is filed;
    its log folder is created here, so that two suites started at once cannot take the same name."""
    out.mkdir(parents=True, exist_ok=True)
    run, n = base, 1
    while True:
        if not (out / f"{run}.json").exists():
            try:
                (out / run).mkdir()
                return run
            except FileExistsError:
                pass
        n += 1
        run = f"{base}-{n}"


def main(argv: list[str] | None = None, suite: Sequence[Entry] = SUITE) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names of the suite's entries to run (--list shows them)")
    parser.add_argument("--skip", help="comma-separated names to leave out")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the summary and the logs")
    parser.add_argument("--timeout-s", type=float, default=3600.0,
                        help="the most one benchmark may run (a guard against a hang, not a budget)")
    parser.add_argument("--list", action="store_true", help="print the suite's entries and commands, run nothing")
    args = parser.parse_args(argv)
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be positive, got {args.timeout_s}")
    entries = select(suite, args.only, args.skip)
    if args.list:
        for entry in entries:
            print(f"{entry.name:16} {command_line(entry)}")
        return 0

    summary = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               **host_and_code(), "benchmarks": {}}
    commit = (summary["code"]["commit"] or "nogit")[:7]
    out = Path(args.out)
    run = reserve_run(out, f"{summary['started'][:10]}-{summary['host']['class']}-{commit}")
    host = summary["host"]
    print(f"{host['cpu']} ({host['class']}), {host['torch_threads']} threads, torch {host['torch']}; "
          f"commit {commit}{' with uncommitted changes' if summary['code']['uncommitted_changes'] else ''}; "
          f"{len(entries)} benchmarks into {out / run}.json", flush=True)
    write_json_atomic(out / f"{run}.json", summary)  # from the start: a suite stopped early says so
    for entry in entries:
        print(f"{entry.name}: running ...", flush=True)
        record = run_entry(entry, out / run / f"{entry.name}.log", args.timeout_s)
        summary["benchmarks"][entry.name] = record
        write_json_atomic(out / f"{run}.json", summary)
        headline = record["headline"]
        outcome = (f"{headline['name']}={headline['value']:g}" if not failed(record) else
                   f"FAILED (timed out after {args.timeout_s:g} s)" if record["timed_out"] else
                   f"FAILED (exit code {record['exit_code']}, no name=value last line)" if record["exit_code"] == 0 else
                   f"FAILED (exit code {record['exit_code']})")
        load = f"load {record['load_average_before'][0]:.1f} -> {record['load_average_after'][0]:.1f}"
        if record["cpu_steal_percent"] is not None:
            load += f", {record['cpu_steal_percent']:g}% of CPU time stolen by the hypervisor"
        print(f"{entry.name}: {outcome} in {record['wall_s']:.0f} s ({load}); log {out / run / record['log']}",
              flush=True)
    failures = sum(failed(r) for r in summary["benchmarks"].values())
    print(f"benchmarks_failed={failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
