"""LoRA (--lora_rank): adapted projections computed by hand, step 0 equal to the base, only the
adapters trained and given optimizer state, adapters sharded with their layer, merged exports in
bigjax's and Hugging Face's formats with the adapted model's logits, and one-line errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import checkpoint
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.errors import UserError
from bigjax.nn import attention
from bigjax.nn import lora
from tests.test_cli import TINY_RUN
from tests.test_cli import _run
from tests.test_cli import _assert_one_line_error


def _flat(tree):
  return {
      sharding.path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _with_random_adapters(params, seed=0):
  """`params` with every adapter (B included, which init leaves at zero) drawn at random."""
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
      if sharding.path_name(path).endswith(lora.ADAPTERS)
      else x,
      params,
  )


# ----------------------------------------------------------------------------------------------
# The adapted layer, by hand.


def test_an_adapted_dense_layer_computes_x_times_w_plus_scaled_ab():
  rank, alpha = 3, 6.0
  model = lora.Lora(nn.Dense(5), lora.LoraConfig(rank=rank, alpha=alpha, targets="^kernel$"))
  x = jnp.asarray(np.random.RandomState(1).normal(size=(2, 7, 4)), jnp.float32)
  params = _with_random_adapters(model.init(jax.random.key(0), x)["params"])
  p = jax.tree.map(np.asarray, params)  # the Lora shares the Dense's scope: its kernel is "kernel"
  assert p["lora_a"].shape == (4, rank) and p["lora_b"].shape == (rank, 5)
  want = np.asarray(x) @ (p["kernel"] + alpha / rank * p["lora_a"] @ p["lora_b"]) + p["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_adapted_attention_projections_compute_the_hand_merged_kernels():
  """The multi-axis kernels of attention ([D, H, K] in, [H, K, D] out): A takes the input axes,
  B the output axes, and the result equals attention with W + alpha/r A B merged by hand."""
  base = attention.MultiHeadAttention(num_heads=2, head_dim=4, num_kv_heads=1, use_bias=True)
  cfg = lora.LoraConfig(rank=2, alpha=4.0, targets="(query|value|out)/kernel$")
  x = jnp.asarray(np.random.RandomState(2).normal(size=(2, 5, 8)), jnp.float32)
  params = _with_random_adapters(
      nn.unbox(lora.Lora(base, cfg).init(jax.random.key(0), x)["params"])
  )
  got = lora.Lora(base, cfg).apply({"params": params}, x)
  p = jax.tree.map(np.asarray, params)
  by_hand = {name: dict(p[name]) for name in p}
  for name in ("query", "value", "out"):
    a, b = by_hand[name].pop("lora_a"), by_hand[name].pop("lora_b")
    a2 = a.reshape(-1, a.shape[-1])  # [input axes..., r] as a matrix
    update = (a2 @ b.reshape(b.shape[0], -1)).reshape(a.shape[:-1] + b.shape[1:])
    by_hand[name]["kernel"] = by_hand[name]["kernel"] + 2.0 * update
  assert set(by_hand["key"]) == {"kernel", "bias"}  # not targeted
  np.testing.assert_allclose(got, base.apply({"params": by_hand}, x), rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got) - np.asarray(base.apply({"params": p}, x))).max() > 1e-3


@pytest.mark.parametrize("scan_layers", [False, True])
def test_at_step_0_the_adapted_model_is_the_base_model(scan_layers):
  base = models.create(
      "llama-tiny",
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=64,
      scan_layers=scan_layers,
      remat="full",
  )
  model = lora.Lora(base, lora.LoraConfig(rank=4, dropout=0.5))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))
  params = nn.unbox(
      model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, tokens)["params"]
  )
  base_params, adapters = lora.split_adapters(params)
  adapted = sorted(name.rsplit("/", 1)[0] for name in _flat(adapters))
  layer = "blocks" if scan_layers else "block_0"
  assert (
      f"{layer}/attn/query" in adapted
      and f"{layer}/mlp/wi_gate" in adapted
      and f"{layer}/mlp/wo" in adapted
  )
  assert not any("embed" in name for name in adapted)
  want = base.apply({"params": base_params}, tokens)
  np.testing.assert_array_equal(model.apply({"params": params}, tokens), want)
  # Training mode draws the adapter dropout, which a zero B makes invisible too.
  np.testing.assert_array_equal(
      model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(2)}), want
  )
  assert lora.join(base_params, adapters).keys() == params.keys()


def test_adapter_dropout_acts_while_training_only():
  base = models.create("transformer-tiny", num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64)
  model = lora.Lora(base, lora.LoraConfig(rank=4, dropout=0.5))
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))
  params = _with_random_adapters(nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
  plain = lora.Lora(base, lora.LoraConfig(rank=4))
  np.testing.assert_array_equal(
      model.apply({"params": params}, tokens), plain.apply({"params": params}, tokens)
  )
  dropped = [
      model.apply({"params": params}, tokens, train=True, rngs={"dropout": jax.random.key(k)})
      for k in (1, 2)
  ]
  assert np.abs(np.asarray(dropped[0] - dropped[1])).max() > 1e-3
  # The base path has no dropout of its own here (dropout_rate=0): with zero adapters training is exact.
  assert base.config.dropout_rate == 0


# ----------------------------------------------------------------------------------------------
# Training: only the adapters change, and only they hold optimizer state.


def _lora_lm(scan_layers=False):
  base = models.create(
      "transformer-tiny",
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      mlp_dim=64,
      max_len=32,
      scan_layers=scan_layers,
  )
  return lora.Lora(base, lora.LoraConfig(rank=4, alpha=8.0))


def test_training_changes_the_adapters_alone_and_only_they_hold_optimizer_state():
  model = _lora_lm()
  task = tasks.LanguageModelling()
  batch = {"tokens": jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 17)))}
  cfg = optim.OptimConfig(
      learning_rate=1e-2, warmup_steps=0, trainable=(lora.ADAPTER_PATTERN,), ema_decay=0.9
  )
  tx = optim.make_optimizer(cfg, 10)
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  steps = train.compile_steps(
      model=model, tx=tx, task=task, example_batch=batch, mesh=mesh, rng=jax.random.key(0)
  )
  with train.mesh_context(mesh):
    state = steps.init(jax.random.key(0))
    start = jax.tree.map(np.asarray, state.params)
    for _ in range(3):
      state, _ = steps.train_step(state, batch)
  end = _flat(jax.tree.map(np.asarray, state.params))
  for name, value in _flat(start).items():
    assert np.array_equal(end[name], value) != name.endswith(lora.ADAPTERS), name
  _, adapters = lora.split_adapters(start)
  adapter_leaves = jax.tree.leaves(adapters)
  # adamw keeps two moments per trained parameter, the average one copy: nothing for the base.
  state_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
  assert len(state_arrays) == 3 * len(adapter_leaves)
  assert sum(x.size for x in state_arrays) == 3 * sum(x.size for x in adapter_leaves)
  assert sum(x.size for x in adapter_leaves) < 0.2 * sum(x.size for x in jax.tree.leaves(start))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_train_step_never_computes_the_gradients_of_frozen_parameters(scan_layers):
  """Differentiating only what trains drops the weight-gradient matmuls of the base (a third of a
  plain step's FLOPs) and their buffers; masking full gradients afterwards would keep both, and
  inside a scan over layers XLA cannot remove them."""
  model = _lora_lm(scan_layers)
  batch = {"tokens": jnp.zeros((1, 33), jnp.int32)}
  config = train.TrainConfig(batch_size=8, num_steps=1, workdir="/unused")
  mesh = sharding.make_mesh("fsdp:8")

  def flops(trainable):
    tx = optim.make_optimizer(optim.OptimConfig(trainable=trainable), 10)
    return train.compile_report(
        model=model,
        task=tasks.LanguageModelling(),
        tx=tx,
        example_batch=batch,
        config=config,
        mesh=mesh,
    )["flops_per_step"]

  # Every parameter trains (adapters included) against the adapters alone.
  assert flops((lora.ADAPTER_PATTERN,)) < 0.85 * flops(())


def test_adapters_shard_along_the_axes_of_the_kernel_they_adapt():
  model = _lora_lm(scan_layers=True)
  tx = optim.make_optimizer(optim.OptimConfig(trainable=(lora.ADAPTER_PATTERN,)), 10)
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  shardings = train.state_shardings(
      model=model,
      tx=tx,
      task=tasks.LanguageModelling(),
      example_batch={"tokens": jnp.zeros((1, 9), jnp.int32)},
      mesh=mesh,
      rng=jax.random.key(0),
  )
  pad = lambda spec, n: tuple(spec) + (None,) * (n - len(spec))
  specs = _flat(shardings.params)
  # (kernel rank, how many leading axes are the stacked layers and the inputs)
  for layer, (ndim, split) in {
      "attn/query": (4, 2),
      "attn/out": (4, 3),
      "mlp/wi": (3, 2),
      "mlp/wo": (3, 2),
  }.items():
    kernel = pad(specs[f"blocks/{layer}/kernel"].spec, ndim)
    a = pad(specs[f"blocks/{layer}/lora_a"].spec, split + 1)
    b = pad(specs[f"blocks/{layer}/lora_b"].spec, ndim - split + 2)
    assert a == kernel[:split] + (None,), layer
    assert b == kernel[:1] + (None,) + kernel[split:], layer
  assert any(
      kernel != (None,) * ndim for kernel in (pad(specs["blocks/attn/query/kernel"].spec, 4),)
  )


def test_the_merged_parameters_give_the_base_model_the_adapted_logits():
  model = _lora_lm(scan_layers=True)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 12)))
  params = _with_random_adapters(nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
  merged = lora.merged(params, model.config)
  assert not any(name.endswith(lora.ADAPTERS) for name in _flat(merged))
  with jax.default_matmul_precision("highest"):
    want, got = model.apply({"params": params}, tokens), model.base.apply(
        {"params": merged}, tokens
    )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_targets_that_match_no_projection_are_one_line_errors():
  tokens = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(
      UserError,
      match=r"--lora_targets='decoder/.*' matches no kernel .* of TransformerLM; its "
      r"kernels look like block_0/attn/query/kernel",
  ):
    lora.Lora(_lora_lm().base, lora.LoraConfig(targets="decoder/.*")).init(
        jax.random.key(0), tokens
    )
  cnn = models.create("cnn-small")
  images = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(
      UserError, match=r"matches no kernel of a dense or attention projection of CNN"
  ):
    lora.Lora(cnn, lora.LoraConfig()).init(jax.random.key(0), images)
  with pytest.raises(
      UserError, match=r"the kernel of a Conv: LoRA adapts nn.Dense layers and attention"
  ):
    lora.Lora(cnn, lora.LoraConfig(targets="conv")).init(jax.random.key(0), images)
  for fields, message in (
      ({"rank": 0}, "rank=0 must be an integer >= 1"),
      ({"dropout": 1.5}, "dropout"),
      ({"targets": "("}, "not a regular expression"),
  ):
    with pytest.raises(UserError, match=message):
      lora.LoraConfig(**fields)


# ----------------------------------------------------------------------------------------------
# The command line: fine-tune from an export, export merged in both formats.


def test_cli_fine_tunes_an_export_with_lora_and_exports_it_merged(tmp_path, data_dir):
  import torch
  import transformers

  tiny = [*TINY_RUN, f"--data_dir={data_dir}", "--num_steps=3", "--eval_every=3", "--log_every=1"]
  base, run = tmp_path / "base", tmp_path / "lora"
  # No --model: the architecture comes from the export's model.json.
  lora_flags = [
      f"--workdir={run}",
      "--model=",
      f"--init_from={tmp_path / 'b'}",
      "--lora_rank=4",
      "--lora_alpha=16",
      "--lora_dropout=0.1",
      "--learning_rate=0.05",
      "--warmup_steps=0",
  ]
  outputs = []
  for flags in (
      [f"--workdir={base}"],
      [f"--workdir={base}", "--mode=export", f"--export_dir={tmp_path / 'b'}"],
      [f"--workdir={base}", "--mode=eval"],
      [*lora_flags, "--mode=eval"],
      lora_flags,
  ):
    result = _run(*tiny, *flags)
    assert result.returncode == 0, result.stderr
    outputs.append(result.stdout)
  assert "of them in LoRA adapters, the rest frozen" in result.stdout
  # Before fine-tuning, --mode=eval of the LoRA run (no checkpoint yet) scores its --init_from
  # model: the base's own score, at step 0.
  eval_loss = lambda out: float(re.search(r"eval_loss (\S+)", out).group(1))
  assert eval_loss(outputs[3]) == eval_loss(outputs[2])
  assert re.search(r"step\s+0\b", outputs[3]) and "parameters from" in outputs[3]
  for flags in (
      ["--mode=export", f"--export_dir={tmp_path / 'merged'}"],
      ["--mode=export", "--export_format=hf", f"--export_dir={tmp_path / 'hf'}"],
  ):
    result = _run(f"--flagfile={run / 'flags.txt'}", *flags)
    assert result.returncode == 0, result.stderr
  # The fine-tuned run's own parameters, base and adapters, give the reference logits.
  model = lora.Lora(
      models.create("transformer-tiny", num_layers=1, embed_dim=32, mlp_dim=64),
      lora.LoraConfig(rank=4, alpha=16.0),
  )
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 16)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))
  trained = checkpoint.load_variables(
      str(run),
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes),
  )
  exported = checkpoint.load_variables(
      str(tmp_path / "b"),
      jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
          {"params": lora.split_adapters(shapes["params"])[0]},
      ),
  )
  _, adapters = lora.split_adapters(trained["params"])
  # The adapters trained
  assert max(np.abs(np.asarray(b)).max() for b in jax.tree.leaves(adapters)) > 0
  for name, value in _flat(lora.split_adapters(trained["params"])[0]).items():  # the base did not
    np.testing.assert_array_equal(value, _flat(exported["params"])[name], err_msg=name)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(model.apply(trained, tokens))
    plain, variables = models.load(str(tmp_path / "merged"))
    np.testing.assert_allclose(plain.apply(variables, tokens), want, rtol=1e-5, atol=1e-5)
  # LoRA moved the logits
  assert np.abs(want - np.asarray(model.base.apply(exported, tokens))).max() > 1e-4
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    theirs = hf_model(torch.from_numpy(np.array(tokens))).logits.numpy()
  np.testing.assert_allclose(theirs, want, rtol=1e-4, atol=1e-4)


def test_cli_lora_flags_without_a_rank_or_a_match_are_one_line_errors(tmp_path, data_dir):
  tiny = [*TINY_RUN, f"--data_dir={data_dir}", "--num_steps=1"]
  _assert_one_line_error(
      _run(*tiny, f"--workdir={tmp_path / 'a'}", "--lora_alpha=8"),
      1,
      "--lora_alpha needs --lora_rank > 0",
  )
  _assert_one_line_error(
      _run(*tiny, f"--workdir={tmp_path / 'b'}", "--lora_rank=4", "--lora_targets=encoder_stack"),
      1,
      "--lora_targets='encoder_stack' matches no kernel",
  )
