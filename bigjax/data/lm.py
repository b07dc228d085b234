"""Language-modelling batches: a byte stream cut into [seq_len + 1] windows, shuffled and batched by grain."""

import dataclasses

import numpy as np

from bigjax import lm_inputs
from bigjax.data import sources
from bigjax.data import tokenizers
from bigjax.errors import UserError

# Separates documents in the byte stream. NUL never occurs in source text, so the model learns it as
# "end of file" without it colliding with a real byte.
DOCUMENT_SEPARATOR = tokenizers.ByteTokenizer.eod_id
# Text features tried, in order, when --text_key is not given.
TEXT_KEYS = ("text", "bytes", "content")


def pick_text_key(features: set[str], wanted: str | None, dataset: str) -> str:
  """`wanted` if the data set has it, else its first feature named like text."""
  if wanted:
    if wanted not in features:
      raise UserError(
          f"{dataset} has no feature {wanted!r} (--text_key); its features are {sorted(features)}"
      )
    return wanted
  for key in TEXT_KEYS:
    if key in features:
      return key
  raise UserError(
      f"{dataset} has none of the text features {list(TEXT_KEYS)}; its features are "
      f"{sorted(features)}: name the text with --text_key"
  )


def as_bytes(value) -> bytes:
  """A text feature as bytes: TFDS Text gives bytes, a uint8 Tensor an array."""
  if isinstance(value, str):
    return value.encode("utf-8")
  return value.tobytes() if isinstance(value, np.ndarray) else bytes(value)


def documents(source, field: str):
  """The text of every document of a source, as bytes."""
  return (as_bytes(source[i][field]) for i in range(len(source)))


def token_stream(source, field: str = "bytes", tokenizer=tokenizers.ByteTokenizer()) -> np.ndarray:
  """Every document of a source, tokenized and followed by the end-of-document token, as one array
  of the smallest unsigned dtype that holds the vocabulary."""
  dtype = (
      np.uint8
      if tokenizer.vocab_size <= 256
      else np.uint16
      if tokenizer.vocab_size <= 65536
      else np.int32
  )
  end = np.array([tokenizer.eod_id], dtype)
  pieces = []
  for text in documents(source, field):
    pieces += [tokenizer.encode(text).astype(dtype), end]
  return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


@dataclasses.dataclass(frozen=True)
class TokenWindows:
  """Random-access windows over a token stream: window i is stream[i*T : i*T + T + 1].

  Consecutive windows overlap by one token, so every token but the first is a target exactly once.
  The stream is documents packed end to end, each closed by the end-of-document token, so every
  window is full: no step computes on padding. With `eod_id` set, a window also carries
  `segment_ids` (1 for the document the window starts in, +1 after each end-of-document token,
  which belongs to the document it ends) and `positions` (restarting at 0 with each document), for
  models that keep attention inside a document (see bigjax.nn.attention.segment_mask).
  """

  stream: np.ndarray
  seq_len: int
  eod_id: int | None = None

  def __len__(self) -> int:
    return max(0, (len(self.stream) - 1) // self.seq_len)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    start = index * self.seq_len
    tokens = self.stream[start : start + self.seq_len + 1].astype(np.int32)
    if self.eod_id is None:
      return {"tokens": tokens}
    return {"tokens": tokens, **lm_inputs.document_segments(tokens, self.eod_id)}


def open_windows(
    dataset: str,
    split: str,
    seq_len: int,
    data_dir: str | None,
    tokenizer=None,
    text_key: str | None = None,
    segments: bool = False,
) -> TokenWindows:
  """[seq_len + 1]-token windows over the split's documents, tokenized (bytes by default); with
  `segments`, also their segment ids and within-document positions."""
  source = sources.load_source(dataset, split, data_dir)
  field = pick_text_key(sources.feature_names(dataset, data_dir), text_key, dataset)
  tokenizer = tokenizer or tokenizers.ByteTokenizer()
  windows = TokenWindows(
      token_stream(source, field, tokenizer), seq_len, tokenizer.eod_id if segments else None
  )
  if len(windows) == 0:
    raise UserError(
        f"{dataset}/{split} holds {len(windows.stream)} tokens, too few for one window "
        f"of --seq_len={seq_len}"
    )
  return windows


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
    sequence = np.concatenate([inputs, [PROMPT_SEPARATOR], targets, [DOCUMENT_SEPARATOR]]).astype(
        np.int32
    )
    if len(sequence) > self.seq_len + 1:
      raise UserError(
          f"example {index} needs {len(sequence) - 1} tokens but --seq_len={self.seq_len}; "
          "raise --seq_len"
      )
    tokens = np.zeros(self.seq_len + 1, np.int32)
    tokens[: len(sequence)] = sequence
    loss_mask = np.zeros(self.seq_len, np.float32)
    # Position t predicts tokens[t + 1]: the targets start right after the separator.
    loss_mask[len(inputs) : len(sequence) - 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def open_prompt_targets(
    dataset: str, split: str, seq_len: int, data_dir: str | None
) -> PromptTargets:
  return PromptTargets(sources.load_source(dataset, split, data_dir), seq_len)
