"""How a pipeline run ends in Prefect, and how user errors are logged (no server needed)."""

from __future__ import annotations

import logging
import sys

import pytest

from fairdiffusion.errors import ConfigError, GateRejected
from fairdiffusion.registry import schema
from fairdiffusion.registry.lineage import PromotionOutcome
from flows.states import final_state
from flows.user_errors import NoTracebackForUserErrors, log_user_errors_as_one_line


def _outcome(status: str) -> PromotionOutcome:
    return PromotionOutcome("fd", "2", False, status != "rejected", status, ["why"], "1", "run", "")


@pytest.mark.parametrize(
    ("status", "name"),
    [
        (schema.STATUS_SKIPPED, "Skipped"),
        (schema.STATUS_AWAITING_APPROVAL, "AwaitingApproval"),
        (schema.STATUS_CHAMPION, "Completed"),
    ],
)
def test_runs_that_did_their_job_end_completed_and_named(status: str, name: str) -> None:
    state = final_state(_outcome(status))
    assert state.is_completed() and state.name == name
    assert state.data == _outcome(status)


def test_a_rejected_gate_ends_failed_named_rejected_carrying_the_outcome() -> None:
    state = final_state(_outcome(schema.STATUS_REJECTED))
    assert state.is_failed() and state.name == "Rejected"
    assert state.message == "gate rejected fd v2, not promoted: why"
    assert isinstance(state.data, GateRejected) and state.data.outcome == _outcome(schema.STATUS_REJECTED)


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())


def test_user_errors_lose_their_traceback_and_bugs_keep_it() -> None:
    only = NoTracebackForUserErrors()
    user, bug = _record(ConfigError("bad key")), _record(KeyError("x"))
    assert only.filter(user) and user.exc_info is None
    assert only.filter(bug) and bug.exc_info is not None


def test_the_filter_is_attached_once() -> None:
    log_user_errors_as_one_line()
    log_user_errors_as_one_line()
    filters = logging.getLogger("prefect.flow_runs").filters
    assert sum(isinstance(f, NoTracebackForUserErrors) for f in filters) == 1
