"""Fine-tuning options (#22): label smoothing and the z-loss against hand-computed values; frozen
parameters bitwise unchanged with no optimizer state; learning-rate and weight-decay factors by
parameter path, the first matching pattern winning; patterns that match nothing refused in one line.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
from tests.test_cli import _assert_one_line_error
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_lm():
  return models.create(
      "transformer-tiny", num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=32
  )


def _log_softmax(logits):
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _by_hand(logits_NV, labels_N, weights_N, smoothing, z_weight):
  """Sums of the plain cross-entropy, the trained objective and log(Z)^2, in float64 numpy."""
  logits_NV = np.asarray(logits_NV, np.float64)
  log_p_NV = _log_softmax(logits_NV)
  plain_N = -log_p_NV[np.arange(len(labels_N)), labels_N]
  smoothed_N = (1 - smoothing) * plain_N + smoothing * -log_p_NV.mean(-1)
  log_z_N = logits_NV.max(-1) + np.log(np.exp(logits_NV - logits_NV.max(-1, keepdims=True)).sum(-1))
  return {
      "loss": np.sum(plain_N * weights_N),
      "objective": np.sum((smoothed_N + z_weight * log_z_N**2) * weights_N),
      "log_z_squared": np.sum(log_z_N**2 * weights_N),
  }


def test_language_modelling_label_smoothing_and_z_loss_equal_hand_computed_values():
  model = _tiny_lm()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (3, 9)))
  weights = jnp.asarray([1.0, 0.0, 1.0])  # the padding example counts for nothing
  variables = model.init(jax.random.key(0), tokens[:, :-1])
  # Logits scaled up so that log Z is far from 0 and a wrong weight or sign shows.
  variables = jax.tree.map(lambda x: x * 3, variables)
  task = tasks.LanguageModelling(losses=tasks.Losses(label_smoothing=0.1, z_loss=1e-2))
  sums, _ = task.loss_sums(model, variables, {"tokens": tokens, "weights": weights})
  logits = np.asarray(model.apply(variables, tokens[:, :-1])).reshape(-1, 256)
  want = _by_hand(
      logits, np.asarray(tokens[:, 1:]).reshape(-1), np.repeat(np.asarray(weights), 8), 0.1, 1e-2
  )
  for name, value in want.items():
    np.testing.assert_allclose(float(sums[name]), value, rtol=1e-5, err_msg=name)
  reported = task.metrics(jax.device_get(sums))
  # The plain loss, per target
  np.testing.assert_allclose(reported["loss"], want["loss"] / 16, rtol=1e-5)
  np.testing.assert_allclose(reported["log_z_squared"], want["log_z_squared"] / 16, rtol=1e-5)


def test_classification_label_smoothing_equals_optax_smoothed_labels():
  model = models.create("mlp")
  images = jnp.asarray(np.random.RandomState(1).randn(4, 8, 8, 1), jnp.float32)
  labels = jnp.asarray([0, 3, 9, 3])
  variables = model.init(jax.random.key(1), images)
  task = tasks.Classification(losses=tasks.Losses(label_smoothing=0.2))
  sums, _ = task.loss_sums(model, variables, {"image": images, "label": labels})
  logits = model.apply(variables, images)
  # An independent reference: optax's smoothed one-hot targets and the general cross-entropy.
  targets = optax.smooth_labels(jax.nn.one_hot(labels, 10), 0.2)
  np.testing.assert_allclose(
      float(sums["objective"]), float(optax.softmax_cross_entropy(logits, targets).sum()), rtol=1e-5
  )
  np.testing.assert_allclose(
      float(sums["loss"]), _by_hand(logits, np.asarray(labels), np.ones(4), 0, 0)["loss"], rtol=1e-5
  )
  assert "log_z_squared" not in sums  # no z-loss, nothing extra reported


def test_without_smoothing_or_z_loss_the_objective_is_the_loss():
  model = models.create("mlp")
  images = jnp.zeros((2, 8, 8, 1))
  sums, _ = tasks.Classification().loss_sums(
      model, model.init(jax.random.key(0), images), {"image": images, "label": jnp.asarray([1, 2])}
  )
  assert sums["objective"] is sums["loss"]


def test_bad_loss_settings_are_refused():
  with pytest.raises(ValueError, match="label_smoothing=1.5"):
    tasks.Losses(label_smoothing=1.5)
  with pytest.raises(ValueError, match="z_loss=-1"):
    tasks.Losses(z_loss=-1)


# ----------------------------------------------------------------------------------------------
# Parameter groups: frozen, and learning-rate / weight-decay factors by path.


def _params(model=None):
  model = model or _tiny_lm()
  return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32))["params"])


def _flat(tree):
  return {
      sharding.path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _steps(cfg: optim.OptimConfig, params, grads_fn, num_steps=3):
  tx = optim.make_optimizer(cfg, num_steps)
  state = tx.init(params)
  update = jax.jit(
      lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s, u))(*tx.update(grads_fn(p), s, p))
  )
  updates = None
  for _ in range(num_steps):
    params, state, updates = update(params, state)
  return params, state, updates


def test_frozen_parameters_are_bitwise_unchanged_and_hold_no_optimizer_state():
  model, params = _params()
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 9)))
  loss = lambda p: tasks.LanguageModelling().loss_sums(model, {"params": p}, {"tokens": tokens})[0][
      "objective"
  ]
  cfg = optim.OptimConfig(
      learning_rate=1e-2,
      warmup_steps=0,
      weight_decay=0.1,
      grad_clip=1.0,
      freeze=("token_embed", r"block_0/"),
  )
  trained, opt_state, _ = _steps(cfg, params, jax.grad(loss))
  before, after = _flat(params), _flat(trained)
  frozen = {name for name in before if name.startswith(("token_embed", "block_0/"))}
  assert frozen and frozen != set(before)
  for name in before:
    if name in frozen:
      assert np.asarray(after[name]).tobytes() == np.asarray(before[name]).tobytes(), name
    else:
      assert not np.array_equal(after[name], before[name]), name
  # Adam's two moments, for the trained parameters only (scalars are step counts).
  state_elements = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim)
  assert state_elements == 2 * sum(before[name].size for name in before if name not in frozen)


def test_clipping_sees_only_the_trained_parameters_gradients():
  _, params = _params()
  huge_on_embedding = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, 1e6 if "token_embed" in sharding.path_name(path) else 1e-3),
      p,
  )
  sgd = dict(
      optimizer="sgd",
      momentum=0.0,
      learning_rate=1.0,
      schedule="constant",
      warmup_steps=0,
      grad_clip=1.0,
  )
  _, _, frozen_updates = _steps(
      optim.OptimConfig(**sgd, freeze=("token_embed",)), params, huge_on_embedding, 1
  )
  _, _, alone = _steps(
      optim.OptimConfig(**sgd),
      {k: v for k, v in params.items() if k != "token_embed"},
      huge_on_embedding,
      1,
  )
  for name, update in _flat(alone).items():
    np.testing.assert_allclose(_flat(frozen_updates)[name], update, rtol=1e-6, err_msg=name)


def test_learning_rate_factors_scale_the_update_and_the_first_matching_pattern_wins():
  _, params = _params()
  ones = lambda p: jax.tree.map(jnp.ones_like, p)
  cfg = optim.OptimConfig(
      optimizer="sgd",
      momentum=0.0,
      learning_rate=0.5,
      schedule="constant",
      warmup_steps=0,
      grad_clip=0.0,
      lr_multipliers=((r"attn/query", 0.1), (r"attn/", 2.0), ("head|embed", 0.5)),
  )
  _, _, updates = _steps(cfg, params, ones, 1)
  for name, update in _flat(updates).items():
    factor = (
        0.1 if "attn/query" in name else 2.0 if "attn/" in name else 0.5 if "embed" in name else 1.0
    )
    np.testing.assert_allclose(update, -0.5 * factor * np.ones_like(update), err_msg=name)


def test_weight_decay_factors_scale_the_decay_of_matrices_only():
  _, params = _params()
  zeros = lambda p: jax.tree.map(jnp.zeros_like, p)
  cfg = optim.OptimConfig(
      optimizer="sgd",
      momentum=0.0,
      learning_rate=0.5,
      schedule="constant",
      warmup_steps=0,
      grad_clip=0.0,
      weight_decay=0.1,
      wd_multipliers=((r"mlp/", 3.0), (r"block_1/", 0.0)),
  )
  _, _, updates = _steps(cfg, params, zeros, 1)
  for name, update in _flat(updates).items():
    factor = 3.0 if "mlp/" in name else 0.0 if "block_1/" in name else 1.0
    decay = 0.1 * factor if _flat(params)[name].ndim >= 2 else 0.0
    np.testing.assert_allclose(
        update, -0.5 * decay * np.asarray(_flat(params)[name]), rtol=1e-6, err_msg=name
    )


@pytest.mark.parametrize(
    "field, value, flag",
    [
        ("freeze", ("no_such_layer",), "--freeze"),
        ("lr_multipliers", (("attn/", 2.0), ("nothing_here", 0.5)), "--lr_multiplier"),
        ("wd_multipliers", (("decoder", 0.0),), "--wd_multiplier"),
    ],
)
def test_a_pattern_that_matches_nothing_is_a_one_line_error_listing_real_paths(field, value, flag):
  _, params = _params()
  tx = optim.make_optimizer(optim.OptimConfig(**{field: value}), 10)
  with pytest.raises(
      UserError,
      match=f"{flag} pattern '.*' matches no parameter; paths look like "
      f"block_0/attn/key/bias, ",
  ) as error:
    tx.init(params)
  assert "\n" not in str(error.value)


def test_bad_patterns_and_factors_are_refused_where_the_config_is_built():
  with pytest.raises(ValueError, match=r"freeze: '\(' is not a regular expression"):
    optim.OptimConfig(freeze=("(",))
  with pytest.raises(ValueError, match="the factor of 'attn' must be a number > 0 .*--freeze"):
    optim.OptimConfig(lr_multipliers=(("attn", 0.0),))
  with pytest.raises(ValueError, match="the factor of 'mlp' must be a number >= 0"):
    optim.OptimConfig(wd_multipliers=(("mlp", -1.0),))


def test_frozen_parameters_stay_those_of_init_from_through_a_sharded_run(tmp_path, data_dir):
  """The train loop end to end, on a mesh (the optimizer state's shardings follow its groups)."""
  model = _tiny_lm()
  start = nn.unbox(model.init(jax.random.key(7), jnp.zeros((1, 8), jnp.int32)))
  checkpoint.export(str(tmp_path / "start"), start, "transformer-tiny", {})
  cfg = train.TrainConfig(
      workdir=str(tmp_path / "run"),
      num_steps=3,
      batch_size=8,
      log_every=1,
      eval_every=3,
      checkpoint_every=3,
      init_from=str(tmp_path / "start"),
  )
  optim_cfg = optim.OptimConfig(
      learning_rate=3e-3,
      warmup_steps=0,
      freeze=("blocks?_?0|token_embed",),
      lr_multipliers=(("position_embed", 0.5),),
  )
  windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  task = tasks.LanguageModelling(losses=tasks.Losses(z_loss=1e-4))
  record = train.fit(
      model=model,
      task=task,
      tx=optim.make_optimizer(optim_cfg, 3),
      learning_rate=optim.make_schedule(optim_cfg, 3),
      train_data=pipeline.train_batches(windows, 8, seed=0),
      eval_data=pipeline.eval_batches(windows, 8, max_batches=2),
      config=cfg,
      mesh=sharding.make_mesh("data:2,fsdp:2,tensor:2"),
  )
  assert "eval_log_z_squared" in record
  import orbax.checkpoint as ocp

  final = _flat(
      ocp.StandardCheckpointer().restore(str(tmp_path / "run" / "checkpoints" / "3" / "state"))[
          "params"
      ]
  )
  for name, value in _flat(start["params"]).items():
    frozen = name.startswith(("block_0/", "token_embed"))
    assert np.array_equal(final[name], value) == frozen, name


def _transformer(workdir, data_dir, *flags):
  command = [
      sys.executable,
      "-m",
      "experiments.transformer",
      "--flagfile=experiments/configs/transformer_tiny.flags",
      f"--data_dir={data_dir}",
      f"--workdir={workdir}",
      "--seq_len=32",
      "--batch_size=8",
      "--num_steps=2",
      "--eval_every=2",
      "--eval_batches=2",
      "--log_every=1",
      "--model_override=num_layers=1",
      "--model_override=embed_dim=32",
      "--model_override=mlp_dim=64",
      *flags,
  ]
  env = cpu_env()
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_cli_flags_reach_the_run_and_bad_ones_are_one_line_errors(tmp_path, data_dir):
  ran = _transformer(
      tmp_path / "run",
      data_dir,
      "--freeze=token_embed",
      "--lr_multiplier=position_embed=0.1",
      "--wd_multiplier=block_0/=2",
      "--label_smoothing=0.1",
      "--z_loss=1e-4",
  )
  assert ran.returncode == 0, ran.stderr
  last = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
  assert "eval_log_z_squared" in last and "eval_loss" in last
  for flag, message in (
      ("--lr_multiplier=head", "--lr_multiplier='head' must be REGEX=FACTOR"),
      ("--freeze=decoder_stack", "--freeze pattern 'decoder_stack' matches no parameter"),
  ):
    refused = _transformer(tmp_path / flag.split("=")[0].strip("-"), data_dir, flag)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip().splitlines()[-1].startswith("error: ") and message in refused.stderr
    )


# ----------------------------------------------------------------------------------------------
# Parameter averages (--ema_decay).


def test_the_parameter_average_after_n_steps_equals_the_closed_form():
  """SGD on constant gradients: p_k = p_0 - k lr g, so the average is known in closed form."""
  params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(3.0)}
  grads = {"w": jnp.asarray([0.5, 1.0, -1.0]), "b": jnp.asarray(2.0)}
  decay, lr, steps = 0.9, 0.1, 5
  cfg = optim.OptimConfig(
      optimizer="sgd",
      momentum=0.0,
      learning_rate=lr,
      schedule="constant",
      warmup_steps=0,
      grad_clip=0.0,
      ema_decay=decay,
  )
  _, opt_state, _ = _steps(cfg, params, lambda p: grads, steps)
  average = optim.ema_params(opt_state, params)
  for name in params:
    p_k = [np.asarray(params[name]) - k * lr * np.asarray(grads[name]) for k in range(steps + 1)]
    want = decay**steps * p_k[0] + (1 - decay) * sum(
        decay ** (steps - k) * p_k[k] for k in range(1, steps + 1)
    )
    np.testing.assert_allclose(average[name], want, rtol=1e-6, err_msg=name)
  assert optim.ema_params(optim.make_optimizer(optim.OptimConfig(), 5).init(params), params) is None


def _fit_lm(workdir, data_dir, num_steps, *, init_from=None, **optim_fields):
  model = _tiny_lm()
  cfg = train.TrainConfig(
      workdir=str(workdir),
      num_steps=num_steps,
      batch_size=8,
      log_every=1,
      eval_every=3,
      checkpoint_every=3,
      init_from=init_from,
      eval_with_ema=True,
  )
  optim_cfg = optim.OptimConfig(
      learning_rate=3e-3, warmup_steps=0, schedule="constant", **optim_fields
  )
  windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  return train.fit(
      model=model,
      task=tasks.LanguageModelling(),
      tx=optim.make_optimizer(optim_cfg, num_steps),
      learning_rate=optim.make_schedule(optim_cfg, num_steps),
      train_data=pipeline.train_batches(windows, 8, seed=0),
      eval_data=pipeline.eval_batches(windows, 8, max_batches=2),
      config=cfg,
      mesh=sharding.make_mesh("data:2,fsdp:2,tensor:2"),
  )


def _saved_state(workdir, step):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state"))


def _saved_average(state):
  """The average in a checkpoint restored without a target (named tuples come back as dicts): the
  last element of the optimizer chain."""
  return state["opt_state"][-1]["ema"]


def _losses(rows):
  return [{k: v for k, v in row.items() if "loss" in k or k == "step"} for row in rows]


def test_the_average_is_sharded_checkpointed_and_resumed_exactly(tmp_path, data_dir):
  _fit_lm(tmp_path / "unbroken", data_dir, 6, ema_decay=0.5)
  _fit_lm(tmp_path / "resumed", data_dir, 3, ema_decay=0.5)
  resumed = _fit_lm(tmp_path / "resumed", data_dir, 6, ema_decay=0.5)
  assert resumed["step"] == 6
  unbroken, again = _saved_state(tmp_path / "unbroken", 6), _saved_state(tmp_path / "resumed", 6)
  for got, want in zip(
      jax.tree.leaves(again["opt_state"]), jax.tree.leaves(unbroken["opt_state"]), strict=True
  ):
    np.testing.assert_array_equal(got, want)
  unbroken_rows = _losses(metrics.read_jsonl(tmp_path / "unbroken" / "metrics.jsonl"))
  assert _losses(metrics.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == unbroken_rows
  assert any("eval_loss" in row for row in unbroken_rows)
  # --eval_with_ema evaluated the average, which is not the parameters.
  average = _saved_average(unbroken)
  assert jax.tree.structure(average) == jax.tree.structure(unbroken["params"])
  assert not all(
      np.array_equal(a, p)
      for a, p in zip(jax.tree.leaves(average), jax.tree.leaves(unbroken["params"]))
  )
  windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  task, model = tasks.LanguageModelling(), _tiny_lm()
  sums = [
      jax.device_get(task.loss_sums(model, {"params": average}, batch)[0])
      for batch in pipeline.eval_batches(windows, 8, max_batches=2)
  ]
  by_hand = task.metrics(jax.tree.map(lambda *x: sum(x), *sums))["loss"]
  np.testing.assert_allclose(unbroken_rows[-1]["eval_loss"], by_hand, rtol=1e-5)


def test_the_average_is_sharded_like_the_parameters():
  model = _tiny_lm()
  tx = optim.make_optimizer(optim.OptimConfig(ema_decay=0.9, freeze=("token_embed",)), 10)
  batch = {"tokens": jnp.zeros((1, 9), jnp.int32)}
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  shardings = train.state_shardings(
      model=model,
      tx=tx,
      task=tasks.LanguageModelling(),
      example_batch=batch,
      mesh=mesh,
      rng=jax.random.key(0),
  )
  average = optim.ema_params(shardings.opt_state, shardings.params)
  assert jax.tree.leaves(average) == jax.tree.leaves(shardings.params)
  # The frozen embedding's average would equal it: the optimizer state holds none.
  (kept,) = [
      x
      for x in jax.tree.leaves(
          shardings.opt_state, is_leaf=lambda x: isinstance(x, optim.ParamsEma)
      )
      if isinstance(x, optim.ParamsEma)
  ]
  assert len(jax.tree.leaves(kept.ema)) == len(jax.tree.leaves(shardings.params)) - 1
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(average))


def test_cli_exports_the_average_and_refuses_it_without_one(tmp_path, data_dir):
  ran = _transformer(tmp_path / "run", data_dir, "--ema_decay=0.5", "--eval_with_ema")
  assert ran.returncode == 0, ran.stderr
  exported = _transformer(
      tmp_path / "run",
      data_dir,
      "--ema_decay=0.5",
      "--mode=export",
      "--export_ema",
      f"--export_dir={tmp_path / 'ema'}",
  )
  assert exported.returncode == 0, exported.stderr
  _, variables = models.load(str(tmp_path / "ema"))
  average = _saved_average(_saved_state(tmp_path / "run", 2))
  for got, want in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(average), strict=True):
    np.testing.assert_array_equal(got, want)
  # The run's own flags without --ema_decay build a state with no average to export.
  no_average = _transformer(
      tmp_path / "run",
      data_dir,
      "--mode=export",
      "--export_ema",
      f"--export_dir={tmp_path / 'none'}",
  )
  _assert_one_line_error(
      no_average, 1, "--export_ema needs --ema_decay: export with the run's own flags"
  )
  assert not os.path.exists(tmp_path / "none")
  refused = _transformer(tmp_path / "plain", data_dir, "--eval_with_ema")
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1] == (
      "error: --eval_with_ema needs a run that keeps a parameter "
      "average: train with --ema_decay > 0"
  )
  assert not os.path.exists(tmp_path / "plain" / "checkpoints" / "2")
