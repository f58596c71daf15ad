"""The fixed cost of a stage: Prefect, MLflow and DVC around a stage that does no work.

    python -m benchmarks.overhead [--repeats 5]

In a temporary DVC project whose one stage is a no-op Prefect flow holding an MLflow run (as every
stage does), it times, in rounds that take each in turn (the host's noise falls on all alike), the median
of `--repeats`:
- `python -c pass`: the interpreter alone;
- the no-op stage with no server: Prefect starts a temporary one in the process, and the stage opens
  the SQLite store itself (a bare `dvc repro`);
- the same with a running `prefect server start` (PREFECT_API_URL set);
- the same with a running Prefect server and an `mlflow server` serving the SQLite store: what
  `scripts/pipeline` gives every stage (flows/server.py);
- the same with the stage's Prefect heartbeats on, as against a Prefect server the user runs (one that
  outlives the command; flows.common.run_stage leaves them off against scripts/pipeline's, which does
  not): what they add;
- `dvc repro -f` of the stage under those servers: DVC's own part on top.
Last line: `overhead_temporary_vs_servers=R`, how many times longer a stage's fixed cost is without the
servers than under scripts/pipeline's. The goal: at most 3 s a stage under them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows import RUN_SERVER_ENV
from flows.server import client_env, serving, start_mlflow, start_prefect

ROOT = Path(__file__).resolve().parents[1]


def noop_stage() -> None:
    """What the timed stage runs: a flow with an MLflow run around nothing."""
    from prefect import flow

    from flows.common import run_stage, tracked_run

    @flow(name="noop")
    def noop() -> None:
        with tracked_run("noop", out_dir="out", experiment="overhead", params_file="params.yaml",
                         params_to_log={"work": "none"}) as t:
            t.log_metrics({"work": 0.0}, step=0)

    run_stage(noop)  # as the stages run their flows: Prefect's heartbeats where they are wanted


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noop-stage", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.noop_stage:
        noop_stage()
        return

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
        (project / "params.yaml").write_text("tracking: {experiment: overhead}\n")
        stage = [sys.executable, "-m", "benchmarks.overhead", "--noop-stage"]
        (project / "dvc.yaml").write_text(f"stages:\n  noop:\n    cmd: {' '.join(stage)}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(project / ".prefect"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        timed(stage, project, env)  # first run: creates the stores and Prefect's database
        with serving([lambda: start_prefect(env), lambda: start_mlflow(env, project)]) as servers:
            prefect_env, both_env = {**env, **servers[0].env}, {**env, **client_env(servers)}
            lasting_env = {key: value for key, value in both_env.items() if key != RUN_SERVER_ENV}
            modes = {
                "python -c pass": ([sys.executable, "-c", "pass"], env),
                "no-op stage, no servers": (stage, env),
                "no-op stage, Prefect server": (stage, prefect_env),
                "no-op stage, Prefect and MLflow servers": (stage, both_env),
                "no-op stage, both servers, heartbeats on": (stage, lasting_env),
                "dvc repro -f of it, both servers": ([sys.executable, "-m", "dvc", "repro", "-f", "-q"], both_env),
            }
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode, (command, mode_env) in modes.items():
                    times[mode].append(timed(command, project, mode_env))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    for mode, values in times.items():
        print(f"{mode + ':':42s} {median[mode]:6.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    stage_s = median["no-op stage, Prefect and MLflow servers"]
    print(f"the MLflow server saves a stage {median['no-op stage, Prefect server'] - stage_s:.2f} s; paired rounds: "
          + ", ".join(f"{p / b:.2f}x" for p, b in zip(times["no-op stage, Prefect server"],
                                                       times["no-op stage, Prefect and MLflow servers"])))
    print(f"Prefect's heartbeats, against a server that outlives the command, add "
          f"{median['no-op stage, both servers, heartbeats on'] - stage_s:+.2f} s; paired rounds: "
          + ", ".join(f"{h - b:+.2f}" for h, b in zip(times["no-op stage, both servers, heartbeats on"],
                                                     times["no-op stage, Prefect and MLflow servers"])))
    print(f"a stage's fixed cost under scripts/pipeline's servers: {stage_s:.2f} s (goal: at most 3 s); "
          f"DVC's own part on top: {median['dvc repro -f of it, both servers'] - stage_s:+.2f} s")
    print(f"overhead_temporary_vs_servers={median['no-op stage, no servers'] / stage_s:.2f}")


if __name__ == "__main__":
    main()
