"""Where a Transformer LM's training time goes on this machine, beside PyTorch's: prints JSON lines.

  python -m benchmarks.breakdown --model=transformer-tiny --model_override=num_layers=4 \
      --batch_size=16 --seq_len=256

bigjax, forward + backward of the real loss (no optimizer), each variant compiled once and timed
in alternating rounds (benchmarks.throughput.alternate_rounds):
  model            the preset as configured;
  no_attention     the same, with the attention core (scores, softmax, weighted values and their
                   backward) replaced by q + k + v: what the core costs is the difference;
  dense_skeleton   only the preset's dense matmuls (q, k, v, output, MLP in and out, per layer),
                   as plain jnp on [B * T, D] arrays: the floor XLA's matmuls set on this machine.
PyTorch (when installed; profiled first, before XLA's thread pools exist): torch.profiler over the
reference train step (benchmarks.torch_reference), milliseconds per step in matmuls, in
scaled_dot_product_attention (forward and backward), and in everything else (optimizer included).

A per-operation profile (benchmarks/profile_step.py) cannot answer this on CPU: XLA runs
independent operations concurrently, so their individual times overlap, and removing an operation
the profile blames does not always shorten the step (benchmarks/README.md).
"""

import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import throughput
from bigjax import flags as bigjax_flags
from bigjax.errors import UserError
from bigjax.nn import attention
from bigjax.nn import transformer


def loss_gradient(workload: throughput.Workload):
  """Compiled gradient of the task's mean loss with respect to the parameters, and the parameters."""
  variables = nn.unbox(workload.task.init(workload.model, jax.random.key(0), workload.batch))

  def loss(params):
    sums, _ = workload.task.loss_sums(workload.model, {**variables, "params": params}, workload.batch)
    return sums["loss"] / sums["count"]

  return jax.jit(jax.grad(loss)), variables["params"]


def _attention_without_core(q_BHTK, k_BGSK, v_BGSK, mask_B1TS=None, *, causal=False, dtype=jnp.float32):
  del mask_B1TS, causal
  return (q_BHTK + k_BGSK + v_BGSK).astype(dtype)


def without_attention_core(workload: throughput.Workload):
  """loss_gradient with the attention core replaced; compiled (traced) while replaced."""
  original = attention.dot_product_attention
  attention.dot_product_attention = _attention_without_core
  try:
    grad_fn, params = loss_gradient(workload)
    jax.block_until_ready(grad_fn(params))
  finally:
    attention.dot_product_attention = original
  return grad_fn, params


def dense_skeleton(cfg: transformer.TransformerConfig, tokens: int):
  """A chain of the preset's dense matmuls only, x -> x + ((x Wq + x Wk + x Wv) Wo) -> x + (x W1) W2
  per layer in float32 on [tokens, D], as (forward function, its parameters, forward + backward
  matmul FLOPs)."""
  rng = np.random.default_rng(0)
  width, hidden = cfg.embed_dim, cfg.mlp_dim
  shapes = {"q": (width, width), "k": (width, width), "v": (width, width), "o": (width, width),
            "w1": (width, hidden), "w2": (hidden, width)}
  params = [{name: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02) for name, shape in shapes.items()}
            for _ in range(cfg.num_layers)]
  x_ND = jnp.asarray(rng.standard_normal((tokens, width), np.float32))

  def chain(params):
    x = x_ND
    for p in params:
      x = x + (x @ p["q"] + x @ p["k"] + x @ p["v"]) @ p["o"]
      x = x + (x @ p["w1"]) @ p["w2"]
    return jnp.sum(x * x)

  flops = 3 * 2 * tokens * cfg.num_layers * (4 * width * width + 2 * width * hidden)
  return chain, params, flops


def torch_breakdown(workload: throughput.Workload, steps: int = 3) -> dict | None:
  try:
    import torch

    from benchmarks import torch_reference
  except ImportError:
    return None
  runner = torch_reference.TorchRunner(workload, bigjax_flags.optim_config(), bigjax_flags.SEED.value)
  for _ in range(2):
    runner.step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(steps):
      runner.step()
  groups = {"matmul": 0.0, "attention": 0.0, "total": 0.0}
  for event in profile.key_averages():
    ms = event.self_cpu_time_total / 1e3 / steps
    groups["total"] += ms
    if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
      groups["matmul"] += ms
    elif "scaled_dot_product" in event.key:
      groups["attention"] += ms
  groups["other"] = groups["total"] - groups["matmul"] - groups["attention"]
  return {"framework": "pytorch", "profiled_steps": steps, **{f"{k}_ms": round(v, 1) for k, v in groups.items()}}


def main(argv):
  del argv
  workload = throughput.workload_from_flags()
  if not isinstance(workload.model, transformer.TransformerLM):
    raise UserError(f"benchmarks.breakdown takes a Transformer LM preset, not {workload.name}")
  torch_record = torch_breakdown(workload)
  variants = {"model": loss_gradient(workload), "no_attention": without_attention_core(workload)}
  chain, skeleton_params, skeleton_flops = dense_skeleton(workload.model.config, workload.units_per_step)
  variants["dense_skeleton"] = (jax.jit(jax.grad(chain)), skeleton_params)
  steps = {name: (lambda fn=fn, params=params: fn(params)) for name, (fn, params) in variants.items()}
  times, _ = throughput.alternate_rounds(steps, throughput.ROUNDS.value, throughput.BENCH_STEPS.value,
                                         throughput.BENCH_WARMUP.value)
  medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
  print(json.dumps({"framework": "bigjax", "pass": "forward+backward",
                    **{f"{name}_ms": round(ms, 1) for name, ms in medians.items()},
                    "attention_core_ms": round(medians["model"] - medians["no_attention"], 1),
                    "dense_skeleton_gflops": round(skeleton_flops / medians["dense_skeleton"] / 1e6, 1)}), flush=True)
  if torch_record is not None:
    print(json.dumps(torch_record), flush=True)


if __name__ == "__main__":
  bigjax_flags.run(main)
