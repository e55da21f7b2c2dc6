"""Progress bars stay out of logs and pipes."""

from __future__ import annotations

import io

import pytest

from fairdiffusion.evaluation.progress import progress_bar


def test_the_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    with progress_bar(3, "features", "image") as bar:
        bar.update(3)
    assert bar.disable and piped.getvalue() == ""
