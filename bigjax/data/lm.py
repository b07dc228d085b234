"""Language-modelling batches: a byte stream cut into [seq_len + 1] windows, shuffled and batched by grain."""

import dataclasses

import grain
import jax
import numpy as np

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


def _per_process_batch(global_batch_size: int) -> int:
  processes = jax.process_count()
  if global_batch_size % processes:
    raise UserError(f"--batch_size={global_batch_size} does not divide over {processes} processes")
  return global_batch_size // processes


def train_batches(windows: TokenWindows, global_batch_size: int, seed: int) -> grain.MapDataset:
  """Endless shuffled batches of this process's share of the windows (a new order every epoch).

  Iterating gives a checkpointable grain iterator (get_state / set_state), so a resumed run sees
  the same batches in the same order.
  """
  batch_size = _per_process_batch(global_batch_size)
  shard = grain.MapDataset.source(windows)[jax.process_index()::jax.process_count()]
  if len(shard) < batch_size:
    raise UserError(f"only {len(shard)} training windows per process, fewer than one batch of "
                    f"{batch_size}; lower --batch_size or --seq_len")
  return shard.shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)


def eval_batches(windows: TokenWindows, global_batch_size: int, max_batches: int) -> list[dict]:
  """Fixed evaluation batches: all windows, or a fixed random sample of `max_batches` batches.

  The last batch is padded with weight-0 windows so that no window is dropped and every batch
  keeps one shape (one compilation).
  """
  batch_size = _per_process_batch(global_batch_size)
  ds = grain.MapDataset.source(windows)
  if max_batches > 0 and max_batches * global_batch_size < len(ds):
    # A random sample rather than the first windows: the split is ordered by file name.
    ds = ds.shuffle(seed=0)[:max_batches * global_batch_size]
  # Every process must run the same number of eval steps, so all pad to the largest share.
  num_batches = -(-len(ds) // global_batch_size)
  ds = ds[jax.process_index()::jax.process_count()]
  examples = [dict(ex, weights=np.ones(windows.seq_len, np.float32)) for ex in ds]
  pad = {"tokens": np.zeros(windows.seq_len + 1, np.int32), "weights": np.zeros(windows.seq_len, np.float32)}
  examples += [pad] * (num_batches * batch_size - len(examples))
  return [{key: np.stack([ex[key] for ex in examples[i * batch_size:(i + 1) * batch_size]])
           for key in pad} for i in range(num_batches)]
