"""Where a Transformer or LSTM LM's training time goes on this machine, beside PyTorch's: prints
JSON lines.

  python -m benchmarks.breakdown --model=transformer-tiny --model_override=num_layers=4 \
      --batch_size=16 --seq_len=256
  python -m benchmarks.breakdown --model=lstm-lm --model_override=num_layers=2 \
      --batch_size=16 --seq_len=128

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

For an LSTM LM, in alternating rounds, forward + backward of:
  model            the preset's loss as configured;
  recurrent_stack  its recurrent layers alone, on a random [B, T, embed] input;
  matmul_floor     the same layers' matmuls and nothing else: per layer the input projection and its
                   two backward matmuls, T recurrent [B, H] x [H, 4H] steps in a scan, T backward
                   [B, 4H] x [4H, H] steps, and the recurrent kernel's gradient as one matmul;
  torch_stack      (when PyTorch is installed) nn.LSTM of the same sizes on the same shapes.

Every bigjax variant compiles with --xla_option's options, as the train step does.

A per-operation profile (benchmarks/profile_step.py) cannot answer this on CPU: XLA runs
independent operations concurrently, so their individual times overlap, and removing an operation
the profile blames does not always shorten the step (benchmarks/README.md).
"""

import functools
import json
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import throughput
from bigjax import flags as bigjax_flags
from bigjax import train
from bigjax.errors import UserError
from bigjax.ops import attention as attention_ops
from bigjax.nn import recurrent
from bigjax.nn import transformer


def _jit(fn):
  """jax.jit with --xla_option's options for this platform, as the train step gets them (none when
  the flags are not parsed: a test calling these functions directly)."""
  options = {}
  if flags.FLAGS.is_parsed():
    options = train.platform_xla_options(bigjax_flags.xla_options(), jax.default_backend())
  return jax.jit(fn, compiler_options=options or None)


def loss_gradient(workload: throughput.Workload):
  """Compiled gradient of the task's mean loss with respect to the parameters, and the parameters."""
  variables = nn.unbox(workload.task.init(workload.model, jax.random.key(0), workload.batch))

  def loss(params):
    sums, _ = workload.task.loss_sums(
        workload.model, {**variables, "params": params}, workload.batch
    )
    return sums["loss"] / sums["count"]

  return _jit(jax.grad(loss)), variables["params"]


def _attention_without_core(
    q_BHTK, k_BGSK, v_BGSK, mask_B1TS=None, *, causal=False, dtype=jnp.float32
):
  del mask_B1TS, causal
  return (q_BHTK + k_BGSK + v_BGSK).astype(dtype)


def without_attention_core(workload: throughput.Workload):
  """loss_gradient with the attention core replaced; compiled (traced) while replaced."""
  original = attention_ops.grouped_attention
  attention_ops.grouped_attention = _attention_without_core
  try:
    grad_fn, params = loss_gradient(workload)
    jax.block_until_ready(grad_fn(params))
  finally:
    attention_ops.grouped_attention = original
  return grad_fn, params


def dense_skeleton(cfg: transformer.TransformerConfig, tokens: int):
  """A chain of the preset's dense matmuls only, x -> x + ((x Wq + x Wk + x Wv) Wo) -> x + (x W1) W2
  per layer in float32 on [tokens, D], as (forward function, its parameters, forward + backward
  matmul FLOPs)."""
  rng = np.random.default_rng(0)
  width, hidden = cfg.embed_dim, cfg.mlp_dim
  shapes = {
      "q": (width, width),
      "k": (width, width),
      "v": (width, width),
      "o": (width, width),
      "w1": (width, hidden),
      "w2": (hidden, width),
  }
  params = [
      {
          name: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)
          for name, shape in shapes.items()
      }
      for _ in range(cfg.num_layers)
  ]
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
  runner = torch_reference.TorchRunner(
      workload, bigjax_flags.optim_config(), bigjax_flags.SEED.value
  )
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
  return {
      "framework": "pytorch",
      "profiled_steps": steps,
      **{f"{k}_ms": round(v, 1) for k, v in groups.items()},
  }


def recurrent_stack_gradient(cfg: recurrent.RNNConfig, batch: int, length: int):
  """Compiled forward + backward of the preset's recurrent layers alone (a random input and output
  cotangent), and its arguments (parameters, input). The gradient reaches the input too, as the
  embedding below it needs in the model (and as the floor and PyTorch compute it)."""
  stack = cfg.stack()
  rng = np.random.default_rng(0)
  x_BTD = jnp.asarray(rng.standard_normal((batch, length, cfg.embed_dim), np.float32))
  dy_BTH = jnp.asarray(rng.standard_normal((batch, length, cfg.hidden_size), np.float32))
  params = nn.unbox(stack.init(jax.random.key(0), x_BTD))
  grads = jax.grad(lambda args: jnp.sum(stack.apply(args[0], args[1])[0] * dy_BTH))
  return _jit(grads), (params, x_BTD)


def lstm_matmul_floor(cfg: recurrent.RNNConfig, batch: int, length: int):
  """The matmuls of an LSTM stack's forward + backward and nothing else, as (function, its
  parameters, FLOPs). The steps stay sequential (each feeds the next through a tanh), as in the
  real scans; the input projection and the kernel gradients are single large matmuls, as bigjax
  computes them."""
  rng = np.random.default_rng(0)
  hidden, rows = cfg.hidden_size, batch * length
  widths = [cfg.embed_dim] + [hidden] * (cfg.num_layers - 1)

  def normal(*shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * 0.02)

  params = [
      {
          "input": normal(width, 4 * hidden),
          "recurrent": normal(hidden, 4 * hidden),
          "x": normal(rows, width),
          "dgates": normal(rows, 4 * hidden),
          "h": normal(rows, hidden),
      }
      for width in widths
  ]

  def forward_step(kernel_HG, h_BH, _):
    return jnp.tanh(sum(jnp.split(h_BH @ kernel_HG, 4, axis=1))), None

  def backward_step(kernel_GH, dgates_BG, _):
    return jnp.tile(jnp.tanh(dgates_BG @ kernel_GH), (1, 4)), None

  def matmuls(params):
    total = 0.0
    for p in params:
      xproj = p["x"] @ p["input"]
      forward = jax.lax.scan(
          functools.partial(forward_step, p["recurrent"]),
          xproj[:batch, :hidden],
          None,
          length=length,
      )[0]
      backward = jax.lax.scan(
          functools.partial(backward_step, p["recurrent"].T),
          p["dgates"][:batch],
          None,
          length=length,
      )[0]
      drecurrent = p["h"].T @ p["dgates"]
      dinput, dx = p["x"].T @ p["dgates"], p["dgates"] @ p["input"].T
      total += sum(jnp.sum(a) for a in (xproj, forward, backward, drecurrent, dinput, dx))
    return total

  flops = sum(2 * rows * 4 * hidden * (3 * width + 3 * hidden) for width in widths)
  return _jit(matmuls), params, flops


def torch_lstm_step(cfg: recurrent.RNNConfig, batch: int, length: int):
  """nn.LSTM of the preset's sizes: one forward + backward per call; None without PyTorch."""
  try:
    import torch
  except ImportError:
    return None
  torch.manual_seed(0)
  lstm = torch.nn.LSTM(cfg.embed_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
  x = torch.randn(batch, length, cfg.embed_dim, requires_grad=True)
  dy = torch.randn(batch, length, cfg.hidden_size)

  def step():
    lstm.zero_grad(set_to_none=True)
    (lstm(x)[0] * dy).sum().backward()

  return step


def _median_ms_alternating(variants: dict, other_steps: dict | None = None) -> dict[str, float]:
  """Median milliseconds per call of each compiled (function, arguments) variant and of each plain
  callable in `other_steps`, timed in alternating rounds (the --rounds, --bench_steps and
  --bench_warmup flags)."""
  steps = {name: (lambda fn=fn, args=args: fn(args)) for name, (fn, args) in variants.items()}
  times, _ = throughput.alternate_rounds(
      {**steps, **(other_steps or {})},
      throughput.ROUNDS.value,
      throughput.BENCH_STEPS.value,
      throughput.BENCH_WARMUP.value,
  )
  return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def rnn_main(workload: throughput.Workload):
  cfg = workload.model.config
  if cfg.cell != "lstm":
    raise UserError(f"benchmarks.breakdown covers LSTM language models, not cell={cfg.cell!r}")
  batch, length = workload.batch["tokens"].shape[0], workload.batch["tokens"].shape[1] - 1
  floor_fn, floor_params, floor_flops = lstm_matmul_floor(cfg, batch, length)
  variants = {
      "model": loss_gradient(workload),
      "recurrent_stack": recurrent_stack_gradient(cfg, batch, length),
      "matmul_floor": (floor_fn, floor_params),
  }
  torch_step = torch_lstm_step(cfg, batch, length)
  medians = _median_ms_alternating(
      variants, {} if torch_step is None else {"torch_stack": torch_step}
  )
  print(
      json.dumps(
          {
              "pass": "forward+backward",
              **{f"{name}_ms": round(ms, 1) for name, ms in medians.items()},
              "matmul_floor_gflops": round(floor_flops / medians["matmul_floor"] / 1e6, 1),
          }
      ),
      flush=True,
  )


def transformer_main(workload: throughput.Workload):
  torch_record = torch_breakdown(workload)
  variants = {"model": loss_gradient(workload), "no_attention": without_attention_core(workload)}
  chain, skeleton_params, skeleton_flops = dense_skeleton(
      workload.model.config, workload.units_per_step
  )
  variants["dense_skeleton"] = (_jit(jax.grad(chain)), skeleton_params)
  medians = _median_ms_alternating(variants)
  print(
      json.dumps(
          {
              "framework": "bigjax",
              "pass": "forward+backward",
              **{f"{name}_ms": round(ms, 1) for name, ms in medians.items()},
              "attention_core_ms": round(medians["model"] - medians["no_attention"], 1),
              "dense_skeleton_gflops": round(skeleton_flops / medians["dense_skeleton"] / 1e6, 1),
          }
      ),
      flush=True,
  )
  if torch_record is not None:
    print(json.dumps(torch_record), flush=True)


def main(argv):
  del argv
  workload = throughput.workload_from_flags()
  if isinstance(workload.model, transformer.TransformerLM):
    transformer_main(workload)
  elif isinstance(workload.model, recurrent.RNNLM):
    rnn_main(workload)
  else:
    raise UserError(
        f"benchmarks.breakdown takes a Transformer or LSTM LM preset, not {workload.name}"
    )


if __name__ == "__main__":
  bigjax_flags.run(main)
