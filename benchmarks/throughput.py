"""Training throughput, model FLOPs and MFU of a bigjax preset: prints one JSON line.

  python -m benchmarks.throughput --model=transformer-tiny --model_override=num_layers=4 \
      --batch_size=16 --seq_len=256
  python -m benchmarks.throughput --model=resnet18 --image_size=32 --model_override=num_classes=10 \
      --batch_size=64
  python -m benchmarks.throughput --model=lstm-lm --model_override=num_layers=2 --batch_size=16 --seq_len=128

Language models that keep attention inside documents are timed on packed windows, as the
experiments train them: random documents (mean length --document_len) with their segment ids and
positions, so the step runs the attention a real run does; the record's attention_implementation
names it, and the fused-kernel call counts in the compiled step confirm it.

It times the real train step: `bigjax.train.compile_steps` for the model, the task from
`bigjax.tasks`, the optimizer from the shared optimizer flags, on the mesh from --mesh. One random
batch is placed on the devices once, so the figures exclude the input pipeline.

Step time is the median over --bench_steps steps after --bench_warmup warm-up steps, each step
synchronised with `block_until_ready`. MFU is model FLOPs (see `flops_per_unit`) per second over
(a) the dense matmul peak measured in the same process, in the same dtype, and (b) the datasheet
peak of the device kind where it is known (GPU/TPU).
"""

import ast
import dataclasses
import functools
import json
import resource
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import flops
from bigjax import flags as bigjax_flags
from bigjax import lm_inputs
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.errors import UserError
from bigjax.nn import recurrent
from bigjax.nn import transformer
from bigjax.ops import attention as attention_ops

SEQ_LEN = flags.DEFINE_integer(
    "seq_len", 256, "Language models: tokens per sequence.", lower_bound=1
)
IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", None, "Image models: height and width (default: the preset's).", lower_bound=1
)
DOCUMENT_LEN = flags.DEFINE_integer(
    "document_len",
    512,
    "Language models taking segment ids: mean length of the random documents packed into each "
    "window (end-of-document tokens at random); 0 times unpacked windows with no segment ids.",
    lower_bound=0,
)
BENCH_WARMUP = flags.DEFINE_integer(
    "bench_warmup", 3, "Untimed steps after compilation.", lower_bound=0
)
BENCH_STEPS = flags.DEFINE_integer(
    "bench_steps", 10, "Timed steps (the median is reported).", lower_bound=1
)
ROUNDS = flags.DEFINE_integer(
    "rounds",
    4,
    "Comparisons (--ab_override, torch_reference --side_by_side): "
    "alternating rounds of --bench_steps steps per variant.",
    lower_bound=1,
)
AB_OVERRIDE = flags.DEFINE_multi_string(
    "ab_override",
    [],
    "Compare the preset as configured (A) with the same "
    "plus these name=value overrides (B) in alternating rounds; prints both "
    "records and the speed ratio B / A.",
)
AB_XLA_OPTION = flags.DEFINE_multi_string(
    "ab_xla_option",
    [],
    "Like --ab_override, for XLA compiler options: "
    "B compiles with these NAME=VALUE options on top of --xla_option.",
)
PEAK_SIZE = flags.DEFINE_integer(
    "peak_matmul_size",
    None,
    "n of the n x n x n matmul that measures the "
    "device's peak (default 2048 on CPU, 8192 elsewhere).",
    lower_bound=64,
)
# compile_s is a compilation, not a load from the persistent cache the experiments use; pass
# --compilation_cache_dir=DIR to time a cached start instead.
flags.FLAGS.set_default("compilation_cache_dir", "")

# Dense (no sparsity) matmul peaks per chip from the vendors' datasheets, in FLOP/s, by compute dtype.
# float32 on NVIDIA tensor cores is TF32, which XLA uses for float32 matmuls at default precision.
DATASHEET_PEAKS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},  # SXM
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
    "TPU v6 lite": {"bfloat16": 918e12},  # v6e
    "TPU v5 lite": {"bfloat16": 197e12},  # v5e
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},  # v5p reports itself as "TPU v5"
    "TPU v4": {"bfloat16": 275e12},
    "TPU v3": {"bfloat16": 123e12},
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """One model, task and batch: what the bigjax and the PyTorch benchmarks both run."""

  name: str
  model: nn.Module
  task: object
  batch: dict  # host numpy arrays
  unit: str  # "tokens" or "images"
  units_per_step: int
  dtype: str


def is_language_model(model: nn.Module) -> bool:
  return isinstance(model, (transformer.TransformerLM, recurrent.RNNLM))


def build_model(name: str, overrides: dict, image_size: int | None) -> nn.Module:
  if image_size is not None:
    preset_cfg = models.create(name).config
    if not hasattr(preset_cfg, "input_shape"):
      raise UserError(f"--image_size applies to image models; {name} takes tokens (use --seq_len)")
    channels = preset_cfg.input_shape[-1]
    overrides = {"input_shape": (image_size, image_size, channels), **overrides}
  return models.create(name, **overrides)


def random_batch(
    model: nn.Module, batch_size: int, seq_len: int, seed: int = 0, document_len: int = 0
) -> dict:
  """Random tokens [B, T + 1] for a language model, packed as documents of mean `document_len`
  with segment ids and positions when the model takes them (the last vocabulary id ends a
  document); random images and labels for a classifier."""
  rng = np.random.default_rng(seed)
  cfg = model.config
  if is_language_model(model):
    tokens = rng.integers(0, cfg.vocab_size - 1, (batch_size, seq_len + 1), dtype=np.int32)
    if not (document_len and lm_inputs.takes_segment_ids(model)):
      return {"tokens": tokens}
    eod_id = cfg.vocab_size - 1
    tokens[rng.random(tokens.shape) < 1 / document_len] = eod_id
    windows = [lm_inputs.document_segments(row, eod_id) for row in tokens]
    return {"tokens": tokens, **{k: np.stack([w[k] for w in windows]) for k in windows[0]}}
  images = rng.standard_normal((batch_size, *cfg.input_shape), dtype=np.float32)
  return {"image": images, "label": rng.integers(0, cfg.num_classes, (batch_size,), dtype=np.int32)}


def workload_from_flags() -> Workload:
  bigjax_flags.require(bigjax_flags.MODEL)
  overrides = bigjax_flags.model_overrides()
  model = build_model(bigjax_flags.MODEL.value, overrides, IMAGE_SIZE.value)
  batch_size = bigjax_flags.BATCH_SIZE.value
  batch = random_batch(
      model, batch_size, SEQ_LEN.value, bigjax_flags.SEED.value, DOCUMENT_LEN.value
  )
  if is_language_model(model):
    if SEQ_LEN.value > getattr(model.config, "max_len", SEQ_LEN.value):
      raise UserError(
          f"--seq_len={SEQ_LEN.value} exceeds the model's max_len={model.config.max_len}; "
          f"add --model_override=max_len={SEQ_LEN.value}"
      )
    task, unit, units = tasks.LanguageModelling(), "tokens", batch_size * SEQ_LEN.value
  else:
    task, unit, units = tasks.Classification(), "images", batch_size
  return Workload(bigjax_flags.MODEL.value, model, task, batch, unit, units, overrides["dtype"])


def flops_per_unit(workload: Workload, params, model_state) -> tuple[float, str, float]:
  """(model training FLOPs per token or image, how they were counted, the jaxpr-counted figure).

  Training is taken as 3 x the forward (the backward computes two matmuls per forward matmul).
  Convolutions are counted as XLA's convolution primitive, i.e. every kernel tap at every output:
  the model's FLOPs, not those of an implementation that skips taps reading only padding."""
  model, batch = workload.model, workload.batch
  task = workload.task
  if hasattr(getattr(model, "config", None), "conv_impl"):
    model = model.clone(config=dataclasses.replace(model.config, conv_impl="xla"))
  counted = (
      3.0
      * flops.counted_forward_flops(
          lambda p, s, b: task.loss_sums(model, {"params": p, **s}, b)[0]["loss"],
          params,
          model_state,
          batch,
      )
      / batch[next(iter(batch))].shape[0]
  )
  if isinstance(model, transformer.TransformerLM):
    seq_len = batch["tokens"].shape[1] - 1
    per_token = flops.transformer_flops_per_token(model.config, params, seq_len)
    return per_token, "6N+12LTD (no causal halving)", counted / seq_len
  if isinstance(model, recurrent.RNNLM):
    seq_len = batch["tokens"].shape[1] - 1
    return flops.rnn_flops_per_token(model.config, params), "6N", counted / seq_len
  return counted, "3 x forward matmul/conv FLOPs counted in the jaxpr", counted


def abstract_variables(workload: Workload):
  """(params, other collections) of the workload's model as shapes, without initialising it."""
  variables = nn.unbox(
      jax.eval_shape(
          lambda rng: workload.task.init(workload.model, rng, workload.batch), jax.random.key(0)
      )
  )
  params = variables.pop("params")
  return params, variables


# ---- timing --------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], object], count: int) -> list[float]:
  """Wall seconds of `count` calls of fn, each waited for with block_until_ready."""
  times = []
  for _ in range(count):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


# XLA's CPU backend has two matmul libraries (YNNPACK, the default, and its own Eigen-based kernels,
# chosen by this option); either can be the faster one, so the peak is the better of the two.
MATMUL_LIBRARY_OPTIONS = {"cpu": ({}, {"xla_cpu_experimental_ynn_fusion_type": ""})}


def measured_matmul_peak(dtype: str, size: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` n x n by n x n matmuls in `dtype` on the default device,
  over XLA's matmul libraries for the platform: the dense peak this device reaches through XLA."""
  platform = jax.default_backend()
  n = size or (2048 if platform == "cpu" else 8192)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  fastest = float("inf")
  for options in MATMUL_LIBRARY_OPTIONS.get(platform, ({},)):
    matmul = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=options or None)
    jax.block_until_ready(matmul(a, b))
    fastest = min(fastest, *time_calls(functools.partial(matmul, a, b), repeats))
  return 2.0 * n**3 / fastest


def between_peak_measurements(
    work: Callable[[], object], dtype: str
) -> tuple[object, tuple[float, float]]:
  """work()'s result and the matmul peak measured right before and right after it: a busy moment
  can slow one measurement down, and the records show both (MFU uses the higher)."""
  before = measured_matmul_peak(dtype, PEAK_SIZE.value)
  result = work()
  return result, (before, measured_matmul_peak(dtype, PEAK_SIZE.value))


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
  """The datasheet's dense peak for this device kind and dtype; None on CPU or when unknown."""
  for kind in sorted(DATASHEET_PEAKS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
    if kind in device_kind:
      return DATASHEET_PEAKS[kind].get(dtype)
  return None


class BigjaxRunner:
  """The real bigjax train step for a workload, compiled once; `step()` runs one and returns its
  outputs (not waited for)."""

  def __init__(self, workload: Workload, mesh, tx, seed: int = 0, xla_options: dict | None = None):
    self.workload, self.mesh = workload, mesh
    sharding.check_batch_size(workload.batch[next(iter(workload.batch))].shape[0], mesh)
    rng = jax.random.PRNGKey(seed)
    example = jax.tree.map(lambda x: x[:1], workload.batch)
    with train.mesh_context(mesh):
      steps = train.compile_steps(
          model=workload.model,
          tx=tx,
          task=workload.task,
          example_batch=example,
          mesh=mesh,
          rng=rng,
          xla_options=xla_options,
      )
      self.state = jax.block_until_ready(steps.init(rng))
      self.batch = sharding.host_to_global(workload.batch, mesh)
      start = time.perf_counter()
      self._step = steps.train_step.lower(self.state, self.batch).compile()
      self.compile_s = time.perf_counter() - start

  def step(self):
    self.state, metrics = self._step(self.state, self.batch)
    return self.state, metrics

  def compiled_text(self) -> str:
    """The optimised HLO of the train step, as XLA will run it."""
    return self._step.as_text()


def alternate_rounds(
    steps: dict[str, Callable], rounds: int, steps_per_round: int, warmup: int = 1
):
  """Step times per variant over `rounds` rounds of `steps_per_round` steps each, after `warmup`
  steps of each; the order turns around every round (ABBA), so that drift in the machine's speed
  falls on every variant alike. Returns (times per variant, per-round medians per variant)."""
  for step in steps.values():
    time_calls(step, max(warmup, 1))
  times = {name: [] for name in steps}
  medians = []
  order = list(steps)
  for r in range(rounds):
    round_medians = {}
    for name in (order if r % 2 == 0 else order[::-1]):
      round_times = time_calls(steps[name], steps_per_round)
      times[name] += round_times
      round_medians[name] = statistics.median(round_times)
    medians.append(round_medians)
  return times, medians


def comparison(
    times: dict[str, list[float]], medians: list[dict], unit: str, new: str, base: str
) -> dict:
  """Speed of `new` over `base` (>1: new is faster): of the median steps, per round, and of the
  fastest steps (the least disturbed by other load on a shared machine)."""
  round_ratios = [m[base] / m[new] for m in medians]
  return {
      "compare": f"{new} / {base} ({unit}/s)",
      "ratio": statistics.median(times[base]) / statistics.median(times[new]),
      "round_ratios": [round(r, 3) for r in round_ratios],
      "median_round_ratio": statistics.median(round_ratios),
      "ratio_of_fastest_steps": min(times[base]) / min(times[new]),
      "rounds": len(medians),
      "steps_per_round": len(times[new]) // max(len(medians), 1),
  }


def summarize(
    workload: Workload,
    step_times: list[float],
    compile_s: float,
    model_flops: tuple,
    peaks: tuple[float, ...],
    framework: str = "bigjax",
) -> dict:
  """The JSON record: speed, model FLOPs and MFU of one framework's timed steps."""
  per_unit, how, counted = model_flops
  peak = max(peaks)
  step_s = statistics.median(step_times)
  achieved = per_unit * workload.units_per_step / step_s
  device = jax.devices()[0]
  sheet = datasheet_peak(device.device_kind, workload.dtype)
  return {
      "framework": framework,
      "model": workload.name,
      "dtype": workload.dtype,
      "batch_size": workload.batch[next(iter(workload.batch))].shape[0],
      "device": device.device_kind,
      "platform": device.platform,
      "num_devices": jax.device_count(),
      f"{workload.unit}_per_s": workload.units_per_step / step_s,
      "step_s": step_s,
      "step_s_min": min(step_times),
      "step_s_max": max(step_times),
      "timed_steps": len(step_times),
      "compile_s": compile_s,
      "flops_per_token" if workload.unit == "tokens" else "flops_per_image": per_unit,
      "flops_formula": how,
      "flops_counted_per_unit": counted,
      "achieved_flops": achieved,
      "measured_peak_flops": peak,
      "peak_measurements": list(peaks),
      "mfu_measured_peak": achieved / peak,
      "datasheet_peak_flops": sheet,
      "mfu_datasheet": achieved / sheet if sheet else None,
  }


def run_bigjax(workload: Workload) -> dict:
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  tx = optim.make_optimizer(bigjax_flags.optim_config(), 1000)
  runner = BigjaxRunner(workload, mesh, tx, bigjax_flags.SEED.value, bigjax_flags.xla_options())

  def warm_up_and_time():
    time_calls(runner.step, BENCH_WARMUP.value)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = time_calls(runner.step, BENCH_STEPS.value)
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / len(times)

  (step_times, faults_per_step), peaks = between_peak_measurements(warm_up_and_time, workload.dtype)
  model_flops = flops_per_unit(workload, runner.state.params, runner.state.model_state)
  record = summarize(workload, step_times, runner.compile_s, model_flops, peaks)
  # Page faults of the host process per timed step: on CPU, whether XLA's buffers come back fresh
  # (benchmarks/host_memory.py).
  record["minor_faults_per_step"] = faults_per_step
  record["mesh"] = sharding.describe(mesh)
  if isinstance(workload.model, transformer.TransformerLM):
    record["packed_documents"] = "segment_ids" in workload.batch
    record["attention_implementation"] = attention_implementation(workload)
    record.update(fused_attention_calls(runner.compiled_text()))
  return record


def attention_implementation(workload: Workload) -> str:
  """The implementation bigjax.ops.attention picks for this workload's self-attention."""
  cfg = workload.model.config
  batch, length = workload.batch["tokens"][:, :-1].shape
  q_shape = (batch, length, cfg.num_heads, cfg.resolved_head_dim)
  k_shape = (batch, length, cfg.num_kv_heads or cfg.num_heads, cfg.resolved_head_dim)
  segment_ids = workload.batch.get("segment_ids")
  mask = attention_ops.Mask(segment_ids_BT=None if segment_ids is None else segment_ids[:, :-1])
  return attention_ops.implementation(q_shape, k_shape, cfg.compute_dtype, mask)


def fused_attention_calls(compiled_hlo: str) -> dict:
  """Fused-attention kernels in the compiled step's HLO, forward and backward: cuDNN's custom
  calls (one of each per layer, or once in the loop body of a scanned layer stack) and Pallas'
  TPU kernels (splash attention is bigjax's only one). 0 and 0: the step's attention is XLA's."""
  return {
      "cudnn_attention_calls": compiled_hlo.count('custom_call_target="__cudnn$fmha'),
      "pallas_tpu_calls": compiled_hlo.count('custom_call_target="tpu_custom_call"'),
  }


def run_ab(workload: Workload) -> list[dict]:
  """The preset as configured (A) against the same with --ab_override and --ab_xla_option (B),
  alternating rounds."""
  items = dict(item.partition("=")[::2] for item in AB_OVERRIDE.value)
  b_overrides = {
      **bigjax_flags.model_overrides(),
      **{k.strip(): _literal(v.strip()) for k, v in items.items()},
  }
  variant = dataclasses.replace(
      workload, model=build_model(workload.name, b_overrides, IMAGE_SIZE.value)
  )
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  tx = optim.make_optimizer(bigjax_flags.optim_config(), 1000)
  a_options = bigjax_flags.xla_options()
  b_options = {**a_options, **bigjax_flags.xla_options(AB_XLA_OPTION)}
  platform = jax.default_backend()
  if not AB_OVERRIDE.value and train.platform_xla_options(
      a_options, platform
  ) == train.platform_xla_options(b_options, platform):
    raise UserError(
        f"--ab_xla_option={AB_XLA_OPTION.value} changes nothing on {platform}: B would compile as A"
    )
  runners = {
      "A": BigjaxRunner(workload, mesh, tx, bigjax_flags.SEED.value, a_options),
      "B": BigjaxRunner(variant, mesh, tx, bigjax_flags.SEED.value, b_options),
  }
  (times, medians), peaks = between_peak_measurements(
      lambda: alternate_rounds(
          {k: r.step for k, r in runners.items()},
          ROUNDS.value,
          BENCH_STEPS.value,
          BENCH_WARMUP.value,
      ),
      workload.dtype,
  )
  records = []
  for name, w in (("A", workload), ("B", variant)):
    state = runners[name].state
    record = summarize(
        w,
        times[name],
        runners[name].compile_s,
        flops_per_unit(w, state.params, state.model_state),
        peaks,
        framework=f"bigjax {name}",
    )
    records.append(record)
  records.append(
      {
          **comparison(times, medians, workload.unit, "B", "A"),
          "B": AB_OVERRIDE.value + [f"xla:{item}" for item in AB_XLA_OPTION.value],
      }
  )
  return records


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(argv):
  del argv
  workload = workload_from_flags()
  records = run_ab(workload) if AB_OVERRIDE.value or AB_XLA_OPTION.value else [run_bigjax(workload)]
  for record in records:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  bigjax_flags.run(main)
