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


def _inputs(kind: str, dtype=jnp.float32, length: int = 8, head_dim: int = 8):
  """q [B, T, H, K], k and v [B, T, G, K] and the Mask for one kind of input (T a multiple of 8)."""
  keys = jax.random.split(jax.random.key(3), 3)
  heads, kv_heads = (4, 2) if kind in ("grouped", "packed_grouped") else (4, 4)
  q = jax.random.normal(keys[0], (2, length, heads, head_dim), dtype)
  k, v = (jax.random.normal(key, (2, length, kv_heads, head_dim), dtype) for key in keys[1:])
  eighth = length // 8
  mask = ops.Mask()
  if kind in ("packed", "packed_grouped", "packed_padded"):
    # two documents in the first window, three in the second
    segments = np.repeat([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2, 2]], eighth, axis=1)
    mask = ops.Mask(segment_ids_BT=jnp.asarray(segments))
  if kind in ("padded", "packed_padded"):
    valid = np.repeat([[True] * 8, [True] * 5 + [False] * 3], eighth, axis=1)
    mask = mask.replace(valid_BS=jnp.asarray(valid))
  if kind == "dense":
    mask = ops.Mask(
        dense_B1TS=jnp.asarray(np.random.default_rng(0).random((2, 1, length, length))) > 0.3
    )
  return q, k, v, mask


def _real_queries(mask, q):
  """1 where a query is a real token, 0 for padding (whose output no implementation defines)."""
  if mask.valid_BS is None:
    return jnp.ones(q.shape[:2] + (1, 1), q.dtype)
  return mask.valid_BS[:, :, None, None].astype(q.dtype)


def _values_and_grads(fn, q, k, v, mask, causal):
  """The outputs at real queries and the q/k/v gradients of a random loss over them."""
  weight = _real_queries(mask, q)
  cotangent = jax.random.normal(jax.random.key(4), q.shape) * weight
  out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask, causal=causal), q, k, v)
  return out * weight, vjp(cotangent)


KINDS = ["causal", "packed", "padded", "packed_padded", "grouped", "packed_grouped"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_attention_this_platform_runs_equals_the_reference(kind):
  q, k, v, mask = _inputs(kind)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda: _values_and_grads(ops.attention, q, k, v, mask, True))()
    want = jax.jit(lambda: _values_and_grads(ops.reference, q, k, v, mask, True))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


@pytest.mark.parametrize(
    "kind, causal",
    [(kind, True) for kind in KINDS] + [("packed_padded", False), ("grouped", False)],
)
def test_splash_attention_in_interpret_mode_equals_the_reference(kind, causal):
  """The TPU kernel (Pallas' splash attention) run by Pallas' interpreter: values at real queries
  and q/k/v gradients, causal or not, packed, padded, grouped."""
  q, k, v, mask = _inputs(kind, length=128, head_dim=16)
  splash = lambda *a, **kw: ops.attention(*a, **kw, implementation_name="splash")
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda: _values_and_grads(splash, q, k, v, mask, causal))()
    want = jax.jit(lambda: _values_and_grads(ops.reference, q, k, v, mask, causal))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_splash_attention_under_a_mesh_equals_the_reference():
  """Sharded over data, fsdp and tensor (8 CPU devices), splash runs per device under shard_map."""
  from bigjax import sharding
  import flax.linen as nn

  q, k, v, mask = _inputs("packed_grouped", length=128, head_dim=16)
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # batch 4: over data x fsdp
  mask = mask.replace(segment_ids_BT=jnp.concatenate([mask.segment_ids_BT] * 2))
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  splash = lambda *a, **kw: ops.attention(*a, **kw, implementation_name="splash")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    with jax.default_matmul_precision("highest"):
      got = jax.jit(lambda: _values_and_grads(splash, q, k, v, mask, True))()
  with jax.default_matmul_precision("highest"):
    want = jax.jit(lambda: _values_and_grads(ops.reference, q, k, v, mask, True))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=2e-5)


def test_packed_documents_are_the_runs_of_equal_segment_ids():
  """cuDNN's packed layout (lengths and offsets, -1 past the last document), against a loop."""
  ids = np.asarray([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
  ids[0, 6:] = np.iinfo(np.int32).min  # padding is a document of its own
  lengths, offsets = jax.jit(ops.packed_documents)(jnp.asarray(ids))
  for row, ids_T in enumerate(ids):
    starts = [t for t in range(len(ids_T)) if t == 0 or ids_T[t] != ids_T[t - 1]]
    runs = np.diff(starts + [len(ids_T)])
    np.testing.assert_array_equal(lengths[row], list(runs) + [-1] * (8 - len(runs)))
    np.testing.assert_array_equal(offsets[row], starts + [-1] * (9 - len(starts)))


def test_the_fused_kernels_put_padding_apart_from_every_document():
  mask = ops.Mask(
      segment_ids_BT=jnp.asarray([[0, 0, 1, 1]]), valid_BS=jnp.asarray([[True, True, True, False]])
  )
  ids = np.asarray(mask.kernel_segment_ids(4))
  assert ids[0, :3].tolist() == [0, 0, 1] and ids[0, 3] not in (0, 1)
  padded_only = ops.Mask(valid_BS=jnp.asarray([[True, False]]))
  assert (
      np.asarray(padded_only.kernel_segment_ids(2))[0, 0]
      != np.asarray(padded_only.kernel_segment_ids(2))[0, 1]
  )


def test_the_cudnn_packed_call_is_where_jax_keeps_it():
  """The private route private_apis.cudnn_packed_attention takes: the function, its packed-layout
  arguments and the padding mask types (it runs only on a Hopper GPU: benchmarks/gpu.sh)."""
  import inspect

  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  parameters = inspect.signature(cudnn.dot_product_attention).parameters
  for name in ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type"):
    assert name in parameters, name
  assert cudnn.MaskType.PADDING_CAUSAL and cudnn.MaskType.PADDING


def _choice(kind, dtype=jnp.bfloat16, platform="gpu", capability=9.0, length=128, head_dim=64):
  q, k, _, mask = _inputs(kind, length=length, head_dim=8)
  shape = q.shape[:-1] + (head_dim,)
  return ops.implementation(
      shape, k.shape, dtype, mask, platform=platform, gpu_capability=capability
  )


@pytest.mark.parametrize("kind", KINDS + ["dense"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_on_cpu_every_input_takes_the_xla_path(kind, dtype):
  assert _choice(kind, dtype, platform="cpu") == "xla"


def test_on_cpu_the_default_platform_is_this_one():
  q, k, _, mask = _inputs("packed")
  assert ops.implementation(q.shape, k.shape, jnp.bfloat16, mask) == "xla"


@pytest.mark.parametrize("kind", KINDS)
def test_on_a_hopper_gpu_half_precision_goes_to_cudnn(kind):
  want = "cudnn" if kind in ("causal", "grouped") else "cudnn_packed"
  assert _choice(kind) == want
  assert _choice(kind, dtype=jnp.float16) == want


def test_on_a_gpu_the_xla_path_takes_what_cudnn_cannot():
  assert _choice("causal", dtype=jnp.float32) == "xla"  # float32
  assert _choice("causal", head_dim=160) == "xla"  # too wide
  assert _choice("causal", head_dim=60) == "xla"  # not a multiple of 8
  assert _choice("dense") == "xla"  # an arbitrary mask
  assert _choice("causal", capability=7.5) == "xla"  # before Ampere
  assert _choice("causal", capability=8.0) == "cudnn"  # Ampere: unmasked only
  assert _choice("packed", capability=8.0) == "xla"  # the packed layout needs Hopper
  q, k, _, mask = _inputs("packed", length=128, head_dim=64)
  cross = ops.implementation(
      q.shape, k[:, :64].shape, jnp.bfloat16, mask, platform="gpu", gpu_capability=9.0
  )
  assert cross == "xla"  # segment ids are self-attention's


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_on_a_tpu_splash_takes_every_self_attention_of_a_multiple_of_128(kind, dtype):
  assert _choice(kind, dtype, platform="tpu") == "splash"
  assert _choice(kind, dtype, platform="tpu", length=120) == "xla"
  assert _choice("dense", dtype, platform="tpu") == "xla"


def test_an_unknown_or_unfit_implementation_is_refused():
  q, k, v, mask = _inputs("packed")
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    ops.attention(q, k, v, mask, implementation_name="flash")
  with pytest.raises(ValueError, match="the cudnn implementation takes no mask"):
    ops.attention(q, k, v, mask, implementation_name="cudnn")


def test_a_language_model_trained_through_splash_gets_the_xla_paths_loss_and_gradients():
  """A 2-layer Llama-style LM (grouped heads, rotary) on packed windows, layers scanned and
  rematerialised, sharded over data, fsdp and tensor: `attention="splash"` (Pallas' interpreter
  here) gives the loss and parameter gradients of the default path."""
  import flax.linen as nn

  from bigjax import lm_inputs
  from bigjax import models
  from bigjax import sharding
  from bigjax import tasks
  from bigjax import train

  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 256, (4, 129)).astype(np.int32)
  tokens[rng.random(tokens.shape) < 1 / 40] = 0  # end-of-document tokens
  windows = [lm_inputs.document_segments(row, 0) for row in tokens]
  batch = {"tokens": tokens, **{k: np.stack([w[k] for w in windows]) for k in windows[0]}}
  overrides = dict(
      num_layers=2,
      embed_dim=64,
      num_heads=4,
      num_kv_heads=2,
      mlp_dim=128,
      position="rotary",
      norm="rmsnorm",
      mlp="gated",
      activation="silu",
      scan_layers=True,
      remat="full",
  )
  task = tasks.LanguageModelling()
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  results = {}
  for kernel in ("xla", "splash"):
    model = models.create("transformer-tiny", attention=kernel, **overrides)
    with train.mesh_context(mesh):
      params = nn.unbox(task.init(model, jax.random.key(0), batch))["params"]

      def loss(params):
        sums = task.loss_sums(model, {"params": params}, batch)[0]
        return sums["loss"] / sums["count"]

      with jax.default_matmul_precision("highest"):
        results[kernel] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(results["splash"][0], results["xla"][0], rtol=1e-5)
  for got, want in zip(*(jax.tree.leaves(results[k][1]) for k in ("splash", "xla")), strict=True):
    np.testing.assert_allclose(got, want, atol=2e-5)
  with pytest.raises(Exception, match="unknown attention kernel 'flash'"):
    models.create("transformer-tiny", attention="flash")
