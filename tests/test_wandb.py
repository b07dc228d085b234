"""--wandb_project: the metrics in a Weights & Biases run, tested in wandb's offline mode and read
back with wandb's own reader of its run files (`wandb leet inspect --json`, a public command)."""

import glob
import json
import os
import subprocess
import sys

import pytest

from bigjax import metrics
from tests.test_cli import TINY_RUN
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """wandb writes runs locally, and keeps its settings and caches in tmp_path."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.delenv("WANDB_DIR", raising=False)  # the run's files then go to WORKDIR/wandb
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(tmp_path / name.lower()))


def _records(wandb_file: str) -> list[dict]:
  result = subprocess.run(
      [sys.executable, "-m", "wandb", "leet", "inspect", wandb_file, "--json"],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert result.returncode == 0, result.stderr
  return [json.loads(line) for line in result.stdout.splitlines()]


def _history(records: list[dict]) -> dict[int, dict]:
  return {r["history"]["step"]["num"]: r["history"]["item"] for r in records if "history" in r}


def test_an_offline_run_holds_the_metrics_and_flags_and_a_resume_continues_it(
    tmp_path, data_dir, offline
):
  workdir = tmp_path / "run"
  tiny = [*TINY_RUN, f"--workdir={workdir}", f"--data_dir={data_dir}", "--log_every=1"]
  for num_steps in (3, 5):
    result = _run(*tiny, f"--num_steps={num_steps}", "--wandb_project=bigjax-test")
    assert result.returncode == 0, result.stderr
  run_id = (workdir / metrics.WANDB_RUN_ID_FILE).read_text().strip()
  # One local run directory per process, both of the same W&B run.
  files = sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "*.wandb")))
  assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
  first, resumed = (_records(f) for f in files)
  start = next(r["run"] for r in resumed if "run" in r)
  assert start["run_id"] == run_id and start["resume"] and start["project"] == "bigjax-test"
  config = start["config"]["update"]
  assert (
      config["seq_len"] == 32
      and config["num_steps"] == 5
      and config["model_override"]
      == [
          "num_layers=1",
          "embed_dim=32",
          "mlp_dim=64",
      ]
  )
  logged = {**_history(first), **_history(resumed)}
  rows = metrics.read_jsonl(workdir / metrics.METRICS_FILE)
  assert sorted(_history(first)) == [1, 2, 3] and sorted(_history(resumed)) == [4, 5]
  assert [logged[r["step"]]["train_loss"] for r in rows] == [r["train_loss"] for r in rows]
  assert logged[5]["eval_loss"] == rows[-1]["eval_loss"]


def test_without_the_package_the_flag_is_one_line_naming_the_extra(tmp_path, data_dir, monkeypatch):
  # A wandb that cannot be imported, found first on the path.
  (tmp_path / "wandb").mkdir()
  (tmp_path / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
  monkeypatch.setenv(
      "PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
  )
  tiny = [*TINY_RUN, f"--workdir={tmp_path / 'run'}", f"--data_dir={data_dir}", "--num_steps=1"]
  _assert_one_line_error(
      _run(*tiny, "--wandb_project=bigjax-test"),
      1,
      '--wandb_project needs the wandb package: pip install -e ".[wandb]"',
  )
