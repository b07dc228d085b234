"""The repository's own style, checked where the tests run: pyink's formatting and ruff's lint
(configured in pyproject.toml). A failure lists the files; `pyink . && ruff check --fix .` mends
most of it."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(*command):
  return subprocess.run(
      [sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_every_python_file_is_formatted_by_pyink():
  result = _run("pyink", "--check", ".")
  assert result.returncode == 0, result.stderr[-4000:]


def test_ruff_finds_nothing():
  result = _run("ruff", "check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout[-4000:]
