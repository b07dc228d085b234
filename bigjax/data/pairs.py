"""(source, target) text pairs as encoder-decoder examples: `textpairs:GLOB` files, TFDS translation
sets (their two languages read from the builder's supervised keys), and any data set with `inputs`
and `targets` (synthetic_sequences). Each example is tokenized when read and padded to fixed
lengths, so every batch has one shape:

  inputs         int32 [S]      source tokens, zero-padded
  input_lengths  int32 []       real source tokens
  targets        int32 [T + 1]  eos, target tokens, eos, zeros
  loss_mask      float32 [T]    1 on the predictions of the target tokens and of the final eos
"""

import dataclasses

import numpy as np

from bigjax.data import files
from bigjax.data import formats
from bigjax.data import lm
from bigjax.data import sources
from bigjax.errors import UserError


def pair_keys(
    dataset: str, data_dir: str | None, source_key: str | None, target_key: str | None
) -> tuple[str, str]:
  """The source and target features: those given, else `inputs` and `targets`, else a TFDS
  builder's supervised keys (a translation set's two languages, in the builder's order)."""
  features = sources.feature_names(dataset, data_dir)
  if source_key or target_key:
    if not (source_key and target_key):
      raise UserError("give both --source_key and --target_key, or neither")
    missing = [key for key in (source_key, target_key) if key not in features]
    if missing:
      raise UserError(
          f"{dataset} has no feature {missing[0]!r}; its features are {sorted(features)}"
      )
    return source_key, target_key
  if {"inputs", "targets"} <= features:
    return "inputs", "targets"
  supervised = _supervised_keys(dataset, data_dir)
  if supervised:
    return supervised
  raise UserError(
      f"{dataset} names no (source, target) pair: its features are {sorted(features)}; "
      f"choose them with --source_key and --target_key"
  )


def _supervised_keys(dataset: str, data_dir: str | None) -> tuple[str, str] | None:
  if files.is_files_spec(dataset) or formats.is_format_spec(dataset):
    return None
  keys = sources.open_builder(dataset, data_dir).info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(key, str) for key in keys):
    return keys[0], keys[1]
  return None


@dataclasses.dataclass(frozen=True)
class PairExamples:
  """Random access to the padded examples of the module docstring.

  Attributes:
    source: a random-access source of dicts holding `keys`' two text features.
    source_len: S, the padded source length.
    target_len: T, the decoder input's length (the start token and the target tokens).
    truncate: cut a longer source or target to fit instead of refusing it.
  """

  source: object
  keys: tuple[str, str]
  source_tokenizer: object
  target_tokenizer: object
  source_len: int
  target_len: int
  truncate: bool = False

  def __len__(self) -> int:
    return len(self.source)

  def encode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Example `index`'s source and target tokens, checked and (with truncate) cut to fit."""
    example = self.source[index]
    sides = []
    for side, key, tokenizer, room, flag in (
        ("source", self.keys[0], self.source_tokenizer, self.source_len, "--source_len"),
        ("target", self.keys[1], self.target_tokenizer, self.target_len - 1, "--target_len"),
    ):
      tokens = tokenizer.encode(lm.as_bytes(example[key])).astype(np.int32)
      if not len(tokens):
        raise UserError(f"example {index} has an empty {side} ({key!r}); remove it from the data")
      if len(tokens) > room:
        if not self.truncate:
          need = len(tokens) + (side == "target")  # the target also needs its start token
          raise UserError(
              f"example {index} has a {side} of {need} tokens, more than {flag}="
              f"{room + (side == 'target')}; raise {flag} (and the model's "
              f"{'max_source_len' if side == 'source' else 'max_len'}), or cut long pairs with "
              f"--truncate_pairs"
          )
        tokens = tokens[:room]
      sides.append(tokens)
    return sides[0], sides[1]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    source_tokens, target_tokens = self.encode(index)
    eos = self.target_tokenizer.eod_id
    inputs = np.zeros(self.source_len, np.int32)
    inputs[: len(source_tokens)] = source_tokens
    targets = np.zeros(self.target_len + 1, np.int32)
    sequence = np.concatenate([[eos], target_tokens, [eos]])
    targets[: len(sequence)] = sequence
    loss_mask = np.zeros(self.target_len, np.float32)
    loss_mask[: len(target_tokens) + 1] = 1.0
    return {
        "inputs": inputs,
        "input_lengths": np.int32(len(source_tokens)),
        "targets": targets,
        "loss_mask": loss_mask,
    }

  def reference(self, index: int) -> str:
    """Example `index`'s target text, as it was written (what BLEU compares against)."""
    return lm.as_bytes(self.source[index][self.keys[1]]).decode("utf-8", errors="replace")

  def source_text(self, index: int) -> str:
    return lm.as_bytes(self.source[index][self.keys[0]]).decode("utf-8", errors="replace")
