"""The data loader alone against the train step that consumes it: prints examples/s and tokens/s.

  python -m benchmarks.data                    # the tiny Transformer's data (transformer_tiny.flags)
  python -m benchmarks.data --flagfile=experiments/configs/transformer_tiny.flags --bench_workers=0,2
  python -m benchmarks.data --dataset='jsonl:/data/corpus/*.jsonl.zst'   # or parquet:GLOB, any source

For each worker count in --bench_workers it iterates the real training loader (the same windows,
shuffle, batching and reading ahead as a run) for --bench_seconds after a warm-up and counts
batches; a token is a predicted target (seq_len per window). It then times --bench_steps real
train steps of the flagfile's model on one batch placed on the devices, and prints how many times
the step's consumption the loader delivers. One JSON line at the end holds every figure. Language
model windows are slices of the split tokenized once when it is opened, so the figures hardly
depend on the source's format; benchmarks/data_memory.py reads JSON Lines and Parquet row by row.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import pipeline
from experiments import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = os.path.join(REPO, "experiments", "configs", "transformer_tiny.flags")

BENCH_WORKERS = flags.DEFINE_list("bench_workers", ["0", "2"], "Loader worker counts to measure.")
BENCH_SECONDS = flags.DEFINE_float(
    "bench_seconds", 5.0, "Seconds to iterate the loader for, per worker count."
)
BENCH_STEPS = flags.DEFINE_integer(
    "bench_steps", 10, "Train steps to time (after two warm-up steps)."
)


def loader_rate(windows, batch_size: int, seed: int, workers: int, seconds: float) -> dict:
  """Batches per second from a fresh loader, after its first batches (worker start-up) are out."""
  iterator = iter(pipeline.train_batches(windows, batch_size, seed, workers=workers))
  for _ in range(max(8, 4 * workers)):
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    batch = next(iterator)
    count += 1
  elapsed = time.perf_counter() - start
  iterator.close()
  examples = count * batch["tokens"].shape[0] / elapsed
  return {
      "workers": workers,
      "batches": count,
      "examples_per_sec": examples,
      "tokens_per_sec": examples * (batch["tokens"].shape[1] - 1),
  }


def train_step_rate(batch: dict, num_steps: int) -> float:
  """Tokens per second the real train step consumes, one batch resident on the devices."""
  model = models.create(bigjax_flags.MODEL.value, **bigjax_flags.model_overrides())
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  cfg = bigjax_flags.optim_config()
  tx = optim.make_optimizer(cfg, bigjax_flags.NUM_STEPS.value)
  task = tasks.LanguageModelling()
  rng = jax.random.PRNGKey(0)
  with train.mesh_context(mesh):
    steps = train.compile_steps(
        model=model,
        tx=tx,
        task=task,
        example_batch=jax.tree.map(lambda x: x[:1], batch),
        mesh=mesh,
        rng=rng,
        xla_options=bigjax_flags.xla_options(),
    )
    state = steps.init(rng)
    device_batch = sharding.host_to_global(batch, mesh)
    times = []
    for i in range(num_steps + 2):
      start = time.perf_counter()
      state, sums = steps.train_step(state, device_batch)
      jax.block_until_ready(sums)
      if i >= 2:  # the first two compile and warm up
        times.append(time.perf_counter() - start)
  return batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1) / float(np.median(times))


def main(argv):
  del argv
  bigjax_flags.require(bigjax_flags.MODEL, bigjax_flags.DATASET)
  batch_size, seq_len = bigjax_flags.BATCH_SIZE.value, transformer.SEQ_LEN.value
  windows = lm.open_windows(
      bigjax_flags.DATASET.value,
      bigjax_flags.TRAIN_SPLIT.value,
      seq_len,
      bigjax_flags.DATA_DIR.value,
      text_key=bigjax_flags.TEXT_KEY.value,
  )
  print(
      f"{bigjax_flags.DATASET.value}: {len(windows):,} windows of {seq_len} tokens, batch {batch_size}, "
      f"{os.cpu_count()} CPU cores",
      flush=True,
  )
  loaders = []
  for workers in (int(w) for w in BENCH_WORKERS.value):
    rate = loader_rate(windows, batch_size, bigjax_flags.SEED.value, workers, BENCH_SECONDS.value)
    loaders.append(rate)
    print(
        f"loader, {workers} worker(s): {rate['examples_per_sec']:,.0f} examples/s, "
        f"{rate['tokens_per_sec']:,.0f} tokens/s",
        flush=True,
    )
  batch = pipeline.train_batches(windows, batch_size, bigjax_flags.SEED.value)[0]
  step_tokens = train_step_rate(batch, BENCH_STEPS.value)
  slowest = min(r["tokens_per_sec"] for r in loaders)
  print(
      f"train step ({bigjax_flags.MODEL.value}): {step_tokens:,.0f} tokens/s; the slowest loader delivers "
      f"{slowest / step_tokens:,.0f} x that"
  )
  print(
      json.dumps(
          {
              "dataset": bigjax_flags.DATASET.value,
              "batch_size": batch_size,
              "seq_len": seq_len,
              "loaders": loaders,
              "train_step_tokens_per_sec": step_tokens,
              "loader_over_step": slowest / step_tokens,
          }
      )
  )


if __name__ == "__main__":
  if not any(arg.startswith("--flagfile") for arg in sys.argv[1:]):
    sys.argv[1:1] = [f"--flagfile={TINY_FLAGS}"]
  bigjax_flags.run(main)
