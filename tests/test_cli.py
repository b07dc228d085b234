"""The experiment as a user runs it: a subprocess, flags, exit codes, one-line errors, resume."""

import os
import subprocess
import sys

import pytest

from bigjax import metrics
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = os.path.join(REPO, "experiments", "configs", "transformer_tiny.flags")


def _run(*flags, devices=1):
  env = cpu_env(devices)
  return subprocess.run(
      [sys.executable, "-m", "experiments.transformer", *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _assert_one_line_error(result, code, message):
  assert result.returncode == code, result.stderr
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr


# The tiny flagfile's model and batch shrunk to seconds (add --data_dir and a workdir).
TINY_RUN = [
    f"--flagfile={TINY_FLAGS}",
    "--seq_len=32",
    "--batch_size=8",
    "--model_override=num_layers=1",
    "--model_override=embed_dim=32",
    "--model_override=mlp_dim=64",
    "--eval_batches=2",
]


@pytest.fixture
def tiny(tmp_path, data_dir):
  """TINY_RUN with its own workdir and the shared data dir."""
  return [*TINY_RUN, f"--workdir={tmp_path}", f"--data_dir={data_dir}", "--log_every=1"]


def test_tiny_run_checkpoints_and_a_rerun_resumes_at_the_next_step(tmp_path, tiny):
  first = _run(*tiny, "--num_steps=4", "--checkpoint_every=2", "--eval_every=2")
  assert first.returncode == 0, first.stderr
  assert "step 4/4" in first.stdout and "tokens/s" in first.stdout
  # The flagfile's XLA option is applied and said
  assert (
      "; XLA option xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE" in first.stdout
  )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  second = _run(*tiny, "--num_steps=6", "--checkpoint_every=2", "--eval_every=2")
  assert second.returncode == 0, second.stderr
  assert "resumed from step 4" in second.stdout
  assert "step 1/6" not in second.stdout and "step 5/6" in second.stdout
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all("eval_bits_per_byte" in r for r in rows if r["step"] % 2 == 0)
  sampled = _run(
      *tiny,
      "--mode=sample",
      "--prompt=import ",
      "--num_tokens=12",
      "--temperature=0",
      "--num_samples=2",
  )
  assert sampled.returncode == 0, sampled.stderr
  assert "step 6 checkpoint" in sampled.stdout and sampled.stdout.count("import ") == 2


def test_unknown_model_lists_the_known_ones(tiny):
  result = _run(*tiny, "--model=gpt5")
  _assert_one_line_error(result, 1, "unknown model 'gpt5'; known models: ")
  assert "gpt2-small" in result.stderr and "transformer-tiny" in result.stderr


def test_mesh_that_does_not_fit_the_devices(tiny):
  _assert_one_line_error(
      _run(*tiny, "--mesh=data:3,fsdp:1,tensor:1", devices=8),
      1,
      "the axes multiply to 3 but there are 8 devices",
  )


def test_batch_that_does_not_divide(tiny):
  _assert_one_line_error(
      _run(*tiny, "--batch_size=6", "--mesh=data:-1,fsdp:2", devices=8),
      1,
      "--batch_size=6 does not divide over the 8 data-parallel devices",
  )


def test_unreadable_flagfile(tmp_path):
  result = _run(f"--flagfile={tmp_path}/missing.flags")
  _assert_one_line_error(result, 2, "error: Unable to open flagfile")
  assert "missing.flags" in result.stderr and "ERROR::" not in result.stderr


def test_bad_flag_value(tiny):
  _assert_one_line_error(_run(*tiny, "--optimizer=adamx"), 2, "adamx")


def test_missing_required_flag(tmp_path):
  _assert_one_line_error(
      _run(f"--workdir={tmp_path}"), 1, "missing required flag(s) --model, --dataset"
  )


def _run_experiment(module, *flags):
  env = cpu_env()
  return subprocess.run(
      [sys.executable, "-m", module, *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def test_cnn_experiment_reports_accuracy(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.cnn",
      f"--flagfile={REPO}/experiments/configs/cnn_tiny.flags",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=30",
      "--eval_every=30",
      "--log_every=10",
  )
  assert result.returncode == 0, result.stderr
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert rows[-1]["step"] == 30 and rows[-1]["eval_accuracy"] > 0.5
  assert {"train_loss", "train_accuracy", "eval_loss", "images_per_sec"} <= set(rows[-1])


def test_rnn_experiment_trains_a_language_model(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.rnn",
      f"--flagfile={REPO}/experiments/configs/lstm_lm_tiny.flags",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=3",
      "--seq_len=32",
      "--batch_size=8",
      "--model_override=hidden_size=32",
      "--eval_every=3",
      "--eval_batches=2",
      "--log_every=1",
  )
  assert result.returncode == 0, result.stderr
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert rows[-1]["step"] == 3 and 0 < rows[-1]["eval_bits_per_byte"] < 10


def test_mlp_experiment_defaults_to_the_mlp(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.mlp",
      "--dataset=sklearn_digits",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=5",
      "--log_every=5",
  )
  assert result.returncode == 0, result.stderr
  assert "model: 85,002 parameters" in result.stdout


def test_image_of_the_wrong_shape_is_a_one_line_error(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.cnn",
      "--model=resnet18",
      "--dataset=sklearn_digits",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--num_steps=1",
  )
  _assert_one_line_error(
      result, 1, "images have shape (1, 8, 8, 1) but the model expects [batch, 224, 224, 3]"
  )
  assert "--model_override='input_shape=(8, 8, 1)'" in result.stderr


def test_tensorboard_events_and_the_flagfile_repeat_the_run(tmp_path, tiny):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  result = _run(*tiny, "--num_steps=4", "--eval_every=2", "--learning_rate=0.005")
  assert result.returncode == 0, result.stderr
  events = EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  scalars = events.Tags()["scalars"]
  assert {"train_loss", "eval_loss", "eval_bits_per_byte", "tokens_per_sec"} <= set(scalars)
  assert [e.step for e in events.Scalars("train_loss")] == [1, 2, 3, 4]
  assert [e.step for e in events.Scalars("eval_loss")] == [2, 4]
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [e.value for e in events.Scalars("eval_loss")] == pytest.approx(
      [r["eval_loss"] for r in rows if "eval_loss" in r]
  )
  saved = (tmp_path / "flags.txt").read_text()
  assert "--learning_rate=0.005" in saved and "--num_steps=4" in saved
  assert "--nohelp" not in saved  # absl's own flags, left at their defaults, are not the run's
  assert "GFLOP per step" in result.stdout and "done: steps 1-4" in result.stdout
  # The saved flags alone repeat the run exactly.
  again = _run(f"--flagfile={tmp_path / 'flags.txt'}", f"--workdir={tmp_path / 'again'}")
  assert again.returncode == 0, again.stderr
  assert (
      metrics.read_jsonl(tmp_path / "again" / "metrics.jsonl")[-1]["train_loss"]
      == rows[-1]["train_loss"]
  )


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny):
  good = _run(*tiny, "--num_steps=3", "--checkpoint_every=3")
  assert good.returncode == 0, good.stderr
  poisoned = _run(*tiny, "--num_steps=8", "--checkpoint_every=1", "--learning_rate=1e38")
  _assert_one_line_error(poisoned, 1, "training became non-finite at step 4")
  assert "last good checkpoint is step 3" in poisoned.stderr
  evaluated = _run(*tiny, "--num_steps=8", "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr
  assert "step 3/3" in evaluated.stdout and "nan" not in evaluated.stdout.lower()


def test_xla_options_are_parsed_and_a_bad_one_is_one_line(tiny):
  _assert_one_line_error(
      _run(*tiny, "--xla_option=xla_cpu_enable_fast_math"),
      1,
      "--xla_option='xla_cpu_enable_fast_math' must look like NAME=VALUE",
  )
  _assert_one_line_error(
      _run(*tiny, "--xla_option=xla_cpu_enable_fast_math=maybe"),
      1,
      "xla_cpu_enable_fast_math, 'maybe' is not a valid bool value",
  )


def test_saved_flags_list_ours_always_and_other_modules_only_where_set():
  from absl import flags as absl_flags
  from bigjax import flags as bigjax_flags

  values = absl_flags.FlagValues()
  absl_flags.DEFINE_integer("steps", 10, "", flag_values=values, module_name="bigjax.flags")
  absl_flags.DEFINE_string(
      "unset_path", None, "", flag_values=values, module_name="experiments.cnn"
  )
  absl_flags.DEFINE_integer("threads", 64, "", flag_values=values, module_name="grain.config")
  absl_flags.DEFINE_bool(
      "debug", False, "", flag_values=values, module_name="tensorflow_datasets.core"
  )
  values(["prog", "--debug"])
  assert bigjax_flags.run_flags_text(values) == "--steps=10\n--debug\n"


_FORK_MODULE = """
import flax.linen as nn
from bigjax import models
from bigjax.nn import transformer

@models.register("fork-lm")
def fork_lm(**overrides):
  return transformer.TransformerLM(transformer.TransformerConfig(**{
      "vocab_size": 256, "num_layers": 1, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64, "max_len": 64,
      "position": "rotary", "num_kv_heads": 1, **overrides}))

class NoSegmentsLM(nn.Module):  # declares no takes_segment_ids
  config: transformer.TransformerConfig

  @nn.compact
  def __call__(self, tokens_BT, *, train: bool = False):
    return transformer.TransformerLM(self.config, name="lm")(tokens_BT, train=train)

@models.register("fork-lm-without-segments")
def fork_lm_without_segments(**overrides):
  return NoSegmentsLM(fork_lm(**overrides).config)
"""


def test_a_preset_registered_in_a_module_of_your_own_trains_with_import_modules(tmp_path, tiny):
  (tmp_path / "my_presets.py").write_text(_FORK_MODULE)
  env = cpu_env(PYTHONPATH=str(tmp_path))
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "experiments.transformer", *tiny, *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  trained = run("--import_modules=my_presets", "--model=fork-lm", "--num_steps=2")
  assert trained.returncode == 0, trained.stderr
  assert "step 2/2" in trained.stdout and "segment_ids_BT" not in trained.stdout
  assert "--import_modules=my_presets" in (tmp_path / "flags.txt").read_text()
  # A model that cannot keep attention inside documents says so instead of silently mixing them.
  unmasked = run(
      "--import_modules=my_presets",
      "--model=fork-lm-without-segments",
      "--num_steps=2",
      f"--workdir={tmp_path / 'unmasked'}",
  )
  assert unmasked.returncode == 0, unmasked.stderr
  assert "note: NoSegmentsLM does not declare takes_segment_ids" in unmasked.stdout
  missing = run("--import_modules=not_my_presets", "--model=fork-lm", "--num_steps=2")
  _assert_one_line_error(missing, 1, "--import_modules: cannot import 'not_my_presets'")
