"""Checkpoints that never lose work: kill -9, SIGTERM, damaged saves, another mesh."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax import checkpoint
from bigjax import metrics
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import pipeline
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12

EXPERIMENTS = {
    "transformer": [
        "experiments.transformer",
        "--flagfile=experiments/configs/transformer_tiny.flags",
        "--seq_len=32",
        "--batch_size=8",
        "--model_override=num_layers=1",
        "--model_override=embed_dim=32",
        "--model_override=mlp_dim=64",
        "--eval_batches=2",
    ],
    "cnn": [
        "experiments.cnn",
        "--flagfile=experiments/configs/cnn_tiny.flags",
        "--batch_size=16",
        "--eval_batches=2",
    ],
}
# LoRA with adapter dropout and a parameter average evaluated: adapters, their optimizer state, the
# average and the dropout draws must all resume exactly.
EXPERIMENTS["transformer-lora-ema"] = EXPERIMENTS["transformer"] + [
    "--lora_rank=4",
    "--lora_dropout=0.1",
    "--learning_rate=0.01",
    "--ema_decay=0.9",
    "--eval_with_ema",
]


def _command(kind, workdir, data_dir, *extra):
  module, *flags = EXPERIMENTS[kind]
  return [
      sys.executable,
      "-m",
      module,
      *flags,
      f"--workdir={workdir}",
      f"--data_dir={data_dir}",
      f"--num_steps={NUM_STEPS}",
      "--checkpoint_every=3",
      "--eval_every=6",
      "--log_every=1",
      *extra,
  ]


def _env():
  return cpu_env()


def _run(kind, workdir, data_dir, *extra):
  result = subprocess.run(
      _command(kind, workdir, data_dir, *extra),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr
  return result


def _start(kind, workdir, data_dir, *extra):
  return subprocess.Popen(
      _command(kind, workdir, data_dir, *extra),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _wait_for_step(workdir, step, process, timeout=300):
  """Polls metrics.jsonl until `step` is logged."""
  path = os.path.join(workdir, metrics.METRICS_FILE)
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, process.communicate()
    if os.path.exists(path) and any(r["step"] >= step for r in metrics.read_jsonl(path)):
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} never logged")


def _params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state")
  )
  return restored["params"], restored.get("model_state", {})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  """finished_run(kind): the workdir of one unbroken NUM_STEPS run of `kind` (checkpoints at 6, 9
  and 12), trained once per test process; copy it before changing it."""
  workdirs = {}

  def get(kind):
    if kind not in workdirs:
      workdirs[kind] = tmp_path_factory.mktemp(f"finished-{kind}")
      _run(kind, workdirs[kind], data_dir)
    return workdirs[kind]

  return get


def _copy_of(workdir, tmp_path):
  return shutil.copytree(workdir, tmp_path / "run")


# The plain transformer's path is the LoRA run's with every parameter trained; the CNN trains every
# parameter, with batch statistics besides.
@pytest.mark.parametrize("kind", ["cnn", "transformer-lora-ema"])
def test_killed_run_resumes_bitwise_equal_to_an_unbroken_one(
    kind, tmp_path, data_dir, finished_run
):
  unbroken = finished_run(kind)
  kill_after = random.Random().randint(4, NUM_STEPS - 2)  # after the first save, at step 3
  print(f"killing at step {kill_after}")
  process = _start(kind, tmp_path / "broken", data_dir)
  _wait_for_step(tmp_path / "broken", kill_after, process)
  while not (tmp_path / "broken" / "checkpoints" / "3").is_dir():  # the first save has landed
    assert process.poll() is None
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  resumed = _run(kind, tmp_path / "broken", data_dir)
  assert "resumed from step" in resumed.stdout
  assert "took over the lock" in resumed.stderr  # the killed run's lock does not keep its workdir
  rows = metrics.read_jsonl(tmp_path / "broken" / metrics.METRICS_FILE)
  assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))
  unbroken_rows = metrics.read_jsonl(unbroken / metrics.METRICS_FILE)
  assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in unbroken_rows]
  got, want = _params(tmp_path / "broken", NUM_STEPS), _params(unbroken, NUM_STEPS)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path, data_dir):
  process = _start(
      "transformer", tmp_path, data_dir, "--num_steps=100000", "--checkpoint_every=1000"
  )
  _wait_for_step(tmp_path, 5, process)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr
  saved = int(stdout.split("SIGTERM: saved step ")[1].split()[0])
  assert saved >= 5
  assert str(saved) in os.listdir(tmp_path / "checkpoints")
  resumed = _run("transformer", tmp_path, data_dir, f"--num_steps={saved + 2}")
  assert f"resumed from step {saved}" in resumed.stdout


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir, finished_run):
  workdir = _copy_of(finished_run("transformer"), tmp_path)
  state_dir = workdir / "checkpoints" / str(NUM_STEPS) / "state"
  for root, _, files in os.walk(state_dir):  # cut every data file short, as a full disk would
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
  shutil.rmtree(state_dir / "d", ignore_errors=True)
  resumed = _run("transformer", workdir, data_dir, f"--num_steps={NUM_STEPS + 2}")
  assert f"checkpoint step {NUM_STEPS}" in resumed.stderr and "unreadable" in resumed.stderr
  assert f"resumed from step {NUM_STEPS - 3}" in resumed.stdout
  steps = [r["step"] for r in metrics.read_jsonl(workdir / metrics.METRICS_FILE)]
  assert steps == list(range(1, NUM_STEPS + 3))


def test_resuming_with_other_optimizer_flags_is_refused_and_changes_nothing(
    tmp_path, data_dir, finished_run
):
  workdir = _copy_of(finished_run("transformer"), tmp_path)
  before = {name: (workdir / name).read_text() for name in ("flags.txt", metrics.METRICS_FILE)}
  steps_before = sorted(os.listdir(workdir / "checkpoints"))
  refused = subprocess.run(
      _command("transformer", workdir, data_dir, f"--num_steps={NUM_STEPS + 3}", "--optimizer=sgd"),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
  error = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
  assert (
      len(error) == 1
      and error[0].startswith(f"error: checkpoint step {NUM_STEPS} in ")
      and "opt_state/" in error[0]
  )
  assert f"--flagfile={workdir}/flags.txt" in error[0]
  # Nothing set aside as "unreadable"
  assert sorted(os.listdir(workdir / "checkpoints")) == steps_before
  assert {name: (workdir / name).read_text() for name in before} == before
  again = _run("transformer", workdir, data_dir, "--num_steps=2")
  assert (
      f"nothing to train: the checkpoint in {workdir}/checkpoints is at step {NUM_STEPS} and --num_steps=2"
      in again.stdout
  )
  assert {name: (workdir / name).read_text() for name in before} == before


def test_loading_another_models_checkpoint_names_the_first_difference(tmp_path, data_dir):
  _, eval_data, tx = _fit_tiny(tmp_path, data_dir, _tiny_lm(), num_steps=2)
  config = train.TrainConfig(workdir=str(tmp_path), num_steps=2, batch_size=8)
  mesh = sharding.make_mesh("data:-1")
  with (
      train.mesh_context(mesh),
      pytest.raises(
          UserError,
          match=r"checkpoint step 2 in .* does not fit the state these flags build "
          r"\(params/block_0/mlp/wi/bias: saved float32\[64\], this run float32\[128\] and 8 more",
      ),
  ):
    train.load_checkpoint(
        model=_tiny_lm(mlp_dim=128),
        task=tasks.LanguageModelling(),
        tx=tx,
        example_batch=eval_data[0],
        config=config,
        mesh=mesh,
    )
  with pytest.raises(UserError, match="no checkpoint in .*; train first"):
    train.load_checkpoint(
        model=_tiny_lm(),
        task=tasks.LanguageModelling(),
        tx=tx,
        example_batch=eval_data[0],
        config=train.TrainConfig(workdir=str(tmp_path / "new"), num_steps=2, batch_size=8),
        mesh=mesh,
    )
  assert not os.path.exists(tmp_path / "new")


def test_state_differences_name_dtype_shape_and_structure():
  saved = checkpoint.leaf_arrays(
      {"params": {"w": np.zeros((2, 3), np.float32)}, "opt_state": ({"mu": np.zeros(3)},)}
  )
  expected = checkpoint.leaf_arrays(
      {
          "params": {"w": jax.numpy.zeros((2, 3), jax.numpy.bfloat16)},
          "opt_state": ({"nu": np.zeros(3)},),
      }
  )
  assert checkpoint.state_differences(saved, expected) == [
      "params/w: saved float32[2, 3], this run bfloat16[2, 3]",
      "opt_state/0/mu only in the checkpoint",
      "opt_state/0/nu only in this run",
  ]


def test_evaluation_skips_a_damaged_newest_step_without_renaming_it(tmp_path, data_dir):
  _, eval_data, tx = _fit_tiny(tmp_path, data_dir, _tiny_lm(), num_steps=2)
  _fit_tiny(tmp_path, data_dir, _tiny_lm(), num_steps=4)
  for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
    for name in files:
      if name.startswith("ocdbt") or "manifest" in name or root.endswith("d"):
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(1)
  config = train.TrainConfig(workdir=str(tmp_path), num_steps=4, batch_size=8)
  mesh = sharding.make_mesh("data:-1")
  with train.mesh_context(mesh):
    _, step, _ = train.load_checkpoint(
        model=_tiny_lm(),
        task=tasks.LanguageModelling(),
        tx=tx,
        example_batch=eval_data[0],
        config=config,
        mesh=mesh,
    )
  assert step == 2
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_fsdp_checkpoint_restores_on_one_device_with_the_same_eval_loss(tmp_path, data_dir):
  model = models.create(
      "transformer-tiny", num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, max_len=32
  )
  task = tasks.LanguageModelling()
  config = train.TrainConfig(
      workdir=str(tmp_path), num_steps=4, batch_size=8, eval_every=4, checkpoint_every=4
  )
  tx = optim.make_optimizer(optim.OptimConfig(warmup_steps=0), config.num_steps)
  eval_data = pipeline.eval_batches(
      lm.open_windows("python_stdlib_text", "validation", 32, data_dir), 8, max_batches=3
  )
  train_windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  record = train.fit(
      model=model,
      task=task,
      tx=tx,
      train_data=pipeline.train_batches(train_windows, 8, seed=0),
      eval_data=eval_data,
      config=config,
      mesh=sharding.make_mesh("data:2,fsdp:4,tensor:1"),
  )
  one_device = sharding.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
  restored = train.evaluate_checkpoint(
      model=model, task=task, tx=tx, eval_data=eval_data, config=config, mesh=one_device
  )
  assert restored["step"] == 4
  np.testing.assert_allclose(restored["eval_loss"], record["eval_loss"], rtol=1e-6)
  back_to_eight = train.evaluate_checkpoint(
      model=model,
      task=task,
      tx=tx,
      eval_data=eval_data,
      config=config,
      mesh=sharding.make_mesh("data:1,fsdp:4,tensor:2"),
  )
  np.testing.assert_allclose(back_to_eight["eval_loss"], record["eval_loss"], rtol=1e-6)


def _tiny_lm(**overrides):
  return models.create(
      "transformer-tiny",
      **{
          "num_layers": 1,
          "embed_dim": 32,
          "num_heads": 4,
          "mlp_dim": 64,
          "max_len": 32,
          **overrides,
      },
  )


def _fit_tiny(workdir, data_dir, model, num_steps=4, init_from=None):
  task = tasks.LanguageModelling()
  config = train.TrainConfig(
      workdir=str(workdir),
      num_steps=num_steps,
      batch_size=8,
      eval_every=num_steps,
      checkpoint_every=num_steps,
      init_from=init_from,
      log_every=1,
  )
  tx = optim.make_optimizer(optim.OptimConfig(warmup_steps=0), config.num_steps)
  eval_data = pipeline.eval_batches(
      lm.open_windows("python_stdlib_text", "validation", 32, data_dir), 8, max_batches=3
  )
  train_windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  record = train.fit(
      model=model,
      task=task,
      tx=tx,
      train_data=pipeline.train_batches(train_windows, 8, seed=0),
      eval_data=eval_data,
      config=config,
      mesh=sharding.make_mesh("data:-1"),
  )
  return record, eval_data, tx


def test_export_round_trips_to_the_same_eval_loss(tmp_path, data_dir):
  model = _tiny_lm()
  record, eval_data, tx = _fit_tiny(tmp_path / "run", data_dir, model)
  config = train.TrainConfig(workdir=str(tmp_path / "run"), num_steps=4, batch_size=8)
  mesh = sharding.make_mesh("data:-1")
  with train.mesh_context(mesh):
    state, step, _ = train.load_checkpoint(
        model=model,
        task=tasks.LanguageModelling(),
        tx=tx,
        example_batch=eval_data[0],
        config=config,
        mesh=mesh,
    )
  overrides = {"num_layers": 1, "embed_dim": 32, "num_heads": 4, "mlp_dim": 64, "max_len": 32}
  checkpoint.export(
      str(tmp_path / "export"), {"params": state.params}, "transformer-tiny", overrides
  )
  loaded, variables = models.load(str(tmp_path / "export"))
  assert loaded.config == model.config
  total = None
  for batch in eval_data:
    sums, _ = tasks.LanguageModelling().loss_sums(loaded, variables, batch)
    total = metrics.add_sums(total, jax.device_get(sums))
  np.testing.assert_allclose(total["loss"] / total["count"], record["eval_loss"], rtol=1e-6)


def test_init_from_loads_parameters_and_names_the_first_mismatch(tmp_path, data_dir):
  first, _, _ = _fit_tiny(tmp_path / "pretrain", data_dir, _tiny_lm(), num_steps=6)
  tuned, _, _ = _fit_tiny(
      tmp_path / "finetune", data_dir, _tiny_lm(), num_steps=1, init_from=str(tmp_path / "pretrain")
  )
  rows = metrics.read_jsonl(tmp_path / "finetune" / metrics.METRICS_FILE)
  # Starts where the pretraining left off, not at ln 256
  assert rows[0]["train_loss"] < 0.97 * np.log(256)
  with pytest.raises(
      UserError,
      match=r"parameter params/block_0/mlp/wi/bias has shape \(64,\) but the model "
      r"wants \(128,\)",
  ):
    _fit_tiny(
        tmp_path / "wrong", data_dir, _tiny_lm(mlp_dim=128), init_from=str(tmp_path / "pretrain")
    )


@pytest.mark.parametrize(
    "metric,values", [("eval_loss", [3.0, 1.0, 2.0, 4.0]), ("eval_accuracy", [0.3, 0.9, 0.5, 0.1])]
)
def test_keep_best_keeps_the_best_and_the_newest(tmp_path, metric, values):
  # The task says which way is better
  highest = tasks.higher_is_better(tasks.Classification(), metric)
  ckpt = checkpoint.Checkpointer(
      str(tmp_path), every=1, keep=1, best_metric=metric, best_is_highest=highest
  )
  state = {"w": jax.numpy.ones(3)}
  for step, value in enumerate(values, start=1):
    ckpt.save(step, state, metrics={metric: value})
    ckpt.wait()
  ckpt.save(5, state)  # a step without an evaluation: newest, never "best"
  ckpt.wait()
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "5"]


# Checkpoints written by bigjax at ec285fc, the commit before the structure change (#21): steps 1-2 of
# a 4-step run on synthetic_sequences/reverse, with its flags.txt, and steps 3-4 as that code logged
# them uninterrupted. Made with `python -m experiments.{transformer,rnn}` and the flags in flags.txt.
_OLD_CHECKPOINTS = os.path.join(os.path.dirname(__file__), "data", "checkpoint_ec285fc")


@pytest.mark.parametrize("model, experiment", [("transformer", "transformer"), ("lstm", "rnn")])
def test_a_checkpoint_written_before_the_structure_change_resumes_to_the_old_losses(
    tmp_path, data_dir, model, experiment
):
  from tests.test_cli import _run_experiment

  workdir = tmp_path / model
  shutil.copytree(os.path.join(_OLD_CHECKPOINTS, model), workdir)
  expected = metrics.read_jsonl(str(workdir / "expected_steps_3_4.jsonl"))
  # The documented way back into a run: its own flags.txt (old flags must still parse).
  result = _run_experiment(
      f"experiments.{experiment}",
      f"--flagfile={workdir}/flags.txt",
      f"--workdir={workdir}",
      f"--data_dir={data_dir}",
  )
  assert result.returncode == 0, result.stderr
  assert "steps 3-4" in result.stdout, result.stdout
  resumed = [r for r in metrics.read_jsonl(str(workdir / "metrics.jsonl")) if r["step"] > 2]
  for key in ("train_loss", "grad_norm", "eval_loss", "eval_accuracy"):
    # Not bitwise: another CPU may round differently; a wrong state or data position is ~1e-2 off.
    np.testing.assert_allclose(
        [r.get(key, np.nan) for r in resumed], [r.get(key, np.nan) for r in expected], rtol=1e-5
    )
