"""The package layout's promises: the stage arrows hold, and light tasks load no deep-learning stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_import_contracts_hold() -> None:
    """`lint-imports` checks the arrows of pyproject's [tool.importlinter] (data -> ... -> registry)."""
    done = subprocess.run([str(BIN / "lint-imports")], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("module", ["tasks.data", "fairdiffusion.registry.skip", "fairdiffusion.data.versioning"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    """Reading the champion or the data version must not load torch, diffusers or accelerate."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
