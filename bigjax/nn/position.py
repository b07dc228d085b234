"""Position information: learned tables, fixed sinusoids (1D and 2D) and rotary embeddings."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np



def sinusoidal_1d(length: int, dim: int, max_timescale: float = 10_000.0) -> np.ndarray:
  """The fixed [length, dim] table of "Attention is all you need": sin on the first half, cos on the second."""
  if dim % 2:
    raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
  half = dim // 2
  inv_timescales = max_timescale ** (-np.arange(half, dtype=np.float64) / half)
  angles_TH = np.arange(length, dtype=np.float64)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(angles_TH), np.cos(angles_TH)], axis=1).astype(np.float32)


def sinusoidal_2d(height: int, width: int, dim: int, max_timescale: float = 10_000.0) -> np.ndarray:
  """A [height * width, dim] table for image patches in row-major order: half the dims encode the
  row, half the column (as in MAE and big_vision)."""
  if dim % 4:
    raise ValueError(f"2D sinusoidal positions need dim divisible by 4, got {dim}")
  rows_HD = sinusoidal_1d(height, dim // 2, max_timescale)
  cols_WD = sinusoidal_1d(width, dim // 2, max_timescale)
  grid_HWD = np.concatenate(
      [np.repeat(rows_HD[:, None, :], width, axis=1), np.repeat(cols_WD[None, :, :], height, axis=0)],
      axis=-1)
  return grid_HWD.reshape(height * width, dim)


class LearnedPositions(nn.Module):
  """A trained [max_len, features] table looked up at the given positions."""
  max_len: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  embedding_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions_BT: jnp.ndarray) -> jnp.ndarray:
    table_LD = self.param(
        "embedding",
        nn.with_logical_partitioning(self.embedding_init, ("length", "embed")),
        (self.max_len, self.features), self.param_dtype)
    return jnp.take(table_LD, positions_BT, axis=0).astype(self.dtype)


class SinusoidalPositions(nn.Module):
  """The fixed 1D table of `sinusoidal_1d`, looked up at the given positions; no parameters."""
  max_len: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions_BT: jnp.ndarray) -> jnp.ndarray:
    table_LD = jnp.asarray(sinusoidal_1d(self.max_len, self.features))
    return jnp.take(table_LD, positions_BT, axis=0).astype(self.dtype)


def apply_rotary(x_BTHK: jnp.ndarray, positions_BT: jnp.ndarray, base: float = 10_000.0) -> jnp.ndarray:
  """Rotary position embedding (RoFormer): rotates each pair (x[i], x[i + K/2]) by position * base^(-2i/K).

  The half-split pairing (as in GPT-NeoX and LLaMA's reference code) makes q.k depend only on the
  distance between positions. Computed in float32, returned in x's dtype.
  """
  head_dim = x_BTHK.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
  half = head_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BTH = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angles_BTH)[:, :, None, :]
  cos = jnp.cos(angles_BTH)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTHK.dtype)
