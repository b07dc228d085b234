"""cuDNN's fused attention checked against bigjax's own attention on this device.

bigjax's Transformers call `jax.nn.dot_product_attention(implementation="cudnn")` on an Ampere or
newer GPU in bfloat16 (`bigjax.ops.attention.cudnn_attention`); everywhere else they run bigjax's
own attention with its written-out backward. This runs both on the same bfloat16 inputs, the
fused kernel in bfloat16 and bigjax's in float32, and compares the output and the gradients with
respect to q, k and v, for causal multi-head and grouped-query attention at GPT-2 medium's shapes.
One JSON line per case; exits 1 if any error is over the tolerance.

  python -m benchmarks.attention_check                                 # on a GPU
  python -m benchmarks.attention_check --attention_implementation=xla  # the same call, XLA's kernels
"""

import json
import sys

import jax
import jax.numpy as jnp
from absl import app
from absl import flags

from bigjax.ops import attention as attention_ops

IMPLEMENTATION = flags.DEFINE_enum(
    "attention_implementation",
    "cudnn",
    ["cudnn", "xla"],
    "The implementation jax.nn.dot_product_attention is asked for.",
)
# Relative to the largest reference value: a few bfloat16 roundings (2^-8 each) of the inputs to
# each matmul, accumulated in float32.
TOLERANCE = 2e-2
SEQ_LEN = flags.DEFINE_integer(
    "check_seq_len",
    1024,
    "Time steps of the checked attention (GPT-2 medium's "
    "1024; the CPU dry run of gpu.sh uses fewer).",
    lower_bound=1,
)
# (batch, query heads, kv heads, head width): GPT-2 medium's attention, and the same with four
# query heads per kv head; the time steps come from --check_seq_len.
CASES = ((4, 16, 16, 64), (4, 16, 4, 64))


def outputs_and_grads(attend, q_BTHK, k_BTGK, v_BTGK, cotangent_BTHK):
  """attend(q, k, v) and the gradients of <attend(q, k, v), cotangent> with respect to q, k, v."""
  out, vjp = jax.vjp(attend, q_BTHK, k_BTGK, v_BTGK)
  return (out, *vjp(cotangent_BTHK.astype(out.dtype)))


def bigjax_attention(q_BTHK, k_BTGK, v_BTGK):
  """bigjax's own causal attention, in float32, in the fused call's [B, T, heads, K] layout."""
  to_heads_first = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  out_BHTK = attention_ops.grouped_attention(
      to_heads_first(q_BTHK), to_heads_first(k_BTGK), to_heads_first(v_BTGK), causal=True
  )
  return out_BHTK.transpose(0, 2, 1, 3)


def relative_errors(got, want) -> list[float]:
  return [
      float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
      for g, w in zip(got, want)
  ]


def check(case, implementation: str) -> dict:
  batch, heads, kv_heads, width = case
  length = SEQ_LEN.value
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (
      jax.random.normal(key, (batch, length, n, width), jnp.bfloat16)
      for key, n in zip(keys[:3], (heads, kv_heads, kv_heads))
  )
  cotangent = jax.random.normal(keys[3], (batch, length, heads, width), jnp.float32)
  fused = lambda q, k, v: attention_ops.cudnn_attention(
      q, k, v, causal=True, implementation=implementation
  )
  got = jax.jit(lambda *a: outputs_and_grads(fused, *a))(q, k, v, cotangent)
  want = jax.jit(lambda *a: outputs_and_grads(bigjax_attention, *a))(q, k, v, cotangent)
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
