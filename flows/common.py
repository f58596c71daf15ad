"""What every stage flow shares: its logger and how it writes metrics."""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from llm.files import write_json_atomic


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (its lines reach the Prefect UI), else a plain one."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("flows")


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics file for `dvc metrics show/diff`, written atomically."""
    write_json_atomic(path, metrics)
