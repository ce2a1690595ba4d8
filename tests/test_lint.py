"""The code passes ruff (pyflakes' mistakes, pycodestyle's layout), configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
