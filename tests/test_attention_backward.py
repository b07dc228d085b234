"""The hand-written attention backward (attention._attention_core) against autodiff of a plain
softmax attention written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.nn import attention


def _plain_attention(q_BHTK, k_BGSK, v_BGSK, mask_B1TS):
  """softmax(q k^T / sqrt(K)) v with query head h reading key/value head h // (H / G)."""
  per_group = q_BHTK.shape[1] // k_BGSK.shape[1]
  k_BHSK, v_BHSK = (jnp.repeat(x, per_group, axis=1) for x in (k_BGSK, v_BGSK))
  scores = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHSK) / np.sqrt(q_BHTK.shape[-1])
  if mask_B1TS is not None:
    scores = jnp.where(mask_B1TS, scores, -1e30)
  return jnp.einsum("bhts,bhsk->bhtk", jax.nn.softmax(scores, axis=-1), v_BHSK)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,masked", [(4, 4, True), (4, 2, True), (2, 1, False)]
)
def test_attention_backward_matches_autodiff(num_heads, num_kv_heads, masked):
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, num_heads, 5, 8))
  k, v = (jax.random.normal(key, (2, num_kv_heads, 5, 8)) for key in keys[1:3])
  cotangent = jax.random.normal(keys[3], q.shape)
  # Causal, and the second example's last query sees no key at all (as a padding query would).
  mask = None
  if masked:
    mask = np.tril(np.ones((5, 5), bool))[None, None].repeat(2, axis=0)
    mask[1, 0, 4, :] = False

  def value_and_grads(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, vjp(cotangent)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda: value_and_grads(attention.dot_product_attention))()
    want = jax.jit(lambda: value_and_grads(_plain_attention))()
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  for g, w in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_flash_attention_call_matches_dot_product_attention():
  """The cuDNN path's call (run here with XLA's implementation of the same function): same
  layout, scaling, grouping and causal mask as the CPU path."""
  keys = jax.random.split(jax.random.key(1), 3)
  q_BTHK = jax.random.normal(keys[0], (2, 6, 4, 8))
  k_BTGK, v_BTGK = (jax.random.normal(key, (2, 6, 2, 8)) for key in keys[1:])
  got = attention.flash_attention(q_BTHK, k_BTGK, v_BTGK, causal=True, implementation="xla")
  want = attention.dot_product_attention(
      *(x.transpose(0, 2, 1, 3) for x in (q_BTHK, k_BTGK, v_BTGK)), causal=True
  ).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert not attention._flash_attention_applies(None, jnp.float32, 64)  # float32: never cuDNN


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2)])
def test_causal_flag_equals_explicit_causal_mask(num_heads, num_kv_heads):
  """`causal=True` (iota mask, alone or with a padding mask) gives what the explicit mask gives, in
  value and gradient."""
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (2, num_heads, 7, 8))
  k, v = (jax.random.normal(key, (2, num_kv_heads, 7, 8)) for key in keys[1:])
  padding = attention.padding_mask(jnp.asarray([[True] * 7, [True] * 5 + [False] * 2]))

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v)))

  for extra in (None, padding):
    flagged = jax.value_and_grad(
        lambda *a: loss(
            lambda q, k, v: attention.dot_product_attention(q, k, v, extra, causal=True), *a
        ),
        argnums=(0, 1, 2),
    )(q, k, v)
    explicit_mask = attention.combine_masks(attention.causal_mask(7), extra)
    explicit = jax.value_and_grad(
        lambda *a: loss(lambda q, k, v: _plain_attention(q, k, v, explicit_mask), *a),
        argnums=(0, 1, 2),
    )(q, k, v)
    np.testing.assert_allclose(flagged[0], explicit[0], rtol=1e-5)
    for g, w in zip(flagged[1], explicit[1], strict=True):
      np.testing.assert_allclose(g, w, atol=1e-5)
  with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
    attention.dot_product_attention(q, k[:, :, :5], v[:, :, :5], causal=True)
