"""Grain pipelines shared by every data set: per-process sharding, shuffled training batches read
ahead by worker processes (Loader), and padded evaluation batches."""

import dataclasses
import functools
import gc
import os
import zlib
from collections.abc import Callable

import grain
import jax
import numpy as np

from bigjax import metrics
from bigjax import private_apis
from bigjax.data import mixture
from bigjax.errors import UserError


def per_process_batch(global_batch_size: int) -> int:
  processes = jax.process_count()
  if global_batch_size % processes:
    raise UserError(f"--batch_size={global_batch_size} does not divide over {processes} processes")
  return global_batch_size // processes


def train_batches(
    source, global_batch_size: int, seed: int, transform=None, workers: int = 0
) -> "Loader":
  """Endless shuffled batches of this process's rows of each global batch (a new order every epoch).

  Every process shuffles the whole source with the same seed and reads only its own contiguous
  rows of each global batch, which are the rows its devices hold: the global batches, and so the
  losses, do not depend on how many processes share the work. `transform(example, rng)` runs per
  example with a numpy Generator seeded from (seed, position), so augmentation is as reproducible
  as the order. A mixture.Mixture is mixed here, before the rows are cut (see mixture.py). See
  Loader for reading ahead in `workers` processes.
  """
  batch_size = per_process_batch(global_batch_size)
  if isinstance(source, mixture.Mixture):
    ds, parts = _mixed(source, seed, transform)
    seen = functools.partial(source.seen, batch_size=global_batch_size)
    identity = functools.partial(
        data_identity, ds, global_batch_size, parts, source.interleave.quotas
    )
  else:
    if len(source) < global_batch_size:
      raise UserError(
          f"only {len(source)} training examples, fewer than one batch of {global_batch_size}; "
          "lower --batch_size"
      )
    ds = _endless(source, seed, transform)
    seen = None
    identity = functools.partial(data_identity, ds, global_batch_size)
  # Global batch t is local batches t * P ... t * P + P - 1; process p keeps the p-th of them.
  return Loader(
      ds.batch(batch_size, drop_remainder=True)[jax.process_index() :: jax.process_count()],
      workers,
      seen,
      identity,
  )


# What a checkpoint keeps of its data's identity: the first examples of the training order (and of
# each mixed source's own order), the global batch size and a mixture's per-block quotas, each on
# its own so that a refusal can say which changed. IDENTITY_VERSION changes when what is hashed
# does: an identity of another version is not compared.
IDENTITY_EXAMPLES = 16
IDENTITY_EXAMPLES_PER_SOURCE = 4
IDENTITY_VERSION = 1


def data_identity(
    examples: grain.MapDataset, global_batch_size: int, parts=(), quotas=None
) -> dict:
  """The data's identity (see IDENTITY_EXAMPLES): the same for any number of processes or workers,
  which cut their rows from these examples; other for another --dataset, --seed, --batch_size,
  --seq_len, tokenizer, mixture weight, or a source of a mixture, however small its weight."""

  def crc(streams_and_counts) -> str:
    value = 0
    for stream, count in streams_and_counts:
      for i in range(count):
        value = zlib.crc32(metrics.fingerprint(stream[i]).encode(), value)
    return f"{value:08x}"

  identity = {
      "version": IDENTITY_VERSION,
      "batch_size": global_batch_size,
      "examples": crc([(examples, IDENTITY_EXAMPLES)]),
  }
  if quotas is not None:
    identity["quotas"] = [int(q) for q in quotas]
    identity["sources"] = crc([(part, IDENTITY_EXAMPLES_PER_SOURCE) for part in parts])
  return identity


def _endless(source, seed: int, transform) -> grain.MapDataset:
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  return ds if transform is None else ds.random_map(transform, seed=seed)


def _mixed(mix: "mixture.Mixture", seed: int, transform) -> tuple[grain.MapDataset, list]:
  """Each source endless in its own order, tagged with its position, interleaved by weight; and
  those sources' streams."""
  parts = []
  for i, (part, source) in enumerate(zip(mix.parts, mix.sources)):
    if not len(source):
      raise UserError(f"{part.label()} has no training examples")
    parts.append(_endless(source, mixture.source_seed(seed, i), transform).map(mixture.Tag(i)))
  return grain.MapDataset.select_from_datasets(parts, mix.interleave), parts


# Batches read ahead by the threads of each reading process: enough to hide a slow example, small
# enough that image batches do not fill the host's memory.
READ_THREADS = 4
READ_AHEAD = 8


def default_workers() -> int:
  """Loader processes when --data_workers is not given: an eighth of the cores, at most 8. Reading
  windows or decoding small images is light work and XLA's CPU threads want the rest; 0 (threads
  in this process) on a small machine."""
  return min(8, (os.cpu_count() or 1) // 8)


def workers(requested: int | None) -> int:
  return default_workers() if requested is None else requested


@dataclasses.dataclass(frozen=True)
class Loader:
  """Endless training batches. `loader[i]` is batch i, computed on the spot (for shapes);
  `iter(loader)` reads ahead in `workers` processes, each computing every workers-th batch from
  its own copy of the pipeline (0: threads of this process), and yields them in order, so the
  batches are the same for any number of workers.
  """

  batches: grain.MapDataset
  workers: int = 0
  # seen(n): what the first n global batches hold, by name (a mixture's tokens or images per
  # source), which fit logs with each record
  seen: Callable[[int], dict[str, int]] | None = None
  # identity(): the data's identity (data_identity), saved with each checkpoint's position, so
  # that a run resumed on other data is refused instead of continuing that position on it
  identity: Callable[[], dict] | None = None

  @functools.cached_property
  def identity_value(self) -> dict | None:
    return None if self.identity is None else self.identity()

  def __getitem__(self, index: int):
    return self.batches[index]

  def __iter__(self) -> "LoaderIterator":
    return LoaderIterator(self)

  def read_from(self, start: int) -> grain.IterDataset:
    """Batches start, start + 1, ... read ahead by threads and worker processes."""
    ds = self.batches[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD)
    )
    if self.workers > 0:
      private_apis.let_grain_workers_read_flags()
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=READ_AHEAD)
      )
    return ds


class LoaderIterator(grain.DatasetIterator):
  """A Loader's batches in order, checkpointable by grain.checkpoint (or get_state / set_state).

  The state is the index of the next batch, whatever the number of workers, so a run resumes
  with the same batches even when it resumes with a different --data_workers. Workers start at
  the first batch asked for (after a restore, at the restored position) and stop when the
  iterator is closed or dropped.
  """

  def __init__(self, loader: Loader):
    super().__init__()
    self._loader = loader
    self._next = 0
    self._reader = None
    self._restored_identity = None

  def __next__(self) -> dict:
    if self._reader is None:
      self.start_prefetch()
    try:
      batch = next(self._reader)
    except UserError as e:
      # An example that cannot be read (a damaged file) ends the run with its message alone. Its
      # traceback goes: through grain's reader thread, it holds the last batch, whose shared memory
      # would otherwise outlive the process (a "leaked shared_memory" warning after the error).
      self.close_reader()
      e.with_traceback(None)
      gc.collect()  # the frames sit in reference cycles
      private_apis.finish_grain_shared_memory_deletes()  # before the process exits on the error
      raise e from None
    except Exception:
      self.close_reader()
      raise
    self._next += 1
    if self._loader.workers == 0:
      return batch
    # Batches from workers live in shared memory; a copy frees it now rather than at garbage
    # collection (or never, for one still referenced when the interpreter exits).
    return jax.tree.map(np.array, batch)

  def get_state(self) -> dict:
    state = {"next_batch": self._next}
    if self._loader.identity_value is not None:
      state["data"] = self._loader.identity_value
    return state

  def set_state(self, state: dict) -> None:
    self.close_reader()
    # next_index: a plain grain iterator's
    self._next = int(state.get("next_batch", state.get("next_index", 0)))
    self._restored_identity = state.get("data")  # None: saved before bigjax kept it

  def restored_data_difference(self) -> str | None:
    """How the data the restored state was saved with differs from this run's, in words; None
    when it is the same, or when either side does not know its data (an identity saved by older
    bigjax, or of another IDENTITY_VERSION, is not compared)."""
    saved, current = self._restored_identity, self._loader.identity_value
    if not isinstance(saved, dict) or current is None:
      return None
    if saved.get("version") != current["version"]:
      return None
    if saved.get("batch_size") != current["batch_size"]:
      return (
          f"its global batch size was {saved.get('batch_size')}, these flags give "
          f"{current['batch_size']} (--batch_size)"
      )
    if saved.get("quotas") != current.get("quotas"):
      return "its mixture or data set differs: another --dataset or mixture weights"
    if saved.get("sources") != current.get("sources"):
      return "the first examples of a source of its mixture differ"
    if saved.get("examples") != current["examples"]:
      return (
          "its first training examples differ: another --dataset, split, --seed, --seq_len, "
          "tokenizer or preprocessing, or a new version of the data set or of a library that "
          "reads it"
      )
    return None

  def start_prefetch(self) -> None:
    if self._reader is None:
      self._reader = iter(self._loader.read_from(self._next))
      self._reader.start_prefetch()

  def close_reader(self) -> None:
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self.close_reader()
    super().close()


def eval_batches(
    source, global_batch_size: int, max_batches: int = 0, transform=None
) -> list[dict]:
  """Fixed evaluation batches with a `weights` entry: every example once, or a fixed random sample
  of `max_batches` batches. The last batch is filled with weight-0 copies of an example, so that
  nothing is dropped and every batch has one shape (one compilation). A mixture.Mixture is its
  sources one after the other, each tagged and sampled (`max_batches` each) on its own."""
  batch_size = per_process_batch(global_batch_size)
  if isinstance(source, mixture.Mixture):
    parts = []
    for i, (part, member) in enumerate(zip(source.parts, source.sources)):
      if not len(member):
        raise UserError(f"{part.label()} has no evaluation examples; choose another --eval_split")
      examples = _eval_examples(member, global_batch_size, max_batches, transform)
      parts.append(examples.map(mixture.Tag(i)))
    ds = grain.MapDataset.concatenate(parts)
  else:
    ds = _eval_examples(source, global_batch_size, max_batches, transform)
  # Every process runs the same number of eval steps, so each pads to the largest share.
  num_batches = -(-len(ds) // global_batch_size)
  examples = [
      dict(ex, weights=np.float32(1.0)) for ex in ds[jax.process_index() :: jax.process_count()]
  ]
  filler = dict(examples[0], weights=np.float32(0.0))
  examples += [filler] * (num_batches * batch_size - len(examples))
  return [
      {
          key: np.stack([ex[key] for ex in examples[i * batch_size : (i + 1) * batch_size]])
          for key in filler
      }
      for i in range(num_batches)
  ]


def _eval_examples(source, global_batch_size: int, max_batches: int, transform) -> grain.MapDataset:
  ds = grain.MapDataset.source(source)
  if max_batches > 0 and max_batches * global_batch_size < len(ds):
    # a sample, not the first (often sorted) ones
    ds = ds.shuffle(seed=0)[: max_batches * global_batch_size]
  return ds if transform is None else ds.map(transform)
