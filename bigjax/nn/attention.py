"""Multi-head and grouped-query attention (Vaswani et al. 2017; Ainslie et al. 2023): projections,
rotary positions, a KV cache for decoding, and masks. The attention itself is bigjax.ops.attention,
which picks its implementation for the platform.

Shapes are named by suffix: B batch, T query time, S key time, D model width, H query heads,
G key/value heads (groups), R = H / G query heads per group, K head dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.nn import norm
from bigjax.nn import position
from bigjax.ops import attention as ops

# Models build their masks from these (a Mask keeps the parts; the others make arrays).
from bigjax.ops.attention import IMPLEMENTATIONS  # noqa: F401
from bigjax.ops.attention import Mask  # noqa: F401
from bigjax.ops.attention import combine_masks  # noqa: F401
from bigjax.ops.attention import padding_mask  # noqa: F401
from bigjax.ops.attention import segment_mask  # noqa: F401


def causal_mask(length: int) -> np.ndarray:
  """[1, 1, T, T] boolean mask: query t may attend to keys s <= t (a numpy constant)."""
  return np.tril(np.ones((length, length), dtype=np.bool_))[None, None]


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
  """Attention with H query heads sharing G key/value heads (G = H is multi-head, G = 1 multi-query):
  self-attention, or with `cross_attention` queries from one sequence and keys and values from
  another (an encoder's output).

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
    implementation: the attention kernel (one of IMPLEMENTATIONS); None lets
      bigjax.ops.attention pick it for the platform and inputs.
    cross_attention: keys and values come from the call's `kv_BSD`, not from `x_BTD`; positions
      (rotary) and causality do not apply across the two sequences.
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
  implementation: str | None = None
  cross_attention: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)
  out_kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(
      self,
      x_BTD,
      mask=None,
      positions_BT=None,
      *,
      kv_BSD=None,
      causal: bool = False,
      train: bool = False,
      decode: bool = False,
  ):
    """Query t sees the keys `mask` allows (an ops.attention.Mask, which fused kernels take as it
    is, or a boolean array broadcastable to [B, 1, T, S]) and, with `causal`, only keys s <= t.
    With `decode=True` the new keys and values are appended to the `cache` collection and the
    queries attend causally to everything cached so far (`mask` and `causal` are then ignored);
    rotary positions then default to the tokens' places after what is cached. The cache holds
    `cache_len` positions: decode no further (a traced index cannot be checked inside jit, and
    `bigjax.sample` stops there).

    Cross-attention takes the keys' sequence as `kv_BSD` and its padding in `mask` (a Mask with
    valid_BS). When decoding, the keys and values computed from `kv_BSD` are kept in the cache
    and later calls pass kv_BSD=None to reuse them: the encoder's side is projected once."""
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={self.num_heads}")

    def project(name, heads, heads_axis, inputs_BTD):
      return _Einsum(
          "btd,dhk->bthk",
          (inputs_BTD.shape[-1], heads, self.head_dim),
          ("embed", heads_axis, "head_dim"),
          (heads_axis, "head_dim"),
          self.use_bias,
          self.kernel_init,
          self.dtype,
          self.param_dtype,
          name=name,
      )(inputs_BTD)

    q_BTHK = project("query", self.num_heads, "heads", x_BTD)
    if self.qk_norm_epsilon is not None:
      q_BTHK = self._head_norm("query_norm")(q_BTHK)
    if self.cross_attention:
      k_BSGK, v_BSGK = self._cross_keys_and_values(project, num_kv_heads, kv_BSD, decode)
      return self._attend(q_BTHK, k_BSGK, v_BSGK, mask, x_BTD.shape[-1], train=train)
    k_BTGK = project("key", num_kv_heads, "kv_heads", x_BTD)
    v_BTGK = project("value", num_kv_heads, "kv_heads", x_BTD)
    if self.qk_norm_epsilon is not None:
      k_BTGK = self._head_norm("key_norm")(k_BTGK)
    if self.rotary_base is not None:
      if positions_BT is None:
        positions_BT = self._positions_already_cached(decode) + jnp.arange(x_BTD.shape[1])[None, :]
      q_BTHK = position.apply_rotary(q_BTHK, positions_BT, self.rotary_base, self.rotary_scaling)
      k_BTGK = position.apply_rotary(k_BTGK, positions_BT, self.rotary_base, self.rotary_scaling)

    width = x_BTD.shape[-1]
    if not decode:
      return self._attend(q_BTHK, k_BTGK, v_BTGK, mask, width, causal=causal, train=train)
    # Decoding works heads-first, keys and values from the cache.
    q_BHTK, k_BGSK, v_BGSK = (x.transpose(0, 2, 1, 3) for x in (q_BTHK, k_BTGK, v_BTGK))
    k_BGSK, v_BGSK, mask_B1TS, causal = self._extend_cache(k_BGSK, v_BGSK)
    out_BHTK = ops.grouped_attention(
        q_BHTK, k_BGSK, v_BGSK, mask_B1TS, causal=causal, dtype=self.dtype
    )
    return self._output(out_BHTK.transpose(0, 2, 1, 3), width)

  def _attend(self, q_BTHK, k_BSGK, v_BSGK, mask, width: int, *, causal=False, train=False):
    """The attention of every query at once, and the output projection."""
    if not (train and self.dropout_rate > 0.0):
      out_BTHK = ops.attention(
          q_BTHK,
          k_BSGK,
          v_BSGK,
          mask,
          causal=causal,
          dtype=self.dtype,
          implementation_name=self.implementation,
      )
      return self._output(out_BTHK, width)
    # Dropout on the probabilities, heads-first under plain autodiff.
    q_BHTK, k_BGSK, v_BGSK = (x.transpose(0, 2, 1, 3) for x in (q_BTHK, k_BSGK, v_BSGK))
    probs_BGRTS = ops.probabilities(q_BHTK, k_BGSK, ops.as_mask(mask).dense(), causal=causal)
    probs_BGRTS = nn.Dropout(self.dropout_rate)(probs_BGRTS, deterministic=False)
    out_BHTK = ops.attend(probs_BGRTS, v_BGSK, self.dtype)
    return self._output(out_BHTK.transpose(0, 2, 1, 3), width)

  def _cross_keys_and_values(self, project, num_kv_heads: int, kv_BSD, decode: bool):
    """The other sequence's keys and values: projected from kv_BSD, or in decoding taken from the
    cache that the call which gave kv_BSD filled."""
    if kv_BSD is None:
      if not (decode and self.has_variable("cache", "cross_key")):
        raise ValueError(
            "cross-attention needs kv_BSD, except when decoding after a call that gave it"
        )
      return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    k_BSGK = project("key", num_kv_heads, "kv_heads", kv_BSD)
    v_BSGK = project("value", num_kv_heads, "kv_heads", kv_BSD)
    if self.qk_norm_epsilon is not None:
      k_BSGK = self._head_norm("key_norm")(k_BSGK)
    if decode:
      self.put_variable("cache", "cross_key", k_BSGK)
      self.put_variable("cache", "cross_value", v_BSGK)
    return k_BSGK, v_BSGK

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
