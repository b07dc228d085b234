"""Weighted mixtures of data sets: `--dataset=mix:SOURCE@WEIGHT,SOURCE@WEIGHT,...`.

SOURCE is any other --dataset value (a TFDS name, textfiles:/textlines:/textpairs:/imagefolder:,
jsonl:/parquet:). Parse rule: the text after `mix:` is split at every comma, and each item at its
last `@`, the weight being what follows (a positive number; weights need not add up to 1). A
source may hold `:` and `@`, but not a comma: a glob with one (`{a,b}`) cannot sit in a mixture.

Names. Source i is `i_SHORT` in metric names: its position in the spec and a short name, the TFDS
name with its config, or a file pattern's last folder before its first wildcard (the file's or
folder's own name when it has none), lower-cased, other characters as `_`, at most 40. The
position keeps names unique and apart from the other metrics' (`tokens_0_...` is never
`tokens_per_sec`).

Sampling. Training position j takes its source from a fixed interleaving: every block of BLOCK
positions holds each source's share of them (largest remainders, at least one each), spread evenly
through the block, so every batch holds close to the weights' shares and every BLOCK positions hold
them to 1/BLOCK. Each source is read in its own shuffled order (seeded by the run's seed and its
position), repeated for as many epochs as its share asks. The mixture is random access
(grain.MapDataset) and comes before the loader cuts each batch among processes and workers, so it
depends only on the seed and the spec, and the batch index that checkpoints keep fixes what comes
after it. Each example carries `source_id` (int32, the position): tasks sum their loss per source.

Evaluation. A mixture's eval set is each source's eval split, one after the other, every example
(or, with --eval_batches=N, a fixed sample of N batches' worth of each source): eval_loss is the
mean over all of them, eval_loss_i_SHORT each source's own.
"""

import dataclasses
import functools
import math
import os
import re
import sys
from collections.abc import Callable

import grain
import numpy as np

from bigjax.data import files
from bigjax.data import formats
from bigjax.data import sources as sources_lib
from bigjax.errors import UserError

PREFIX = "mix:"
BLOCK = 16384
EXAMPLE = "mix:python_stdlib_text@3,jsonl:/data/web/*.jsonl.zst@1"


@dataclasses.dataclass(frozen=True)
class Source:
  """One source of --dataset: `spec` is its own --dataset value; `name` is "" outside a mixture."""

  spec: str
  weight: float = 1.0
  name: str = ""

  def label(self) -> str:
    """How console lines and errors name it."""
    return f"mix source {self.name} ({self.spec}@{self.weight:g})" if self.name else self.spec


def is_mix_spec(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def parse(dataset: str) -> tuple[Source, ...]:
  """The sources of --dataset: a mixture's items, or the data set alone (weight 1, no name)."""
  if not is_mix_spec(dataset):
    return (Source(dataset),)
  items = dataset.removeprefix(PREFIX).split(",")
  if not "".join(items).strip():
    raise UserError(f"--dataset={dataset!r} names no source; write {EXAMPLE}")
  return tuple(_parse_item(dataset, i, item.strip()) for i, item in enumerate(items))


def _parse_item(dataset: str, index: int, item: str) -> Source:
  spec, at, weight = item.rpartition("@")
  where = f"--dataset={dataset!r}: source {index} ({item!r})"
  if not (at and spec):
    raise UserError(
        f"{where} has no @WEIGHT: write SOURCE@WEIGHT, as {EXAMPLE} (a source cannot hold a comma "
        "in a mixture, so neither can its glob)"
    )
  if is_mix_spec(spec):
    raise UserError(f"{where} is a mixture itself; list its sources in this one")
  try:
    value = float(weight)
  except ValueError:
    raise UserError(f"{where}: the weight {weight!r} is not a number") from None
  if not (math.isfinite(value) and value > 0):
    raise UserError(
        f"{where}: the weight {weight} must be a positive number (leave a source out to drop it)"
    )
  return Source(spec, value, f"{index}_{short_name(spec)}")


def short_name(spec: str) -> str:
  """A source's name without its position (see the module docstring)."""
  kind, _, pattern = spec.partition(":")
  if files.is_files_spec(spec) or formats.is_format_spec(spec):
    parts = [p for p in os.path.expanduser(pattern).split("/") if p]
    wild = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
    if wild is None:  # one file or folder: its name
      text = parts[-1] if parts else kind
    else:  # the last folder before the first wildcard
      text = parts[wild - 1] if wild else kind
  else:  # NAME[/CONFIG][:VERSION]
    text = kind
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or kind


def each(parts: tuple[Source, ...], open_one: Callable[[Source], object]) -> list:
  """[open_one(part) for each part]; an error about a mixture's source says which one it is."""
  opened = []
  for part in parts:
    try:
      opened.append(open_one(part))
    except UserError as e:
      if not part.name:
        raise
      raise UserError(f"{part.label()}: {e}") from None
  return opened


def eval_splits(parts: tuple[Source, ...], eval_split: str | None, data_dir: str | None) -> dict:
  """Each source's eval split: `eval_split` (--eval_split) where given, else its own default."""
  return dict(
      zip(
          parts,
          each(parts, lambda p: eval_split or sources_lib.default_eval_split(p.spec, data_dir)),
      )
  )


def kind(spec: str, data_dir: str | None, image_key: str) -> str:
  """What a source holds, by its features: images, (inputs, targets) pairs or text."""
  features = sources_lib.feature_names(spec, data_dir)
  if image_key in features:
    return "images"
  return "(inputs, targets) pairs" if {"inputs", "targets"} <= features else "text"


def common_kind(parts: tuple[Source, ...], data_dir: str | None, image_key: str) -> str:
  """The kind every source holds; a mixture of two kinds is a one-line error (a batch is one set of
  arrays, and a model reads one kind)."""
  kinds = each(parts, lambda part: kind(part.spec, data_dir, image_key))
  for part, other in zip(parts, kinds):
    if other != kinds[0]:
      raise UserError(
          f"{parts[0].label()} holds {kinds[0]} but {part.label()} holds {other}; a mixture is all "
          "text (language models) or all images (image classifiers)"
      )
  return kinds[0]


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Random-access `sources`, one per part, that the pipeline mixes by the parts' weights.

  `unit` and `per_example` say what `seen` counts: tokens, `per_example` (seq_len) in each window;
  or images, one each.
  """

  sources: tuple
  parts: tuple[Source, ...]
  unit: str = "examples"
  per_example: int = 1

  @functools.cached_property
  def interleave(self) -> "Interleave":
    return Interleave(tuple(p.weight for p in self.parts))

  def seen(self, num_batches: int, *, batch_size: int) -> dict[str, int]:
    """`UNIT_NAME`: how much of each source the first `num_batches` global batches hold."""
    counts = self.interleave.counts(num_batches * batch_size)
    return {
        f"{self.unit}_{part.name}": int(count) * self.per_example
        for part, count in zip(self.parts, counts)
    }


def open_mixed(parts: tuple[Source, ...], open_one, *, unit="examples", per_example=1):
  """open_one(part) for each part: the one source of a plain data set, or the parts' Mixture."""
  opened = each(parts, open_one)
  if not parts[0].name:
    return opened[0]
  return Mixture(tuple(opened), parts, unit, per_example)


def members(source) -> tuple:
  """A Mixture's sources, or the source alone."""
  return source.sources if isinstance(source, Mixture) else (source,)


def source_seed(seed: int, index: int) -> int:
  """The shuffle (and augmentation) seed of source `index`: each source its own order."""
  return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class Tag:
  """Adds `source_id` to an example (a class, so that grain's worker processes can unpickle it)."""

  source_id: int

  def __call__(self, example: dict) -> dict:
    return {**example, "source_id": np.int32(self.source_id)}


def quotas(weights: tuple[float, ...], total: int = BLOCK) -> np.ndarray:
  """`total` positions shared by weight: largest remainders, then at least one for each source."""
  if len(weights) > total:
    raise UserError(f"a mixture of {len(weights)} sources is more than {total:,}: merge some")
  shares = np.asarray(weights, np.float64) / math.fsum(weights) * total
  counts = np.floor(shares).astype(np.int64)
  by_remainder = np.argsort(counts - shares, kind="stable")  # largest remainder first
  counts[by_remainder[: total - counts.sum()]] += 1
  while (counts == 0).any():  # a share below 1/total: one position, from the largest
    counts[np.argmax(counts)] -= 1
    counts[np.argmin(counts)] += 1
  return counts


class Interleave(grain.transforms.DatasetSelectionMap):
  """Mixture position j -> (its source, how many positions of that source come before j)."""

  def __init__(self, weights: tuple[float, ...]):
    self.quotas = quotas(weights)
    # Source i's k-th position of a block sits at (k + 1/2) / quota_i of it: evenly spread.
    order = sorted(((k + 0.5) / q, i) for i, q in enumerate(self.quotas) for k in range(q))
    self.block_sources = np.array([i for _, i in order], np.int32)
    in_block = np.eye(len(weights), dtype=np.int32)[self.block_sources]
    # [BLOCK + 1, sources]: each source's positions among the block's first r
    self.before = np.concatenate([np.zeros((1, len(weights)), np.int32), in_block.cumsum(0)])

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    block, offset = divmod(int(index), BLOCK)
    source = int(self.block_sources[offset])
    return source, block * int(self.quotas[source]) + int(self.before[offset, source])

  def counts(self, num_positions: int) -> np.ndarray:
    """Each source's positions among the first `num_positions`."""
    block, offset = divmod(num_positions, BLOCK)
    return block * self.quotas + self.before[offset]
