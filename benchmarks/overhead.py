"""The fixed cost of a stage: Prefect, MLflow and DVC around a stage that does no work.

    python -m benchmarks.overhead [--repeats 3]

In a temporary DVC project whose one stage is a no-op Prefect flow holding an MLflow run (as every
stage does), it times, each the median of `--repeats` runs:
- `python -c pass`: the interpreter alone;
- the no-op stage's process with no Prefect server: Prefect starts a temporary one in the process;
- the same with a running `prefect server start` (PREFECT_API_URL set), as the README recommends;
- `dvc repro -f` of the stage with the server running: DVC's own part on top.
Last line: `overhead_temporary_vs_server=R`, how many times longer a stage's fixed cost is without a
running server.
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

from flows.server import prefect_server

ROOT = Path(__file__).resolve().parents[1]


def noop_stage() -> None:
    """What the timed stage runs: a flow with an MLflow run around nothing."""
    from prefect import flow

    from flows.common import tracked_run

    @flow(name="noop")
    def noop() -> None:
        with tracked_run("noop", out_dir="out", experiment="overhead", params_file="params.yaml",
                         params_to_log={"work": "none"}) as t:
            t.log_metrics({"work": 0.0}, step=0)

    noop()


def timed(command: list[str], cwd: Path, env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
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
        timed(stage, project, env, 1)  # first run: creates the stores and Prefect's database
        bare = timed([sys.executable, "-c", "pass"], project, env, args.repeats)
        temporary = timed(stage, project, env, args.repeats)
        with prefect_server(env) as api:  # as scripts/pipeline starts one for the whole run
            with_server = timed(stage, project, {**env, "PREFECT_API_URL": api}, args.repeats)
            with_dvc = timed([sys.executable, "-m", "dvc", "repro", "-f", "-q"], project,
                             {**env, "PREFECT_API_URL": api}, args.repeats)
    print(f"python -c pass:                              {bare:6.2f} s")
    print(f"no-op stage, temporary Prefect server:       {temporary:6.2f} s")
    print(f"no-op stage, running Prefect server:         {with_server:6.2f} s")
    print(f"dvc repro -f of it, running Prefect server:  {with_dvc:6.2f} s (DVC's own part: "
          f"{with_dvc - with_server:+.2f} s, within the noise of a few tenths)")
    print(f"overhead_temporary_vs_server={temporary / with_server:.2f}")


if __name__ == "__main__":
    main()
