import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import models
from bigjax.nn import attention
from bigjax.ops import attention as attention_ops
from bigjax.nn import transformer


def _naive_attention(x, params, num_heads, num_kv_heads, mask):
  """Loops over batch and heads with numpy; query head h reads key/value head h // (H / G)."""

  def proj(name):
    return np.einsum("btd,dhk->bthk", x, params[name]["kernel"]) + params[name]["bias"]

  q, k, v = proj("query"), proj("key"), proj("value")
  batch, length, _, head_dim = q.shape
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(num_heads):
      g = h // (num_heads // num_kv_heads)
      scores = q[b, :, h] @ k[b, :, g].T / math.sqrt(head_dim)
      scores = np.where(mask[b, 0], scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[b, :, h] = weights @ v[b, :, g]
  return np.einsum("bthk,hkd->btd", out, params["out"]["kernel"]) + params["out"]["bias"]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_naive_reference(num_heads, num_kv_heads):
  x = jax.random.normal(jax.random.key(0), (2, 6, 16))
  valid = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
  mask = attention.combine_masks(attention.causal_mask(6), attention.padding_mask(valid))
  module = attention.MultiHeadAttention(num_heads=num_heads, head_dim=8, num_kv_heads=num_kv_heads)
  variables = module.init(jax.random.key(1), x, mask)
  # Random biases too, so that a bias mistake would show.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape),
      nn.unbox(variables["params"]),
  )
  got = module.apply({"params": params}, x, mask)
  want = _naive_attention(
      np.asarray(x, np.float64),
      jax.tree.map(np.asarray, params),
      num_heads,
      num_kv_heads,
      np.broadcast_to(np.asarray(mask), (2, 1, 6, 6)),
  )
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_grouped_heads_count_key_value_parameters():
  module = attention.MultiHeadAttention(num_heads=8, head_dim=4, num_kv_heads=2)
  params = nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, 3, 32))))["params"]
  assert params["query"]["kernel"].shape == (32, 8, 4)
  assert params["key"]["kernel"].shape == (32, 2, 4)
  assert params["value"]["kernel"].shape == (32, 2, 4)


def test_fully_masked_query_gives_finite_output():
  x = jnp.ones((1, 3, 8))
  mask = attention.padding_mask(jnp.zeros((1, 3), bool))
  module = attention.MultiHeadAttention(num_heads=2, head_dim=4)
  variables = module.init(jax.random.key(0), x, mask)
  assert jnp.all(jnp.isfinite(module.apply(variables, x, mask)))


def test_scores_and_softmax_are_float32_under_bfloat16_compute():
  q = jnp.ones((1, 2, 3, 4), jnp.bfloat16)
  k = jnp.ones((1, 2, 3, 4), jnp.bfloat16)
  assert attention_ops.probabilities(q, k).dtype == jnp.float32


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rotary", "none"])
def test_decoder_blocks_are_causal_by_gradient(position):
  """d output[t] / d input[s] is exactly zero for every s > t, and not zero for s <= t."""
  cfg = transformer.TransformerConfig(
      vocab_size=16,
      num_layers=2,
      embed_dim=16,
      num_heads=2,
      mlp_dim=32,
      max_len=8,
      position=position,
  )
  length = 6
  block_stack = transformer.TransformerBlock(cfg)
  x = jax.random.normal(jax.random.key(0), (1, length, 16))
  mask = attention.causal_mask(length)
  positions = jnp.arange(length)[None]
  variables = block_stack.init(jax.random.key(1), x, mask, positions)

  def out_at(t, x):
    return jnp.sum(block_stack.apply(variables, x, mask, positions)[0, t])

  for t in range(length):
    grad = jax.grad(out_at, argnums=1)(t, x)[0]  # [T, D]
    per_position = jnp.abs(grad).sum(-1)
    assert jnp.all(per_position[t + 1 :] == 0), f"output {t} depends on later inputs"
    assert jnp.all(per_position[: t + 1] > 0), f"output {t} ignores earlier inputs"


def test_language_model_logits_ignore_future_tokens():
  model = models.create(
      "transformer-tiny", num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=16
  )
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  variables = model.init(jax.random.key(1), tokens)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 256)
  before, after = model.apply(variables, tokens), model.apply(variables, changed)
  np.testing.assert_array_equal(before[:, :7], after[:, :7])
  assert not np.allclose(before[:, 7:], after[:, 7:])


def test_padding_keys_never_change_real_positions():
  model = models.create(
      "transformer-tiny", num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64, max_len=16
  )
  tokens = jax.random.randint(jax.random.key(0), (1, 8), 0, 256)
  # Left padding: under the causal mask only the padding mask keeps real queries off these keys.
  valid = jnp.array([[False] * 3 + [True] * 5])
  variables = model.init(jax.random.key(1), tokens)
  other_padding = tokens.at[:, :3].set(7)
  a = model.apply(variables, tokens, valid_BT=valid)
  b = model.apply(variables, other_padding, valid_BT=valid)
  np.testing.assert_allclose(a[:, 3:], b[:, 3:], atol=1e-6)
  unmasked_a, unmasked_b = model.apply(variables, tokens), model.apply(variables, other_padding)
  assert not np.allclose(unmasked_a[:, 3:], unmasked_b[:, 3:])


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_cached_decoding_without_positions_matches_the_full_causal_pass(num_kv_heads):
  """Token by token (after a 3-token prefill) through the KV cache, rotary positions left to the
  module, against one causal pass over the whole sequence."""
  module = attention.MultiHeadAttention(
      num_heads=4, head_dim=8, num_kv_heads=num_kv_heads, rotary_base=10_000.0, cache_len=8
  )
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  variables = module.init(jax.random.key(1), x[:, :1], decode=True)
  want = module.apply({"params": variables["params"]}, x, causal=True)
  cache = variables["cache"]
  pieces = []
  for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, 7)]:
    out, updates = module.apply(
        {"params": variables["params"], "cache": cache},
        x[:, start:stop],
        decode=True,
        mutable=["cache"],
    )
    cache = updates["cache"]
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), want, atol=1e-5)
