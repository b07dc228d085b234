"""Attention, the kernel layer: one public `attention` that picks its implementation for the
platform and the inputs, the implementations, and `reference`, the plain softmax(q k^T / sqrt(K)) v
under autodiff that the tests hold every implementation to (values and q/k/v gradients).

Implementations, chosen by `implementation()` at trace time:
  cudnn  jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPU of compute capability
         8.0+, bfloat16 or float16, head width a multiple of 8 up to 128, no mask beyond causality.
  xla    grouped_attention: heads-first batched matmuls with the softmax backward written out
         (markedly faster on CPU than autodiff, benchmarks/README.md); everywhere else.

Shapes are named by suffix: B batch, T query time, S key time, H query heads, G key/value heads
(groups), R = H / G query heads per group, K head dim.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# Masked scores get the most negative float32 rather than -inf, so that a row whose every key is
# masked (a padding query) gives a uniform softmax instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def implementation(mask_B1TS, dtype, head_dim: int) -> str:
  """ "cudnn" or "xla": what `attention` runs for these inputs on this platform."""
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  if head_dim % 8 or head_dim > 128 or mask_B1TS is not None:
    return "xla"
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return "cudnn" if float(capability) >= 8.0 else "xla"


def attention(q_BTHK, k_BTGK, v_BTGK, mask_B1TS=None, *, causal: bool = False, dtype=jnp.float32):
  """softmax(q k^T / sqrt(K)) v as [B, T, H, K], in the layout the projections produce, by the
  implementation this platform and these inputs take (see the module docstring)."""
  if implementation(mask_B1TS, dtype, q_BTHK.shape[-1]) == "cudnn":
    return cudnn_attention(q_BTHK, k_BTGK, v_BTGK, causal=causal)
  # Heads before time: the score and value matmuls then batch over (B, H) with contiguous
  # [T, K] operands, which is markedly faster on CPU than contracting the [B, T, H, K] layout.
  q_BHTK = nn.with_logical_constraint(
      q_BTHK.transpose(0, 2, 1, 3), ("batch", "act_heads", "length", None)
  )
  k_BGSK, v_BGSK = (
      nn.with_logical_constraint(x.transpose(0, 2, 1, 3), ("batch", "act_kv_heads", "length", None))
      for x in (k_BTGK, v_BTGK)
  )
  out_BHTK = grouped_attention(q_BHTK, k_BGSK, v_BGSK, mask_B1TS, causal=causal, dtype=dtype)
  return out_BHTK.transpose(0, 2, 1, 3)


def cudnn_attention(q_BTHK, k_BTGK, v_BTGK, *, causal: bool, implementation: str = "cudnn"):
  """cuDNN's fused attention, which never materialises the [T, S] scores (and skips the masked
  half); `implementation()` says where it applies. (implementation="xla" runs the same call with
  XLA's kernel: the tests check the call's layout, scaling and grouping on CPU with it.)"""
  return jax.nn.dot_product_attention(
      q_BTHK, k_BTGK, v_BTGK, is_causal=causal, implementation=implementation
  )


def reference(q_BTHK, k_BTGK, v_BTGK, mask_B1TS=None, *, causal: bool = False):
  """The plain float32 computation, under autodiff: what every implementation must equal."""
  q_BHTK, k_BGSK, v_BGSK = (
      x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q_BTHK, k_BTGK, v_BTGK)
  )
  probs_BGRTS = probabilities(q_BHTK, k_BGSK, mask_B1TS, causal=causal)
  return attend(probs_BGRTS, v_BGSK).transpose(0, 2, 1, 3)


def combine_masks(*masks):
  """Logical AND of broadcastable boolean masks; None entries are ignored."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  combined = present[0]
  for mask in present[1:]:
    combined = jnp.logical_and(combined, mask)
  return combined


def _check_causal(causal: bool, q_len: int, kv_len: int):
  if causal and q_len != kv_len:
    raise ValueError(
        f"causal attention needs as many queries as keys, got {q_len} queries and {kv_len} keys; "
        "pass an explicit mask instead"
    )


def _grouped_scaled_queries(q_BHTK, num_groups: int):
  """[B, H, T, K] -> [B, G, R, T, K], scaled by 1 / sqrt(K)."""
  batch, num_heads, q_len, head_dim = q_BHTK.shape
  q_BGRTK = q_BHTK.reshape(batch, num_groups, num_heads // num_groups, q_len, head_dim)
  return q_BGRTK * jnp.asarray(head_dim**-0.5, q_BGRTK.dtype)


def probabilities(q_BHTK, k_BGSK, mask_B1TS=None, *, causal: bool = False):
  """Float32 softmax(q k^T / sqrt(K)) as [B, G, R, T, S]: each group of R query heads shares one key head."""
  _check_causal(causal, q_BHTK.shape[2], k_BGSK.shape[2])
  return _masked_probs(_grouped_scaled_queries(q_BHTK, k_BGSK.shape[1]), k_BGSK, mask_B1TS, causal)


def _ungroup(out_BGRTK):
  batch, num_groups, per_group, q_len, head_dim = out_BGRTK.shape
  return out_BGRTK.reshape(batch, num_groups * per_group, q_len, head_dim)


def attend(probs_BGRTS, v_BGSK, dtype=jnp.float32):
  """Weighted sum of values: [B, H, T, K] from grouped probabilities and values."""
  return _ungroup(jnp.einsum("bgrts,bgsk->bgrtk", probs_BGRTS.astype(dtype), v_BGSK.astype(dtype)))


def grouped_attention(
    q_BHTK, k_BGSK, v_BGSK, mask_B1TS=None, *, causal: bool = False, dtype=jnp.float32
):
  """softmax(q k^T / sqrt(K)) v as [B, H, T, K] from heads-first queries [B, H, T, K] and keys and
  values [B, G, S, K], under `mask_B1TS` (any shape broadcastable to [B, 1, T, S]) and, with
  `causal`, query t seeing only keys s <= t: XLA's matmuls with the backward written out
  (_attention_core). The KV cache holds this layout, so decoding calls it directly."""
  _check_causal(causal, q_BHTK.shape[2], k_BGSK.shape[2])
  if mask_B1TS is not None:
    mask_B1TS = jnp.asarray(mask_B1TS, jnp.bool_)
  q_BGRTK = _grouped_scaled_queries(q_BHTK.astype(dtype), k_BGSK.shape[1])
  return _ungroup(
      _attention_core(q_BGRTK, k_BGSK.astype(dtype), v_BGSK.astype(dtype), mask_B1TS, causal)
  )


def _merge_heads_and_time(x_BGRTX):
  """[B, G, R, T, X] -> [B, G, R * T, X]: the R query heads of a group stacked as rows, so that the
  score and value products are plain batched matmuls over (B, G). XLA's CPU backend ran the 5-D
  grouped contraction about twice as slowly (benchmarks/README.md)."""
  batch, groups, per_group, length, last = x_BGRTX.shape
  return x_BGRTX.reshape(batch, groups, per_group * length, last)


def _full_mask(mask_B1TS, causal: bool, q_len: int, kv_len: int):
  """[B?, 1, 1, T, S] mask for [B, G, R, T, S] scores, or None. Causality from iotas rather than a
  constant, which XLA's CPU backend broadcast several times more slowly."""
  parts = [] if mask_B1TS is None else [mask_B1TS[:, :, None]]
  if causal:
    query_TS = jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 0)
    parts.append(jax.lax.broadcasted_iota(jnp.int32, (q_len, kv_len), 1) <= query_TS)
  return combine_masks(*parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(q_BGRTK, k_BGSK, v_BGSK, mask_B1TS, causal: bool):
  return _attention_core_fwd(q_BGRTK, k_BGSK, v_BGSK, mask_B1TS, causal)[0]


def _masked_probs(q_BGRTK, k_BGSK, mask_B1TS, causal: bool):
  """Float32 softmax of the (already scaled) scores q k^T as [B, G, R, T, S], masked keys at 0."""
  scores_BGMS = jnp.einsum(
      "bgmk,bgsk->bgms", _merge_heads_and_time(q_BGRTK), k_BGSK, preferred_element_type=jnp.float32
  )
  scores_BGRTS = scores_BGMS.reshape(q_BGRTK.shape[:-1] + k_BGSK.shape[2:3])
  mask = _full_mask(mask_B1TS, causal, q_BGRTK.shape[3], k_BGSK.shape[2])
  if mask is not None:
    scores_BGRTS = jnp.where(mask, scores_BGRTS, _MASKED_SCORE)
  return nn.softmax(scores_BGRTS, axis=-1)


def _attention_core_fwd(q_BGRTK, k_BGSK, v_BGSK, mask_B1TS, causal: bool):
  probs_BGRTS = _masked_probs(q_BGRTK, k_BGSK, mask_B1TS, causal)
  out_BGMK = jnp.einsum(
      "bgms,bgsk->bgmk", _merge_heads_and_time(probs_BGRTS).astype(v_BGSK.dtype), v_BGSK
  )
  out_BGRTK = out_BGMK.reshape(q_BGRTK.shape)
  return out_BGRTK, (q_BGRTK, k_BGSK, v_BGSK, mask_B1TS, probs_BGRTS, out_BGRTK)


def _attention_core_bwd(causal: bool, residuals, dout_BGRTK):
  """The softmax backward dS = P * (dP - rowsum(dP * P)) uses rowsum(dP * P) = rowsum(dO * O)
  (as FlashAttention does): a reduction over [T, K] instead of [T, S], and no [T, S]-sized product
  beside dP. Autodiff of the plain forward fused the dP matmul with that [T, S] reduction, which
  XLA's CPU backend ran several times slower than the matmul alone (benchmarks/README.md)."""
  del causal  # masked probabilities are exactly 0, so their gradient is too
  q_BGRTK, k_BGSK, v_BGSK, mask_B1TS, probs_BGRTS, out_BGRTK = residuals
  dtype = v_BGSK.dtype
  probs_BGMS = _merge_heads_and_time(probs_BGRTS).astype(dtype)
  dout_BGMK = _merge_heads_and_time(dout_BGRTK)
  dv_BGSK = jnp.einsum("bgms,bgmk->bgsk", probs_BGMS, dout_BGMK)
  dprobs_BGMS = jnp.einsum("bgmk,bgsk->bgms", dout_BGMK, v_BGSK, preferred_element_type=jnp.float32)
  delta_BGRT1 = jnp.sum(
      dout_BGRTK.astype(jnp.float32) * out_BGRTK.astype(jnp.float32), axis=-1, keepdims=True
  )
  dscores_BGRTS = probs_BGRTS * (dprobs_BGMS.reshape(probs_BGRTS.shape) - delta_BGRT1)
  if (
      mask_B1TS is not None
  ):  # a row whose every key is masked has uniform probabilities but no gradient
    dscores_BGRTS = jnp.where(mask_B1TS[:, :, None], dscores_BGRTS, 0.0)
  dscores_BGMS = _merge_heads_and_time(dscores_BGRTS).astype(dtype)
  dq_BGRTK = jnp.einsum("bgms,bgsk->bgmk", dscores_BGMS, k_BGSK).reshape(q_BGRTK.shape)
  dk_BGSK = jnp.einsum("bgms,bgmk->bgsk", dscores_BGMS, _merge_heads_and_time(q_BGRTK))
  return dq_BGRTK, dk_BGSK, dv_BGSK, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)
