"""Attention, the kernel layer: one public `attention` that picks its implementation for the
platform and the inputs, the implementations, and `reference`, the plain softmax(q k^T / sqrt(K)) v
under autodiff that the tests hold every implementation to (values and q/k/v gradients).

Implementations, chosen by `implementation()` at trace time:
  cudnn         jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPU of compute
                capability 8.0+, bfloat16 or float16, head width a multiple of 8 up to 128, no
                mask beyond causality.
  cudnn_packed  the same kernel over packed documents and padding (cuDNN's packed layout, through
                JAX's cuDNN module: private_apis.cudnn_packed_attention); Hopper (9.0) or newer,
                self-attention whose mask is segment ids and padding only.
  splash        Pallas' splash attention kernel on TPU (causal or not, segment ids, grouped
                heads): self-attention of a length that is a multiple of 128, mask as above.
                Elsewhere it runs in Pallas' interpret mode, which is how the tests check it.
  xla           grouped_attention: heads-first batched matmuls with the softmax backward written
                out (markedly faster on CPU than autodiff, benchmarks/README.md); everywhere else.
The fused kernels never build the [T, S] scores; only the xla path turns a `Mask` into an array.

Shapes are named by suffix: B batch, T query time, S key time, H query heads, G key/value heads
(groups), R = H / G query heads per group, K head dim, M documents per window.
"""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import private_apis

# Masked scores get the most negative float32 rather than -inf, so that a row whose every key is
# masked (a padding query) gives a uniform softmax instead of NaN.
_MASKED_SCORE = float(jnp.finfo(jnp.float32).min)
# The segment the fused kernels put padding tokens in: apart from every real document.
_PADDING_SEGMENT = int(np.iinfo(np.int32).min)
IMPLEMENTATIONS = ("xla", "cudnn", "cudnn_packed", "splash")


@flax.struct.dataclass
class Mask:
  """Which keys each query may see, kept as the parts it is made of, so that a fused kernel takes
  them as segment ids rather than as a [T, S] array (which only the xla path builds). The mask is
  the AND of the parts given; causality is `attention`'s own argument.

  Attributes:
    segment_ids_BT: self-attention inside packed documents: a query sees the keys of its own id.
      The cuDNN kernel reads each run of equal consecutive ids as one document, as packing makes
      them.
    valid_BS: False for padding keys, which no query sees. What a padding query computes is not
      defined (the xla path and the fused kernels differ there); nothing should read it.
    dense_B1TS: any other boolean mask broadcastable to [B, 1, T, S]; the fused kernels do not
      take one, so it sends attention down the xla path.
  """

  segment_ids_BT: jax.Array | None = None
  valid_BS: jax.Array | None = None
  dense_B1TS: jax.Array | None = None

  def dense(self):
    """The boolean [B?, 1, T?, S] array of the whole mask, or None when it masks nothing."""
    return combine_masks(
        None if self.valid_BS is None else padding_mask(self.valid_BS),
        None if self.segment_ids_BT is None else segment_mask(self.segment_ids_BT),
        self.dense_B1TS,
    )

  @property
  def empty(self) -> bool:
    return self.segment_ids_BT is None and self.valid_BS is None and self.dense_B1TS is None

  def kernel_segment_ids(self, length: int):
    """[B, T] int32 ids for kernels that take only segment ids: the documents, with every padding
    token moved into a segment of its own kind, so real queries see exactly what the mask allows.
    """
    if self.dense_B1TS is not None:
      raise ValueError("a dense mask has no segment ids; it takes the xla path")
    batch = (self.segment_ids_BT if self.valid_BS is None else self.valid_BS).shape[0]
    ids_BT = (
        jnp.zeros((batch, length), jnp.int32)
        if self.segment_ids_BT is None
        else self.segment_ids_BT.astype(jnp.int32)
    )
    if self.valid_BS is not None:
      ids_BT = jnp.where(self.valid_BS, ids_BT, _PADDING_SEGMENT)
    return ids_BT


def as_mask(mask) -> Mask:
  """A Mask from a Mask, a boolean array broadcastable to [B, 1, T, S], or None."""
  if isinstance(mask, Mask):
    return mask
  return Mask() if mask is None else Mask(dense_B1TS=jnp.asarray(mask, jnp.bool_))


def _gpu_capability() -> float:
  return float(getattr(jax.devices()[0], "compute_capability", "0"))


def implementation(
    q_shape,
    k_shape,
    dtype,
    mask=None,
    *,
    platform: str | None = None,
    gpu_capability: float | None = None,
) -> str:
  """What `attention` runs for queries of `q_shape` [B, T, H, K] and keys of `k_shape` under
  `mask` (a Mask, an array or None) on `platform` (default: JAX's backend); see the module
  docstring."""
  mask = as_mask(mask)
  platform = platform or jax.default_backend()
  head_dim, self_attention = q_shape[-1], q_shape[1] == k_shape[1]
  only_segments_and_padding = mask.dense_B1TS is None
  if platform == "gpu":
    capability = _gpu_capability() if gpu_capability is None else gpu_capability
    if (
        capability < 8.0
        or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)
        or head_dim % 8
        or head_dim > 128
    ):
      return "xla"
    if mask.empty:
      return "cudnn"
    if only_segments_and_padding and self_attention and capability >= 9.0:
      return "cudnn_packed"
    return "xla"
  if platform == "tpu" and only_segments_and_padding and self_attention and q_shape[1] % 128 == 0:
    return "splash"
  return "xla"


def attention(
    q_BTHK,
    k_BTGK,
    v_BTGK,
    mask=None,
    *,
    causal: bool = False,
    dtype=jnp.float32,
    implementation_name: str | None = None,
):
  """softmax(q k^T / sqrt(K)) v as [B, T, H, K], in the layout the projections produce, under
  `mask` (a Mask, a boolean array broadcastable to [B, 1, T, S], or None) and, with `causal`,
  query t seeing only keys s <= t, by the implementation `implementation()` picks for this
  platform and these inputs, or by `implementation_name` (one of IMPLEMENTATIONS)."""
  mask = as_mask(mask)
  name = implementation_name or implementation(q_BTHK.shape, k_BTGK.shape, dtype, mask)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; one of {IMPLEMENTATIONS}")
  if name == "cudnn":
    if not mask.empty:
      raise ValueError("the cudnn implementation takes no mask; use cudnn_packed or xla")
    return cudnn_attention(q_BTHK, k_BTGK, v_BTGK, causal=causal)
  if name == "cudnn_packed":
    lengths_BM, offsets_BM1 = packed_documents(mask.kernel_segment_ids(q_BTHK.shape[1]))
    return private_apis.cudnn_packed_attention(
        q_BTHK, k_BTGK, v_BTGK, lengths_BM, offsets_BM1, causal=causal
    )
  if name == "splash":
    segment_ids_BT = None if mask.empty else mask.kernel_segment_ids(q_BTHK.shape[1])
    return splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, causal=causal)
  # Heads before time: the score and value matmuls then batch over (B, H) with contiguous
  # [T, K] operands, which is markedly faster on CPU than contracting the [B, T, H, K] layout.
  q_BHTK = nn.with_logical_constraint(
      q_BTHK.transpose(0, 2, 1, 3), ("batch", "act_heads", "length", None)
  )
  k_BGSK, v_BGSK = (
      nn.with_logical_constraint(x.transpose(0, 2, 1, 3), ("batch", "act_kv_heads", "length", None))
      for x in (k_BTGK, v_BTGK)
  )
  out_BHTK = grouped_attention(q_BHTK, k_BGSK, v_BGSK, mask.dense(), causal=causal, dtype=dtype)
  return out_BHTK.transpose(0, 2, 1, 3)


def cudnn_attention(q_BTHK, k_BTGK, v_BTGK, *, causal: bool, implementation: str = "cudnn"):
  """cuDNN's fused attention, which never materialises the [T, S] scores (and skips the masked
  half); `implementation()` says where it applies. (implementation="xla" runs the same call with
  XLA's kernel: the tests check the call's layout, scaling and grouping on CPU with it.)"""
  return jax.nn.dot_product_attention(
      q_BTHK, k_BTGK, v_BTGK, is_causal=causal, implementation=implementation
  )


def packed_documents(segment_ids_BT):
  """cuDNN's packed layout from segment ids: each window's documents (runs of equal consecutive
  ids) as lengths [B, M] and start offsets [B, M + 1], -1 past the window's last document. M = T,
  the most documents a window can hold, so no window is ever cut short."""
  batch, length = segment_ids_BT.shape
  starts_BT = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
  )
  document_BT = jnp.cumsum(starts_BT, axis=1) - 1
  rows_B1 = jnp.arange(batch)[:, None]
  lengths_BM = jnp.zeros((batch, length), jnp.int32).at[rows_B1, document_BT].add(1)
  # Only a document's first token writes its offset; the others write past the end (dropped).
  offsets_BM = (
      jnp.full((batch, length), -1, jnp.int32)
      .at[rows_B1, jnp.where(starts_BT, document_BT, length)]
      .set(jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)), mode="drop")
  )
  lengths_BM = jnp.where(lengths_BM > 0, lengths_BM, -1)
  return lengths_BM, jnp.pad(offsets_BM, ((0, 0), (0, 1)), constant_values=-1)


def splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT=None, *, causal: bool):
  """Pallas' splash attention (TPU; interpret mode elsewhere): each group of R query heads runs
  the multi-query kernel against its key/value head, per example. Under a mesh, shard_map gives
  each device its examples and, when the tensor axis divides the key/value heads, its groups."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash,
      splash_attention_mask as splash_masks,
  )

  batch, length, num_heads, head_dim = q_BTHK.shape
  num_groups = k_BTGK.shape[2]
  per_group = num_heads // num_groups
  block = min(512, length)
  kernel = splash.make_splash_mqa_single_device(
      splash_masks.MultiHeadMask(
          [(splash_masks.CausalMask if causal else splash_masks.FullMask)((length, length))]
          * per_group
      ),
      block_sizes=splash.BlockSizes(
          block_q=block,
          block_kv=block,
          block_kv_compute=block,
          block_q_dkv=block,
          block_kv_dkv=block,
          block_kv_dkv_compute=block,
          block_q_dq=block,
          block_kv_dq=block,
      ),
      interpret=jax.default_backend() != "tpu",
  )
  if segment_ids_BT is None:
    segment_ids_BT = jnp.zeros((batch, length), jnp.int32)

  def local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT):
    b, t, h, _ = q_BTHK.shape
    g = k_BTGK.shape[2]
    # The kernel does not scale: q / sqrt(K) first, as the reference does.
    q_BGRTK = (q_BTHK * jnp.asarray(head_dim**-0.5, q_BTHK.dtype)).reshape(
        b, t, g, h // g, head_dim
    )
    q_BGRTK = q_BGRTK.transpose(0, 2, 3, 1, 4)
    k_BGSK, v_BGSK = (x.transpose(0, 2, 1, 3) for x in (k_BTGK, v_BTGK))

    def one_example(q_GRTK, k_GSK, v_GSK, ids_T):
      ids = splash.SegmentIds(q=ids_T, kv=ids_T)
      return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_GRTK, k_GSK, v_GSK)

    out_BGRTK = jax.vmap(one_example)(q_BGRTK, k_BGSK, v_BGSK, segment_ids_BT)
    return out_BGRTK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, head_dim)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return local(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)
  batch_axes, heads_axes = nn.logical_to_mesh_axes(("batch", "act_kv_heads"))
  if heads_axes is not None and num_groups % _axes_size(mesh, heads_axes):
    heads_axes = None  # groups must stay whole on a device: gather the heads instead
  if batch_axes is not None and batch % _axes_size(mesh, batch_axes):
    batch_axes = None
  heads_spec = jax.sharding.PartitionSpec(batch_axes, None, heads_axes, None)
  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(heads_spec, heads_spec, heads_spec, jax.sharding.PartitionSpec(batch_axes, None)),
      out_specs=heads_spec,
      check_vma=False,
  )(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT)


def _axes_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes]))


def reference(q_BTHK, k_BTGK, v_BTGK, mask=None, *, causal: bool = False):
  """The plain float32 computation, under autodiff: what every implementation must equal."""
  q_BHTK, k_BGSK, v_BGSK = (
      x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q_BTHK, k_BTGK, v_BTGK)
  )
  probs_BGRTS = probabilities(q_BHTK, k_BGSK, as_mask(mask).dense(), causal=causal)
  return attend(probs_BGRTS, v_BGSK).transpose(0, 2, 1, 3)


def padding_mask(valid_BS):
  """[B, 1, 1, S] boolean mask: no query attends to a padding key (valid_BS False)."""
  return jnp.asarray(valid_BS).astype(jnp.bool_)[:, None, None, :]


def segment_mask(segment_ids_BT):
  """[B, 1, T, T] boolean mask: a query attends only to keys of its own packed document."""
  return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


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
