"""The tree is clean under `ruff check` and `ruff format --check`."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


def _ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which(
        "ruff"
    )
    if exe:
        return [exe]
    return [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]])
def test_ruff_clean(args):
    result = subprocess.run(
        [*_ruff(), *args, "."],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
