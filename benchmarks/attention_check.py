"""bigjax's fused attention kernels checked against its reference attention on this device.

bigjax.ops.attention picks cuDNN's fused kernel on an NVIDIA GPU (the packed-document variant when
the window holds several documents), Pallas' splash attention on a TPU, and XLA's matmuls
elsewhere. This runs the implementation it picks (or the one --attention_implementation names) on
bfloat16 inputs and `ops.attention.reference` in float32 on the same inputs, and compares the
output at real (non-padding) queries and the gradients with respect to q, k and v, for causal
multi-head and grouped-query attention at GPT-2 medium's shapes, unpacked and packed (random
documents and, in the second example, padding at the end). One JSON line per case, with the
fused-kernel calls in the compiled check; exits 1 if any error is over the tolerance.

  python -m benchmarks.attention_check                                   # what this device picks
  python -m benchmarks.attention_check --attention_implementation=splash \\
      --check_seq_len=128                                                # the TPU kernel, interpreted
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from benchmarks import throughput
from bigjax.ops import attention as attention_ops

IMPLEMENTATION = flags.DEFINE_enum(
    "attention_implementation",
    "auto",
    ["auto", *attention_ops.IMPLEMENTATIONS],
    "auto: what bigjax.ops.attention.implementation picks for each case on this device.",
)
# Relative to the largest reference value: a few bfloat16 roundings (2^-8 each) of the inputs to
# each matmul, accumulated in float32.
TOLERANCE = 2e-2
SEQ_LEN = flags.DEFINE_integer(
    "check_seq_len",
    1024,
    "Time steps of the checked attention (GPT-2 medium's 1024; the CPU dry runs use fewer).",
    lower_bound=1,
)
# (batch, query heads, kv heads, head width, packed): GPT-2 medium's attention, the same with four
# query heads per kv head, and both over packed documents; the time steps come from --check_seq_len.
CASES = (
    (4, 16, 16, 64, False),
    (4, 16, 4, 64, False),
    (4, 16, 16, 64, True),
    (4, 16, 4, 64, True),
)
MEAN_DOCUMENT_LEN = 256


def packed_mask(batch: int, length: int, seed: int = 0) -> attention_ops.Mask:
  """Random documents (mean MEAN_DOCUMENT_LEN tokens) and, in the second example, a padded tail."""
  rng = np.random.default_rng(seed)
  starts = rng.random((batch, length)) < 1 / MEAN_DOCUMENT_LEN
  valid = np.ones((batch, length), bool)
  valid[1, length - length // 8 :] = False
  return attention_ops.Mask(
      segment_ids_BT=jnp.asarray(np.cumsum(starts, axis=1), jnp.int32),
      valid_BS=jnp.asarray(valid),
  )


def outputs_and_grads(attend, q_BTHK, k_BTGK, v_BTGK, cotangent_BTHK):
  """attend(q, k, v) and the gradients of <attend(q, k, v), cotangent> with respect to q, k, v."""
  out, vjp = jax.vjp(attend, q_BTHK, k_BTGK, v_BTGK)
  return (out, *vjp(cotangent_BTHK.astype(out.dtype)))


def relative_errors(got, want) -> list[float]:
  return [
      float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
      for g, w in zip(got, want)
  ]


def check(case, implementation: str) -> dict:
  batch, heads, kv_heads, width, packed = case
  length = SEQ_LEN.value
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (
      jax.random.normal(key, (batch, length, n, width), jnp.bfloat16)
      for key, n in zip(keys[:3], (heads, kv_heads, kv_heads))
  )
  mask = packed_mask(batch, length) if packed else attention_ops.Mask()
  real_BT = jnp.ones((batch, length), bool) if mask.valid_BS is None else mask.valid_BS
  real_BT11 = real_BT.astype(jnp.float32)[:, :, None, None]
  # Padding queries' outputs are defined by no implementation: they get no cotangent.
  cotangent = jax.random.normal(keys[3], (batch, length, heads, width), jnp.float32) * real_BT11
  if implementation == "auto":
    implementation = attention_ops.implementation(q.shape, k.shape, q.dtype, mask)
  fused = lambda q, k, v: attention_ops.attention(
      q, k, v, mask, causal=True, dtype=q.dtype, implementation_name=implementation
  )
  reference = lambda q, k, v: attention_ops.reference(q, k, v, mask, causal=True)
  # Compiled once, ahead of time: the same executable runs and shows which kernels it holds.
  fused_step = jax.jit(lambda *a: outputs_and_grads(fused, *a)).lower(q, k, v, cotangent).compile()
  got = fused_step(q, k, v, cotangent)
  want = jax.jit(lambda *a: outputs_and_grads(reference, *a))(q, k, v, cotangent)
  got, want = ((out * real_BT11, *grads) for out, *grads in (got, want))
  errors = dict(zip(("out", "dq", "dk", "dv"), relative_errors(got, want)))
  return {
      "check": "attention",
      "implementation": implementation,
      "device": jax.devices()[0].device_kind,
      "batch": batch,
      "seq_len": length,
      "heads": heads,
      "kv_heads": kv_heads,
      "head_dim": width,
      "packed_documents": packed,
      **throughput.fused_attention_calls(fused_step.as_text()),
      "relative_errors": errors,
      "tolerance": TOLERANCE,
      "ok": max(errors.values()) <= TOLERANCE,
  }


def main(argv):
  del argv
  records = [check(case, IMPLEMENTATION.value) for case in CASES]
  for record in records:
    print(json.dumps(record), flush=True)
  if not all(record["ok"] for record in records):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
