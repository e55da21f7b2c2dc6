"""User errors in Prefect's logs: one line, no traceback, on every entry point (CLI, deployment, test)."""

from __future__ import annotations

import logging

from fairdiffusion.errors import FairDiffusionError

#: The loggers under which Prefect reports a failed task or flow run, traceback attached.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failed run's traceback; for bad input the message is the whole story."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FairDiffusionError):
            record.exc_info, record.exc_text = None, None
        return True


def log_user_errors_as_one_line() -> None:
    """Attach the filter to Prefect's run loggers once (each flow calls this first)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoTracebackForUserErrors) for f in logger.filters):
            logger.addFilter(NoTracebackForUserErrors())
