"""Serve the pipeline flow on the cron schedule in params.yaml, so that Prefect runs it on time.

Scheduling needs a Prefect server (the temporary one a plain flow run starts cannot schedule):

    prefect server start --background                        # API and UI on http://127.0.0.1:4200
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.schedule                                 # serves until stopped (Ctrl-C)

The deployment is `pipeline/<schedule.deployment>`; start a run now with
`prefect deployment run pipeline/scheduled`. To run it under a work pool instead of this process, see
the README ("On a schedule").
"""

from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.pipeline import pipeline
from llm.config import ScheduleConfig, load_params


def deployment(schedule: ScheduleConfig, repo: Path) -> RunnerDeployment:
    return pipeline.to_deployment(
        name=schedule.deployment, schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"repo": str(repo.resolve()), "push": schedule.push},
        description=f"dvc repro{' and dvc push' if schedule.push else ''} in {repo.resolve()}",
    )


def main(repo: str = ".") -> None:
    schedule = load_params(Path(repo) / "params.yaml").schedule
    serve(deployment(schedule, Path(repo)))


if __name__ == "__main__":
    main()
