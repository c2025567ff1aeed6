"""Slow and GPU tests are skipped unless selected with -m; the markers are registered."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = """
import pytest

def test_fast():
    pass

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.gpu
def test_gpu():
    pass
"""


def run_pytest(tmp_path: Path, *args: str) -> str:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_sample.py", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_default_run_skips_slow_and_gpu(tmp_path):
    assert run_pytest(tmp_path).startswith("1 passed, 2 skipped")


def test_selecting_slow_runs_it(tmp_path):
    assert run_pytest(tmp_path, "-m", "slow").startswith("1 passed, 2 deselected")
