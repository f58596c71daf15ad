"""Prefect flows, one per pipeline stage: thin glue that loads params, calls `llm`, and writes outputs.

Run a stage with `python -m flows.<stage>` (that is what `dvc.yaml` does). With no `PREFECT_API_URL`,
Prefect starts a temporary local API for the run; set it to a running `prefect server start` to keep
the runs and skip that start-up.
"""

import os

# Set before Prefect is imported: offline, its telemetry logs an error on every run.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The library logs through the standard `llm.*` loggers; this sends those lines to Prefect's UI too.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "llm")

import logging as _logging


class _QuietTemporaryServerNotice(_logging.Filter):
    """Prefect prints its advice to run a dedicated server each time a stage starts a temporary one:
    five times a pipeline. The README says it once (\"What you can look at\"), so the stages drop it."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Starting temporary server on")


_logging.getLogger("prefect").addFilter(_QuietTemporaryServerNotice())
