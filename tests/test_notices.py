"""The stages do not repeat Prefect's advice to run a dedicated server (the README gives it once)."""

from __future__ import annotations

import logging

import flows  # noqa: F401  (installs the filter)


def test_the_temporary_server_notice_is_dropped_and_other_lines_kept(caplog):
    logger = logging.getLogger("prefect")
    with caplog.at_level(logging.INFO, logger="prefect"):
        logger.propagate, old = True, logger.propagate
        try:
            logger.info("Starting temporary server on http://127.0.0.1:8049\nSee https://www.prefect.io/docs")
            logger.info("Stopping temporary server on http://127.0.0.1:8049")
        finally:
            logger.propagate = old
    assert [r.getMessage() for r in caplog.records] == ["Stopping temporary server on http://127.0.0.1:8049"]
