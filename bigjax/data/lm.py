"""Language-modelling batches: a byte stream cut into [seq_len + 1] windows, shuffled and batched by grain."""

import dataclasses

import numpy as np

from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.errors import UserError

# Separates documents in the byte stream. NUL never occurs in source text, so the model learns it as
# "end of file" without it colliding with a real byte.
DOCUMENT_SEPARATOR = 0
BYTE_VOCAB_SIZE = 256


def byte_stream(source, field: str = "bytes") -> np.ndarray:
  """Every document of a TFDS source, each followed by the separator, as one uint8 array."""
  pieces = []
  for i in range(len(source)):
    pieces.append(np.asarray(source[i][field], dtype=np.uint8))
    pieces.append(np.array([DOCUMENT_SEPARATOR], dtype=np.uint8))
  return np.concatenate(pieces)


@dataclasses.dataclass(frozen=True)
class TokenWindows:
  """Random-access windows over a token stream: window i is stream[i*T : i*T + T + 1].

  Consecutive windows overlap by one token, so every token but the first is a target exactly once.
  """
  stream: np.ndarray
  seq_len: int

  def __len__(self) -> int:
    return max(0, (len(self.stream) - 1) // self.seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = index * self.seq_len
    return {"tokens": self.stream[start:start + self.seq_len + 1].astype(np.int32)}


def open_windows(dataset: str, split: str, seq_len: int, data_dir: str | None) -> TokenWindows:
  windows = TokenWindows(byte_stream(sources.load_source(dataset, split, data_dir)), seq_len)
  if len(windows) == 0:
    raise UserError(f"{dataset}/{split} holds {len(windows.stream)} tokens, too few for one window "
                    f"of --seq_len={seq_len}")
  return windows


def train_batches(windows: TokenWindows, global_batch_size: int, seed: int):
  """Endless shuffled {"tokens": [B, T+1]} batches of this process's windows (see pipeline)."""
  return pipeline.train_batches(windows, global_batch_size, seed)


def eval_batches(windows: TokenWindows, global_batch_size: int, max_batches: int) -> list[dict]:
  """Fixed evaluation batches over every window (or a fixed sample), with per-window weights."""
  return pipeline.eval_batches(windows, global_batch_size, max_batches)


PROMPT_SEPARATOR = ord("=")


@dataclasses.dataclass(frozen=True)
class PromptTargets:
  """Random-access {"tokens": [T+1], "loss_mask": [T]} from {"inputs", "targets"} text examples.

  The sequence is inputs, "=", targets, then the separator 0 that marks the end, zero-padded; the
  loss counts only the predictions of the targets and the end (the model is not asked to guess the
  random inputs).
  """
  source: object
  seq_len: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.source[index]
    inputs = np.frombuffer(example["inputs"], np.uint8)
    targets = np.frombuffer(example["targets"], np.uint8)
    sequence = np.concatenate([inputs, [PROMPT_SEPARATOR], targets, [DOCUMENT_SEPARATOR]]).astype(np.int32)
    if len(sequence) > self.seq_len + 1:
      raise UserError(f"example {index} needs {len(sequence) - 1} tokens but --seq_len={self.seq_len}; "
                      "raise --seq_len")
    tokens = np.zeros(self.seq_len + 1, np.int32)
    tokens[:len(sequence)] = sequence
    loss_mask = np.zeros(self.seq_len, np.float32)
    # Position t predicts tokens[t + 1]: the targets start right after the separator.
    loss_mask[len(inputs):len(sequence) - 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def open_prompt_targets(dataset: str, split: str, seq_len: int, data_dir: str | None) -> PromptTargets:
  return PromptTargets(sources.load_source(dataset, split, data_dir), seq_len)


def is_prompt_target(dataset: str, data_dir: str | None) -> bool:
  """Whether the data set holds {"inputs", "targets"} pairs rather than running text."""
  return {"inputs", "targets"} <= sources.feature_names(dataset, data_dir)
