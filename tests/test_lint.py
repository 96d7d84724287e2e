"""The tree is lint clean (ruff) and formatted by one tool (pyink), as
`make lint` checks; here so that CI's `make test` checks it too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("ncjax", "tests", "configs", "launch", "benchmarks")


@pytest.mark.parametrize(
    "command", [("ruff", "check", "--output-format", "concise"), ("pyink", "--check", "--quiet")]
)
def test_tree_is_lint_clean_and_formatted(command):
  proc = subprocess.run(
      [sys.executable, "-m", *command, *PATHS],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, (
      f"`{' '.join(command[:2])}` found problems (`make format` fixes formatting):\n"
      + (proc.stdout + proc.stderr)[-3000:]
  )
