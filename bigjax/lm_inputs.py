"""A language model's inputs against its configuration (window length, sampled length,
vocabulary), checked before any data is read or checkpoint loaded, each a one-line error in the
flags' terms."""

import numpy as np

from bigjax import sample
from bigjax.errors import UserError


def takes_segment_ids(model) -> bool | None:
  """What the model class declares (`takes_segment_ids`): True when it keeps attention inside each
  packed document given segment_ids_BT and positions_BT, False when it reads a packed window as one
  stream on purpose, None when it says nothing."""
  return getattr(type(model), "takes_segment_ids", None)


def _model_field(model, name: str):
  return getattr(getattr(model, "config", None), name, None)


def _learned_positions(model) -> bool:
  # A learned position table has max_len rows: max_len is then part of the parameters.
  return _model_field(model, "position") == "learned"


def check_seq_len(model, seq_len: int) -> None:
  """--seq_len against the model's max_len, before any data is read. TransformerLM refuses longer
  inputs whatever its position kind (RNNLM too, by its own check), and --mode=sample builds its
  example batch from --seq_len as well."""
  max_len = _model_field(model, "max_len")
  if max_len is None or seq_len <= max_len:
    return
  grow = f"--model_override=max_len={seq_len}"
  if _learned_positions(model):
    grow += " (a new run only: the learned position table has max_len rows)"
  raise UserError(
      f"--seq_len={seq_len} is longer than the model's max_len={max_len}; "
      f"use --seq_len={max_len} or less, or {grow}"
  )


def check_sample_length(model, prompt_len: int, num_tokens: int) -> None:
  """The prompt and --num_tokens together against what `sample.generate` can return (max_len:
  the KV cache's length), said in flags before the checkpoint is loaded."""
  limit = sample.length_limit(model)
  total = prompt_len + num_tokens
  if limit is None or total <= limit:
    return
  room = limit - prompt_len
  fix = (
      f"use --num_tokens={room} or less, or a shorter --prompt"
      if room >= 1
      else f"shorten --prompt to at most {limit - 1} tokens"
  )
  if not _learned_positions(model):  # otherwise the checkpoint's position table fixes max_len
    fix += f", or --model_override=max_len={total}"
  raise UserError(
      f"--num_tokens={num_tokens} after the {prompt_len}-token --prompt makes {total} tokens, "
      f"more than the model's max_len={limit}; {fix}"
  )


def check_vocab(model, tokenizer) -> None:
  """Token ids past the model's vocabulary read no embedding row (NaN): the run would stop at its
  first step with a non-finite loss instead of naming the mismatch."""
  vocab = _model_field(model, "vocab_size")
  if vocab is not None and vocab < tokenizer.vocab_size:
    raise UserError(
        f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} token ids but the model's "
        f"vocab_size={vocab}; use --model_override=vocab_size={tokenizer.vocab_size}"
    )


def document_segments(tokens: np.ndarray, eod_id: int) -> dict[str, np.ndarray]:
  """Segment ids (from 1) and within-document positions of a packed window (see bigjax.data.lm.TokenWindows)."""
  ends = tokens == eod_id
  starts_new = np.concatenate([[False], ends[:-1]])  # the token after an end starts a document
  segment_ids = (1 + np.cumsum(starts_new)).astype(np.int32)
  index = np.arange(len(tokens))
  first = np.maximum.accumulate(np.where(starts_new, index, 0))
  return {"segment_ids": segment_ids, "positions": (index - first).astype(np.int32)}
