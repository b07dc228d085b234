"""bigjax.ops.attention: every implementation against the plain softmax attention written here and
against ops.reference, values and q/k/v gradients, for packed, padded, causal and grouped inputs;
and the implementation each platform and input gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.nn import attention
from bigjax.ops import attention as ops


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
    got = jax.jit(lambda: value_and_grads(ops.grouped_attention))()
    want = jax.jit(lambda: value_and_grads(_plain_attention))()
  np.testing.assert_allclose(got[0], want[0], atol=1e-5)
  for g, w in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_cudnn_call_matches_the_xla_path():
  """The cuDNN path's call (run here with XLA's implementation of the same function): same
  layout, scaling, grouping and causal mask as the CPU path."""
  keys = jax.random.split(jax.random.key(1), 3)
  q_BTHK = jax.random.normal(keys[0], (2, 6, 4, 8))
  k_BTGK, v_BTGK = (jax.random.normal(key, (2, 6, 2, 8)) for key in keys[1:])
  got = ops.cudnn_attention(q_BTHK, k_BTGK, v_BTGK, causal=True, implementation="xla")
  want = ops.grouped_attention(
      *(x.transpose(0, 2, 1, 3) for x in (q_BTHK, k_BTGK, v_BTGK)), causal=True
  ).transpose(0, 2, 1, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)


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
        lambda *a: loss(lambda q, k, v: ops.grouped_attention(q, k, v, extra, causal=True), *a),
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
    ops.grouped_attention(q, k[:, :, :5], v[:, :, :5], causal=True)


def _inputs(kind: str, dtype=jnp.float32):
  """q [B, T, H, K], k and v [B, T, G, K] and the mask for one kind of input."""
  keys = jax.random.split(jax.random.key(3), 3)
  heads, kv_heads = (4, 2) if kind == "grouped" else (4, 4)
  q = jax.random.normal(keys[0], (2, 8, heads, 8), dtype)
  k, v = (jax.random.normal(key, (2, 8, kv_heads, 8), dtype) for key in keys[1:])
  mask = None
  if kind == "packed":  # two documents in the first window, three in the second
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2, 2]])
    mask = attention.segment_mask(segments)
  elif kind == "padded":
    mask = attention.padding_mask(jnp.asarray([[True] * 8, [True] * 5 + [False] * 3]))
  return q, k, v, mask


@pytest.mark.parametrize("kind", ["causal", "packed", "padded", "grouped"])
def test_the_attention_this_platform_runs_equals_the_reference(kind):
  q, k, v, mask = _inputs(kind)
  cotangent = jax.random.normal(jax.random.key(4), q.shape)

  def value_and_grads(fn):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, causal=True), q, k, v)
    return out, vjp(cotangent)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda: value_and_grads(ops.attention))()
    want = jax.jit(lambda: value_and_grads(ops.reference))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal", "packed", "padded", "grouped"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_on_cpu_every_input_takes_the_xla_path(kind, dtype):
  _, _, _, mask = _inputs(kind)
  assert ops.implementation(mask, dtype, 64) == "xla"


def test_on_a_gpu_cudnn_takes_only_unmasked_half_precision_inputs(monkeypatch):
  class Device:
    compute_capability = "9.0"

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda: [Device()])
  assert ops.implementation(None, jnp.bfloat16, 64) == "cudnn"
  assert ops.implementation(None, jnp.float32, 64) == "xla"
  assert ops.implementation(None, jnp.bfloat16, 160) == "xla"
  _, _, _, packed = _inputs("packed")
  assert ops.implementation(packed, jnp.bfloat16, 64) == "xla"
  Device.compute_capability = "7.5"
  assert ops.implementation(None, jnp.bfloat16, 64) == "xla"
