"""Multi-head and grouped-query dot-product attention, with causal and padding masks.

Shapes are named by suffix: B batch, T query time, S key time, D model width, H query heads,
G key/value heads (groups), R = H / G query heads per group, K head dim.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.nn import norm
from bigjax.nn import position

# Masked scores get the most negative float32 rather than -inf, so that a row whose every key is
# masked (a padding query) gives a uniform softmax instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def causal_mask(length: int) -> np.ndarray:
  """[1, 1, T, T] boolean mask: query t may attend to keys s <= t (a numpy constant)."""
  return np.tril(np.ones((length, length), dtype=np.bool_))[None, None]


def padding_mask(valid_BS: jnp.ndarray) -> jnp.ndarray:
  """[B, 1, 1, S] boolean mask: no query attends to a padding key (valid_BS False)."""
  return valid_BS.astype(jnp.bool_)[:, None, None, :]


def segment_mask(segment_ids_BT: jnp.ndarray) -> jnp.ndarray:
  """[B, 1, T, T] boolean mask: a query attends only to keys of its own packed document."""
  return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
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


def attention_weights(q_BHTK, k_BGSK, mask_B1TS=None, *, causal: bool = False):
  """Float32 softmax(q k^T / sqrt(K)) as [B, G, R, T, S]: each group of R query heads shares one key head."""
  _check_causal(causal, q_BHTK.shape[2], k_BGSK.shape[2])
  return _masked_probs(_grouped_scaled_queries(q_BHTK, k_BGSK.shape[1]), k_BGSK, mask_B1TS, causal)


def _ungroup(out_BGRTK):
  batch, num_groups, per_group, q_len, head_dim = out_BGRTK.shape
  return out_BGRTK.reshape(batch, num_groups * per_group, q_len, head_dim)


def attend(probs_BGRTS, v_BGSK, dtype=jnp.float32):
  """Weighted sum of values: [B, H, T, K] from grouped probabilities and values."""
  return _ungroup(jnp.einsum("bgrts,bgsk->bgrtk", probs_BGRTS.astype(dtype), v_BGSK.astype(dtype)))


def _flash_attention_applies(mask_B1TS, dtype, head_dim: int) -> bool:
  """cuDNN's fused (flash) attention: on an NVIDIA GPU of compute capability 8.0 or newer, in
  bfloat16 or float16, head width a multiple of 8 up to 128, and no mask beyond causality.
  Decided at trace time; everything else takes dot_product_attention."""
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return False
  if head_dim % 8 or head_dim > 128 or mask_B1TS is not None:
    return False
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  return float(capability) >= 8.0


def flash_attention(q_BTHK, k_BTGK, v_BTGK, *, causal: bool, implementation: str | None = "cudnn"):
  """jax.nn.dot_product_attention in the [B, T, heads, K] layout the projections produce;
  implementation="cudnn" never materialises the [T, S] scores (and skips the masked half)."""
  return jax.nn.dot_product_attention(
      q_BTHK, k_BTGK, v_BTGK, is_causal=causal, implementation=implementation
  )


def dot_product_attention(
    q_BHTK, k_BGSK, v_BGSK, mask_B1TS=None, *, causal: bool = False, dtype=jnp.float32
):
  """softmax(q k^T / sqrt(K)) v as [B, H, T, K], under `mask_B1TS` (any shape broadcastable to
  [B, 1, T, S]) and, with `causal`, query t seeing only keys s <= t. The backward is written out
  (_attention_core)."""
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


class _Einsum(nn.Module):
  """y = einsum(equation, x, kernel) + bias, with logically named kernel and bias axes.

  Used instead of nn.DenseGeneral, whose flattened-kernel initialisation clashes with logical
  sharding constraints on multi-dimensional kernels.
  """

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]  # the kernel's trailing (output) axes
  use_bias: bool
  kernel_init: nn.initializers.Initializer
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        self.kernel_shape,
        self.param_dtype,
    )
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = jnp.einsum(self.equation, x, kernel)
    if self.use_bias:
      bias_shape = self.kernel_shape[-len(self.bias_axes) :]
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes),
          bias_shape,
          self.param_dtype,
      )
      y = y + bias.astype(y.dtype)
    return y


class MultiHeadAttention(nn.Module):
  """Self-attention with H query heads sharing G key/value heads (G = H is multi-head, G = 1 multi-query).

  Attributes:
    num_heads: query heads H.
    head_dim: width K of each head.
    num_kv_heads: key/value heads G; must divide num_heads. None means G = H.
    use_bias: biases on the query, key and value projections (and the output's, unless out_bias).
    out_bias: a bias on the output projection; None means as use_bias (Qwen2 has q/k/v biases only).
    qk_norm_epsilon: RMS-normalise each query and key head (over K, one learned scale for all
      heads) before rotary, with this epsilon, as Qwen3 does; None for no q/k norm.
    rotary_base: apply rotary position embeddings to q and k with this base; None for no rotation.
    rotary_scaling: rescale the rotary frequencies (Llama 3.1); None keeps them.
    cache_len: keys and values the KV cache holds when called with `decode=True`.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  use_bias: bool = True
  out_bias: bool | None = None
  dropout_rate: float = 0.0
  qk_norm_epsilon: float | None = None
  rotary_base: float | None = None
  rotary_scaling: position.Llama3Scaling | None = None
  cache_len: int = 2048
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)
  out_kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

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
    """Query t sees the keys `mask_B1TS` allows and, with `causal`, only keys s <= t.
    With `decode=True` the new keys and values are appended to the `cache` collection and the
    queries attend causally to everything cached so far (`mask_B1TS` and `causal` are then ignored);
    rotary positions then default to the tokens' places after what is cached. The cache holds
    `cache_len` positions: decode no further (a traced index cannot be checked inside jit, and
    `bigjax.sample` stops there)."""
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={self.num_heads}")

    def project(name, heads, heads_axis):
      return _Einsum(
          "btd,dhk->bthk",
          (x_BTD.shape[-1], heads, self.head_dim),
          ("embed", heads_axis, "head_dim"),
          (heads_axis, "head_dim"),
          self.use_bias,
          self.kernel_init,
          self.dtype,
          self.param_dtype,
          name=name,
      )(x_BTD)

    q_BTHK = project("query", self.num_heads, "heads")
    k_BTGK = project("key", num_kv_heads, "kv_heads")
    v_BTGK = project("value", num_kv_heads, "kv_heads")
    if self.qk_norm_epsilon is not None:
      q_BTHK = self._head_norm("query_norm")(q_BTHK)
      k_BTGK = self._head_norm("key_norm")(k_BTGK)
    if self.rotary_base is not None:
      if positions_BT is None:
        positions_BT = self._positions_already_cached(decode) + jnp.arange(x_BTD.shape[1])[None, :]
      q_BTHK = position.apply_rotary(q_BTHK, positions_BT, self.rotary_base, self.rotary_scaling)
      k_BTGK = position.apply_rotary(k_BTGK, positions_BT, self.rotary_base, self.rotary_scaling)

    dropout = train and self.dropout_rate > 0.0
    if not (decode or dropout) and _flash_attention_applies(mask_B1TS, self.dtype, self.head_dim):
      out_BTHK = flash_attention(q_BTHK, k_BTGK, v_BTGK, causal=causal)
      return self._output(out_BTHK, x_BTD.shape[-1])

    # Heads before time: the score and value matmuls then batch over (B, H) with contiguous
    # [T, K] operands, which is markedly faster on CPU than contracting the [B, T, H, K] layout.
    q_BHTK = nn.with_logical_constraint(
        q_BTHK.transpose(0, 2, 1, 3), ("batch", "act_heads", "length", None)
    )
    k_BGSK = nn.with_logical_constraint(
        k_BTGK.transpose(0, 2, 1, 3), ("batch", "act_kv_heads", "length", None)
    )
    v_BGSK = nn.with_logical_constraint(
        v_BTGK.transpose(0, 2, 1, 3), ("batch", "act_kv_heads", "length", None)
    )
    if decode:
      k_BGSK, v_BGSK, mask_B1TS, causal = self._extend_cache(k_BGSK, v_BGSK)
    if dropout:  # dropout on the probabilities: plain autodiff
      probs_BGRTS = attention_weights(q_BHTK, k_BGSK, mask_B1TS, causal=causal)
      probs_BGRTS = nn.Dropout(self.dropout_rate)(probs_BGRTS, deterministic=False)
      out_BHTK = attend(probs_BGRTS, v_BGSK, self.dtype)
    else:
      out_BHTK = dot_product_attention(
          q_BHTK, k_BGSK, v_BGSK, mask_B1TS, causal=causal, dtype=self.dtype
      )
    return self._output(out_BHTK.transpose(0, 2, 1, 3), x_BTD.shape[-1])

  def _head_norm(self, name: str) -> norm.RMSNorm:
    return norm.RMSNorm(
        self.qk_norm_epsilon, self.dtype, self.param_dtype, scale_axis="head_dim", name=name
    )

  def _output(self, out_BTHK, width: int):
    out_bias = self.use_bias if self.out_bias is None else self.out_bias
    return _Einsum(
        "bthk,hkd->btd",
        (self.num_heads, self.head_dim, width),
        ("heads", "head_dim", "embed"),
        ("embed",),
        out_bias,
        self.out_kernel_init,
        self.dtype,
        self.param_dtype,
        name="out",
    )(out_BTHK)

  def _positions_already_cached(self, decode: bool):
    """How many positions the KV cache holds (0 outside decoding): where this call's tokens sit."""
    if decode and self.has_variable("cache", "cache_index"):
      return self.get_variable("cache", "cache_index")
    return 0

  def _extend_cache(self, k_BGTK, v_BGTK):
    """Writes this call's T keys and values at the cache index; returns the whole cache, the mask
    under which query t (at position index + t) sees the cached positions up to its own, and
    whether attention is (additionally) causal."""
    batch, groups, length, head_dim = k_BGTK.shape
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable(
        "cache", "cached_key", jnp.zeros, (batch, groups, self.cache_len, head_dim), k_BGTK.dtype
    )
    cached_value = self.variable(
        "cache", "cached_value", jnp.zeros, (batch, groups, self.cache_len, head_dim), v_BGTK.dtype
    )
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:  # creating the empty cache (model.init): plain causal attention
      return k_BGTK, v_BGTK, None, True
    start = index.value
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_BGTK, (0, 0, start, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_BGTK, (0, 0, start, 0))
    index.value = start + length
    query_pos_T1 = start + jnp.arange(length)[:, None]
    mask_11TS = (jnp.arange(self.cache_len)[None, :] <= query_pos_T1)[None, None]
    return cached_key.value, cached_value.value, mask_11TS, False
