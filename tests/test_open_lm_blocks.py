"""The parts of today's open LM blocks as TransformerConfig choices (RMSNorm, gated MLPs, biases per
part, q/k norms, Llama 3 rotary scaling), and the block slot that lets a fork add a block type.

Equality with the reference implementations lives in test_hf_interop.py; here, the parameter trees
each choice makes, the maths of each part against a direct formula, and the config checks.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.errors import UserError
from bigjax.nn import norm
from bigjax.nn import position
from bigjax.nn import transformer

_TINY = dict(vocab_size=32, num_layers=2, embed_dim=16, num_heads=4, mlp_dim=24, max_len=16)


def _params(cfg: transformer.TransformerConfig):
  model = transformer.TransformerLM(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return nn.unbox(abstract)["params"]


def _names(tree) -> set[str]:
  return {
      jax.tree_util.keystr(path, simple=True, separator="/")
      for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def test_llama_style_block_has_rmsnorm_scales_gated_mlp_and_no_biases():
  cfg = transformer.TransformerConfig(
      **_TINY,
      num_kv_heads=2,
      position="rotary",
      norm="rmsnorm",
      mlp="gated",
      activation="silu",
      use_bias=False,
      tie_embeddings=False,
  )
  block = _names(_params(cfg)["block_0"])
  assert block == {
      "ln_attn/scale",
      "attn/query/kernel",
      "attn/key/kernel",
      "attn/value/kernel",
      "attn/out/kernel",
      "ln_mlp/scale",
      "mlp/wi_gate/kernel",
      "mlp/wi_up/kernel",
      "mlp/wo/kernel",
  }
  assert _params(cfg)["block_0"]["attn"]["key"]["kernel"].shape == (16, 2, 4)


def test_qwen2_style_biases_on_qkv_only():
  cfg = transformer.TransformerConfig(
      **_TINY,
      position="rotary",
      norm="rmsnorm",
      mlp="gated",
      activation="silu",
      use_bias=False,
      qkv_bias=True,
  )
  block = _names(_params(cfg)["block_0"])
  assert {n for n in block if n.endswith("bias")} == {
      "attn/query/bias",
      "attn/key/bias",
      "attn/value/bias",
  }


def test_each_bias_switch_overrides_use_bias_for_its_part_only():
  cfg = transformer.TransformerConfig(**_TINY, use_bias=True, attn_out_bias=False, mlp_bias=False)
  block = _names(_params(cfg)["block_0"])
  assert {n for n in block if n.endswith("bias")} == {
      "ln_attn/bias",
      "ln_mlp/bias",
      "attn/query/bias",
      "attn/key/bias",
      "attn/value/bias",
  }


def test_qk_norm_adds_one_scale_per_head_dim_for_queries_and_keys():
  cfg = transformer.TransformerConfig(**_TINY, position="rotary", norm="rmsnorm", qk_norm=True)
  attn = _params(cfg)["block_0"]["attn"]
  assert attn["query_norm"]["scale"].shape == attn["key_norm"]["scale"].shape == (4,)


def test_rmsnorm_is_x_over_root_mean_square_times_scale():
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 8)))
  module = norm.RMSNorm(epsilon=1e-5)
  variables = module.init(jax.random.key(1), x)
  scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
  got = module.apply({"params": {"scale": nn.Partitioned(scale, ("embed",))}}, x)
  want = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert nn.unbox(variables)["params"]["scale"].shape == (8,)


def test_gated_mlp_is_activation_of_gate_times_up_then_down():
  cfg = transformer.TransformerConfig(**_TINY, mlp="gated", activation="silu", use_bias=False)
  x = jax.random.normal(jax.random.key(0), (1, 3, 16))
  module = transformer.GatedMlp(cfg)
  params = nn.unbox(module.init(jax.random.key(1), x))["params"]
  gate, up, down = (np.asarray(params[n]["kernel"], np.float64) for n in ("wi_gate", "wi_up", "wo"))
  x64 = np.asarray(x, np.float64)
  g = x64 @ gate
  want = (g / (1 + np.exp(-g)) * (x64 @ up)) @ down
  np.testing.assert_allclose(module.apply({"params": params}, x), want, rtol=1e-4, atol=1e-6)


def _llama3_by_hand(inv_freq, factor, low, high, original):
  """Meta's reference `apply_scaling` (llama-models), one frequency at a time."""
  out = []
  for f in inv_freq:
    wavelen = 2 * math.pi / f
    if wavelen < original / high:
      out.append(f)
    elif wavelen > original / low:
      out.append(f / factor)
    else:
      smooth = (original / wavelen - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def test_llama3_scaling_keeps_high_frequencies_slows_low_ones_and_blends_between():
  # head_dim 16, base 500000, original length 64: the 8 wavelengths fall in all three bands.
  scaling = position.Llama3Scaling(
      factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=64
  )
  plain = np.asarray(position.rotary_frequencies(16, 500_000.0), np.float64)
  got = np.asarray(position.rotary_frequencies(16, 500_000.0, scaling))
  want = _llama3_by_hand(plain, 32.0, 1.0, 4.0, 64)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == plain[0].astype(np.float32) and 1 < plain[1] / got[1] < 32
  np.testing.assert_allclose(plain[2:] / got[2:], 32, rtol=1e-6)


def test_rotary_without_scaling_is_unchanged():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  positions = jnp.array([[0, 5, 9]])
  np.testing.assert_array_equal(
      position.apply_rotary(x, positions, 500.0, None), position.apply_rotary(x, positions, 500.0)
  )


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(norm="batchnorm"), "unknown norm 'batchnorm'; use one of layernorm, rmsnorm"),
        (dict(mlp="moe"), "unknown mlp 'moe'; use one of dense, gated"),
        (dict(qkv_bias=1), "qkv_bias=1 must be True or False"),
        (dict(qk_norm=None), "qk_norm=None must be True or False"),
        (
            dict(rope_scaling="yarn", position="rotary"),
            "unknown rope_scaling 'yarn'; use one of none, llama3",
        ),
        (
            dict(rope_scaling="llama3"),
            "rope_scaling='llama3' needs position='rotary', got 'learned'",
        ),
        (
            dict(rope_scaling="llama3", position="rotary", rope_high_freq_factor=1.0),
            "rope_high_freq_factor=1.0 must exceed rope_low_freq_factor=1.0",
        ),
        (
            dict(rope_scaling="llama3", position="rotary", rope_original_max_len=0),
            "rope_original_max_len=0 must be an integer >= 1",
        ),
        (dict(block="parallel-typo"), "unknown block type .*register_block.* 'parallel-typo'"),
    ],
)
def test_bad_block_choices_are_one_line_errors(fields, message):
  with pytest.raises(UserError, match=message):
    transformer.TransformerConfig(**{**_TINY, **fields})


# ----------------------------------------------------------------------------------------------
# The block slot: a fork's block type, registered here as a fork would, runs unrolled, scanned,
# rematerialised and with the KV cache.


@transformer.register_block("test-parallel")
class ParallelBlock(nn.Module):
  """GPT-J's parallel block: x + Attention(LN(x)) + Mlp(LN(x)), one norm shared by both branches."""

  config: transformer.TransformerConfig

  @nn.compact
  def __call__(
      self,
      x_BTD,
      mask_B1TS=None,
      positions_BT=None,
      *,
      causal: bool = False,
      train: bool = False,
      decode: bool = False,
  ):
    cfg = self.config
    h_BTD = transformer.make_norm(cfg, "ln")(x_BTD)
    attn_BTD = transformer.make_attention(cfg)(
        h_BTD, mask_B1TS, positions_BT, causal=causal, train=train, decode=decode
    )
    return x_BTD + attn_BTD + transformer.make_mlp(cfg)(h_BTD)


def _stack_layers(params):
  """Unrolled block_0..block_{n-1} parameters -> the scanned model's "blocks" with a leading layers axis."""
  blocks = sorted((k for k in params if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in blocks])
  return {**{k: v for k, v in params.items() if k not in blocks}, "blocks": stacked}


def test_registering_a_taken_block_name_is_refused():
  with pytest.raises(ValueError, match="block type 'test-parallel' is already registered"):
    transformer.register_block("test-parallel")(ParallelBlock)


def test_registered_parallel_block_scans_remats_and_decodes_like_the_unrolled_model():
  fields = dict(
      **_TINY,
      num_kv_heads=2,
      position="rotary",
      norm="rmsnorm",
      mlp="gated",
      activation="silu",
      use_bias=False,
      block="test-parallel",
  )
  unrolled = transformer.TransformerLM(transformer.TransformerConfig(**fields))
  scanned = transformer.TransformerLM(
      transformer.TransformerConfig(**fields, scan_layers=True, remat="full")
  )
  tokens_BT = jax.random.randint(jax.random.key(0), (2, 10), 0, 32)
  params = nn.unbox(unrolled.init(jax.random.key(1), tokens_BT))["params"]
  assert _names(params["block_0"]) >= {"ln/scale", "attn/query/kernel", "mlp/wi_gate/kernel"}
  want_BTV = unrolled.apply({"params": params}, tokens_BT)

  scanned_params = _stack_layers(params)
  assert jax.tree.structure(scanned_params) == jax.tree.structure(
      nn.unbox(jax.eval_shape(scanned.init, jax.random.key(1), tokens_BT))["params"]
  )
  np.testing.assert_allclose(
      scanned.apply({"params": scanned_params}, tokens_BT), want_BTV, atol=1e-5
  )

  # Cached decoding, scanned: a 4-token prefill, then one token at a time, against the full pass.
  cache_shapes = jax.eval_shape(
      lambda: scanned.init(jax.random.key(0), tokens_BT[:, :1], decode=True)
  )["cache"]
  cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache_shapes)
  decode = jax.jit(
      lambda cache, tokens_BT, positions_BT: scanned.apply(
          {"params": scanned_params, "cache": cache},
          tokens_BT,
          positions_BT=positions_BT,
          decode=True,
          mutable=["cache"],
      )
  )
  got = []
  for begin, end in [(0, 4)] + [(t, t + 1) for t in range(4, 10)]:
    logits_BTV, updates = decode(cache, tokens_BT[:, begin:end], jnp.arange(begin, end)[None])
    cache = updates["cache"]
    got.append(logits_BTV)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), want_BTV, atol=1e-5)
