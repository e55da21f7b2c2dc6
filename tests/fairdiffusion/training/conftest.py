"""Fixtures of the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from accelerate.state import AcceleratorState, GradientState


def _reset_accelerate() -> None:
    # Private accelerate API, on purpose and only here: the library never resets a
    # process's accelerate state (that would wipe a caller's own set-up). The process
    # group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """Each test may train with its own precision: accelerate's process-wide state is reset around it.

    Reset after the test too, so that the tests of other folders that train in this
    process (integration, CLI) do not inherit, say, bf16.
    """
    _reset_accelerate()
    yield
    _reset_accelerate()
