"""Grain pipelines shared by every data set: per-process sharding, shuffled training batches, and
padded evaluation batches."""

import grain
import jax
import numpy as np

from bigjax.errors import UserError


def per_process_batch(global_batch_size: int) -> int:
  processes = jax.process_count()
  if global_batch_size % processes:
    raise UserError(f"--batch_size={global_batch_size} does not divide over {processes} processes")
  return global_batch_size // processes


def train_batches(source, global_batch_size: int, seed: int, transform=None) -> grain.MapDataset:
  """Endless shuffled batches of this process's share of `source` (a new order every epoch).

  `transform(example, rng)` runs per example with a numpy Generator seeded from (seed, position),
  so augmentation is as reproducible as the order. Iterating gives a checkpointable grain iterator
  (get_state / set_state): a resumed run sees the same batches in the same order.
  """
  batch_size = per_process_batch(global_batch_size)
  shard = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
  if len(shard) < batch_size:
    raise UserError(f"only {len(shard)} training examples per process, fewer than one batch of "
                    f"{batch_size}; lower --batch_size")
  ds = shard.shuffle(seed=seed).repeat()
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  return ds.batch(batch_size, drop_remainder=True)


def eval_batches(source, global_batch_size: int, max_batches: int = 0, transform=None) -> list[dict]:
  """Fixed evaluation batches with a `weights` entry: every example once, or a fixed random sample
  of `max_batches` batches. The last batch is filled with weight-0 copies of an example, so that
  nothing is dropped and every batch has one shape (one compilation)."""
  batch_size = per_process_batch(global_batch_size)
  ds = grain.MapDataset.source(source)
  if max_batches > 0 and max_batches * global_batch_size < len(ds):
    ds = ds.shuffle(seed=0)[:max_batches * global_batch_size]  # a sample, not the first (often sorted) ones
  # Every process runs the same number of eval steps, so each pads to the largest share.
  num_batches = -(-len(ds) // global_batch_size)
  ds = ds[jax.process_index()::jax.process_count()]
  if transform is not None:
    ds = ds.map(transform)
  examples = [dict(ex, weights=np.float32(1.0)) for ex in ds]
  filler = dict(examples[0], weights=np.float32(0.0))
  examples += [filler] * (num_batches * batch_size - len(examples))
  return [{key: np.stack([ex[key] for ex in examples[i * batch_size:(i + 1) * batch_size]]) for key in filler}
          for i in range(num_batches)]
