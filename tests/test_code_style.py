"""ruff: the package, the tests and the tools are lint-clean and formatted, with the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUFF = Path(sys.executable).parent / "ruff"


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run(
        [str(RUFF), *command, "src", "tests", "tools"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, f"ruff {' '.join(command)} src tests tools:\n{result.stdout}{result.stderr}"
