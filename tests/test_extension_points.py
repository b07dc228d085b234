"""A fork extends bigjax in one file of its own plus a registration, without editing bigjax: a
recurrent cell (register_cell), a Transformer block type (register_block) and a task
(tasks.register), each trained through the CLI with --import_modules, and the cell checked against
a step-by-step loop of its equations."""

import importlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bigjax import tasks
from bigjax.nn import recurrent
from tests.cpu_env import cpu_env
from tests.test_cli import TINY_FLAGS
from tests.test_cli import TINY_RUN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fork's whole extension, as a user writes it in their own repository.
FORK = '''
import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from bigjax import tasks
from bigjax.nn import recurrent
from bigjax.nn import transformer


@recurrent.register_cell("mgu")
class MinimalGatedUnit(recurrent.Cell):
  """Zhou et al. 2016. Gates [forget, candidate]: f = s(x Wf + h Uf + bf),
  n = tanh(x Wn + (f h) Un + bn), h' = (1 - f) h + f n."""

  num_gates = 2

  def step(self, carry, xproj_BGH, recurrent_HGH, extra):
    f = nn.sigmoid(xproj_BGH[:, 0] + carry @ recurrent_HGH[:, 0])
    n = jnp.tanh(xproj_BGH[:, 1] + (f * carry) @ recurrent_HGH[:, 1])
    return (1 - f) * carry + f * n


@transformer.register_block("fork-parallel")
class ParallelBlock(nn.Module):
  """GPT-J's parallel block: x + Attention(LN(x)) + Mlp(LN(x))."""

  config: transformer.TransformerConfig

  @nn.compact
  def __call__(self, x_BTD, mask_B1TS=None, positions_BT=None, *, causal=False, train=False,
               decode=False):
    h_BTD = transformer.make_norm(self.config, "ln")(x_BTD)
    attn_BTD = transformer.make_attention(self.config)(
        h_BTD, mask_B1TS, positions_BT, causal=causal, train=train, decode=decode)
    return x_BTD + attn_BTD + transformer.make_mlp(self.config)(h_BTD)


@tasks.register("second-half")
@dataclasses.dataclass(frozen=True)
class SecondHalf:
  """Language modelling scored on the second half of each window only: the first half is
  context. Reuses the experiment's own task for the loss and the metrics."""

  base: Any
  unit: str = "tokens"
  higher_is_better: ClassVar[frozenset] = frozenset({"accuracy", "exact_match"})

  def init(self, model, rng, batch):
    return self.base.init(model, rng, batch)

  def loss_sums(self, model, variables, batch, *, rngs=None, train=False):
    targets = batch["tokens"].shape[1] - 1
    mask = jnp.broadcast_to(jnp.arange(targets) >= targets // 2, (batch["tokens"].shape[0], targets))
    return self.base.loss_sums(model, variables, {**batch, "loss_mask": mask}, rngs=rngs, train=train)

  def metrics(self, sums):
    return self.base.metrics(sums)
'''


@pytest.fixture(scope="module")
def fork_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("fork")
  (directory / "my_fork.py").write_text(FORK)
  return directory


@pytest.fixture(scope="module")
def fork(fork_dir):
  sys.path.insert(0, str(fork_dir))
  try:
    yield importlib.import_module("my_fork")
  finally:
    sys.path.remove(str(fork_dir))


def _cli(fork_dir, experiment, *flags):
  env = cpu_env(PYTHONPATH=str(fork_dir))
  result = subprocess.run(
      [sys.executable, "-m", experiment, "--import_modules=my_fork", *flags],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _last_eval(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [row for row in rows if "eval_loss" in row][-1]


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_a_forks_cell_runs_its_equations_in_a_recurrent_layer(fork):
  layer = recurrent.Recurrent("mgu", 6)
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  params = jax.tree.map(lambda p: p + 0.05, nn.unbox(layer.init(jax.random.key(1), x))["params"])
  assert params["recurrent_kernel"].shape == (6, 2, 6)
  outputs, final = layer.apply({"params": params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for b in range(2):
    h = np.zeros(6)
    for t in range(5):
      xp = np.asarray(x[b, t], np.float64) @ p["input_kernel"].reshape(4, -1)
      xp = xp.reshape(2, 6) + p["bias"]
      f = _sigmoid(xp[0] + h @ p["recurrent_kernel"][:, 0])
      n = np.tanh(xp[1] + (f * h) @ p["recurrent_kernel"][:, 1])
      h = (1 - f) * h + f * n
      np.testing.assert_allclose(outputs[b, t], h, atol=1e-5)
    np.testing.assert_allclose(final[b], h, atol=1e-5)


def test_a_forks_cell_trains_a_language_model_through_the_cli(fork_dir, tmp_path, data_dir):
  _cli(
      fork_dir,
      "experiments.rnn",
      "--model=lstm-lm",
      "--model_override=cell=mgu",
      "--model_override=hidden_size=32",
      "--model_override=embed_dim=16",
      "--dataset=python_stdlib_text",
      f"--data_dir={data_dir}",
      f"--workdir={tmp_path}",
      "--seq_len=32",
      "--batch_size=8",
      "--num_steps=2",
      "--eval_every=2",
      "--eval_batches=1",
  )
  assert np.isfinite(_last_eval(tmp_path)["eval_loss"])


def test_a_forks_block_and_task_train_a_transformer_through_the_cli(fork_dir, tmp_path, data_dir):
  tiny = [
      *TINY_RUN,
      f"--data_dir={data_dir}",
      "--num_steps=2",
      "--eval_every=1",
      "--eval_batches=1",
      "--checkpoint_every=1",
      "--keep_checkpoints=1",
  ]
  _cli(
      fork_dir,
      "experiments.transformer",
      *tiny,
      "--model_override=block=fork-parallel",
      f"--workdir={tmp_path / 'block'}",
  )
  assert os.listdir(tmp_path / "block" / "checkpoints")
  assert np.isfinite(_last_eval(tmp_path / "block")["eval_loss"])
  # The task's own metrics (exact_match comes with a loss mask) and its say on which is better:
  # the best eval_exact_match checkpoint is the highest one.
  _cli(
      fork_dir,
      "experiments.transformer",
      *tiny,
      "--task=second-half",
      "--keep_best_metric=eval_exact_match",
      f"--workdir={tmp_path / 'task'}",
  )
  assert "eval_exact_match" in _last_eval(tmp_path / "task")


def test_an_unregistered_task_is_a_one_line_error(fork_dir, tmp_path, data_dir):
  env = cpu_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.transformer",
          f"--flagfile={TINY_FLAGS}",
          f"--data_dir={data_dir}",
          f"--workdir={tmp_path}",
          "--task=third-half",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown task 'third-half'")
  assert not os.path.exists(tmp_path / "checkpoints")


def test_sums_without_what_every_task_holds_are_a_one_line_error():
  with pytest.raises(Exception, match=r"Broken.loss_sums returned sums without objective, count"):
    tasks.checked_sums(type("Broken", (), {})(), {"loss": 1.0})
  assert tasks.higher_is_better(tasks.LanguageModelling(), "eval_exact_match")
  assert not tasks.higher_is_better(tasks.LanguageModelling(), "eval_loss")
