"""The data loader alone against the train step that consumes it, and how far ahead of that step it
stays in the training loop.

  python -m benchmarks.data                    # the tiny Transformer's data (transformer_tiny.flags)
  python -m benchmarks.data --flagfile=experiments/configs/transformer_tiny.flags --bench_workers=0,2
  python -m benchmarks.data --dataset='jsonl:/data/corpus/*.jsonl.zst'   # or parquet:GLOB, any source
  python -m benchmarks.data --dataset='mix:python_stdlib_text@2,parquet:/data/web/*.parquet@1'

For each worker count in --bench_workers it iterates the real training loader (the same windows,
with segment ids where the model takes them, mixture, shuffle, batching and reading ahead as a
run) for --bench_seconds after a warm-up and counts batches; a token is a predicted target (seq_len
per window); a mixture's observed shares of the batches are printed beside its weights. It then
times --bench_steps real train steps of the flagfile's model on one batch placed on the devices,
and prints how many times the step's consumption the loader delivers. Last, the lead: for each
worker count, --bench_steps steps in the training loop's own shape (bigjax.train's loop: take the
loader iterator's next batch, place it on the devices, dispatch the step, fetch the previous step's
metrics) with the time each step waits in `next` for its batch: a loader that stays ahead is
waited for only the time to hand over a batch that is ready. One JSON line at the end holds every
figure. Language model windows are slices of the split tokenized once when it is opened, so the
figures hardly depend on the source's format; benchmarks/data_memory.py reads JSON Lines and
Parquet row by row.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import lm_inputs
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import mixture
from bigjax.data import pipeline
from experiments import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = os.path.join(REPO, "experiments", "configs", "transformer_tiny.flags")

BENCH_WORKERS = flags.DEFINE_list("bench_workers", ["0", "2"], "Loader worker counts to measure.")
BENCH_SECONDS = flags.DEFINE_float(
    "bench_seconds", 5.0, "Seconds to iterate the loader for, per worker count."
)
BENCH_STEPS = flags.DEFINE_integer(
    "bench_steps", 10, "Train steps to time (after two warm-up steps), resident and in the loop."
)


def loader_rate(windows, batch_size: int, seed: int, workers: int, seconds: float) -> dict:
  """Batches per second from a fresh loader, after its first batches (worker start-up) are out;
  with a mixture, the share of the counted examples from each source."""
  iterator = iter(pipeline.train_batches(windows, batch_size, seed, workers=workers))
  for _ in range(max(8, 4 * workers)):
    next(iterator)
  count, sources, start = 0, [], time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    count += 1
    sources.append(batch.get("source_id", np.zeros(0, np.int32)))
  elapsed = time.perf_counter() - start
  iterator.close()
  examples = count * batch["tokens"].shape[0] / elapsed
  rate = {
      "workers": workers,
      "batches": count,
      "examples_per_sec": examples,
      "tokens_per_sec": examples * (batch["tokens"].shape[1] - 1),
  }
  if isinstance(windows, mixture.Mixture):
    counts = np.bincount(np.concatenate(sources), minlength=len(windows.parts))
    rate["shares"] = {p.name: float(c / counts.sum()) for p, c in zip(windows.parts, counts)}
  return rate


def _shares(rate: dict, windows) -> str:
  if "shares" not in rate:
    return ""
  total = sum(p.weight for p in windows.parts)
  return "; shares " + ", ".join(
      f"{p.name} {rate['shares'][p.name]:.3f} (weight {p.weight / total:.3f})"
      for p in windows.parts
  )


def compiled_step(model, batch: dict):
  """The real train step of `model` for batches like `batch`, its fresh state, and the mesh."""
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  tx = optim.make_optimizer(bigjax_flags.optim_config(), bigjax_flags.NUM_STEPS.value)
  rng = jax.random.PRNGKey(0)
  with train.mesh_context(mesh):
    steps = train.compile_steps(
        model=model,
        tx=tx,
        task=tasks.LanguageModelling(),
        example_batch=jax.tree.map(lambda x: x[:1], batch),
        mesh=mesh,
        rng=rng,
        xla_options=bigjax_flags.xla_options(),
    )
    return steps.train_step, steps.init(rng), mesh


def train_step_rate(step_fn, state, mesh, batch: dict, num_steps: int):
  """Tokens per second the real train step consumes, one batch resident on the devices; and the
  state it leaves (the step donates the one it is given)."""
  with train.mesh_context(mesh):
    device_batch = sharding.host_to_global(batch, mesh)
    times = []
    for i in range(num_steps + 2):
      start = time.perf_counter()
      state, sums = step_fn(state, device_batch)
      jax.block_until_ready(sums)
      if i >= 2:  # the first two compile and warm up
        times.append(time.perf_counter() - start)
  return batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1) / float(np.median(times)), state


def loop_lead(step_fn, state, mesh, loader, workers: int, num_steps: int) -> tuple[dict, object]:
  """Each step's wait for its batch in the training loop's shape (see the module docstring), after
  two steps that let the workers start; and the state the steps leave."""
  iterator = iter(pipeline.Loader(loader.batches, workers))
  waits, pending, start = [], None, None
  with train.mesh_context(mesh):
    for i in range(num_steps + 2):
      if i == 2:
        start = time.perf_counter()
      asked = time.perf_counter()
      host_batch = next(iterator)
      if i >= 2:
        waits.append(time.perf_counter() - asked)
      state, step_metrics = step_fn(state, sharding.host_to_global(host_batch, mesh))
      if pending is not None:  # one step late, as the loop fetches them
        jax.device_get(pending)
      pending = step_metrics
    jax.device_get(pending)
  elapsed = time.perf_counter() - start
  iterator.close()
  waits_ms = np.array(waits) * 1e3
  return {
      "workers": workers,
      "steps": num_steps,
      "step_ms": elapsed / num_steps * 1e3,
      "wait_ms_median": float(np.median(waits_ms)),
      "wait_ms_max": float(waits_ms.max()),
      "wait_share": float(waits_ms.sum() / 1e3 / elapsed),
  }, state


def main(argv):
  del argv
  bigjax_flags.require(bigjax_flags.MODEL, bigjax_flags.DATASET)
  batch_size, seq_len = bigjax_flags.BATCH_SIZE.value, transformer.SEQ_LEN.value
  model = models.create(bigjax_flags.MODEL.value, **bigjax_flags.model_overrides())
  segments = transformer.DOCUMENT_MASKS.value and bool(lm_inputs.takes_segment_ids(model))
  dataset = bigjax_flags.DATASET.value
  windows = mixture.open_mixed(
      mixture.parse(dataset),
      lambda p: lm.open_windows(
          p.spec,
          bigjax_flags.TRAIN_SPLIT.value,
          seq_len,
          bigjax_flags.DATA_DIR.value,
          text_key=bigjax_flags.TEXT_KEY.value,
          segments=segments,
      ),
      unit="tokens",
      per_example=seq_len,
  )
  count = sum(len(w) for w in mixture.members(windows))
  print(
      f"{dataset}: {count:,} windows of {seq_len} tokens, batch {batch_size}, "
      f"{os.cpu_count()} CPU cores",
      flush=True,
  )
  seed, worker_counts = bigjax_flags.SEED.value, [int(w) for w in BENCH_WORKERS.value]
  loaders = []
  for workers in worker_counts:
    rate = loader_rate(windows, batch_size, seed, workers, BENCH_SECONDS.value)
    loaders.append(rate)
    print(
        f"loader, {workers} worker(s): {rate['examples_per_sec']:,.0f} examples/s, "
        f"{rate['tokens_per_sec']:,.0f} tokens/s{_shares(rate, windows)}",
        flush=True,
    )
  loader = pipeline.train_batches(windows, batch_size, seed)
  step_fn, state, mesh = compiled_step(model, loader[0])
  step_tokens, state = train_step_rate(step_fn, state, mesh, loader[0], BENCH_STEPS.value)
  slowest = min(r["tokens_per_sec"] for r in loaders)
  print(
      f"train step ({bigjax_flags.MODEL.value}): {step_tokens:,.0f} tokens/s; the slowest loader delivers "
      f"{slowest / step_tokens:,.0f} x that",
      flush=True,
  )
  leads = []
  for workers in worker_counts:
    lead, state = loop_lead(step_fn, state, mesh, loader, workers, BENCH_STEPS.value)
    leads.append(lead)
    print(
        f"in the loop, {workers} worker(s): {lead['step_ms']:,.1f} ms a step, of which it waits "
        f"for data {lead['wait_ms_median']:.3f} ms (median; at most {lead['wait_ms_max']:.3f} ms): "
        f"{lead['wait_share']:.2%} of the time",
        flush=True,
    )
  print(
      json.dumps(
          {
              "dataset": dataset,
              "batch_size": batch_size,
              "seq_len": seq_len,
              "loaders": loaders,
              "train_step_tokens_per_sec": step_tokens,
              "loader_over_step": slowest / step_tokens,
              "loop": leads,
          }
      )
  )


if __name__ == "__main__":
  if not any(arg.startswith("--flagfile") for arg in sys.argv[1:]):
    sys.argv[1:1] = [f"--flagfile={TINY_FLAGS}"]
  bigjax_flags.run(main)
