"""Position information: learned tables, fixed sinusoids (1D and 2D) and rotary embeddings."""

import dataclasses
import math

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
      [
          np.repeat(rows_HD[:, None, :], width, axis=1),
          np.repeat(cols_WD[None, :, :], height, axis=0),
      ],
      axis=-1,
  )
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
        (self.max_len, self.features),
        self.param_dtype,
    )
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


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama 3.1's rotary frequency scaling, which stretches a model trained on `original_max_len`
  positions to longer contexts: wavelengths longer than original_max_len / low_freq_factor are
  slowed by `factor`, those shorter than original_max_len / high_freq_factor stay, and those in
  between blend the two smoothly (Meta's reference code; transformers' "llama3" rope_type)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int

  def __call__(self, inv_freq_H: jnp.ndarray) -> jnp.ndarray:
    low_freq_wavelen = self.original_max_len / self.low_freq_factor
    high_freq_wavelen = self.original_max_len / self.high_freq_factor
    wavelen_H = 2 * math.pi / inv_freq_H
    slowed_H = jnp.where(wavelen_H > low_freq_wavelen, inv_freq_H / self.factor, inv_freq_H)
    smooth_H = (self.original_max_len / wavelen_H - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor
    )
    blended_H = (1 - smooth_H) * slowed_H / self.factor + smooth_H * slowed_H
    between_H = (wavelen_H >= high_freq_wavelen) & (wavelen_H <= low_freq_wavelen)
    return jnp.where(between_H, blended_H, slowed_H)


def rotary_frequencies(head_dim: int, base: float = 10_000.0, scaling: Llama3Scaling | None = None):
  """The float32 angular frequency of each of the head_dim / 2 rotated pairs: base^(-2i / head_dim),
  then `scaling` if given."""
  half = head_dim // 2
  inv_freq_H = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  return inv_freq_H if scaling is None else scaling(inv_freq_H)


def apply_rotary(
    x_BTHK: jnp.ndarray,
    positions_BT: jnp.ndarray,
    base: float = 10_000.0,
    scaling: Llama3Scaling | None = None,
) -> jnp.ndarray:
  """Rotary position embedding (RoFormer): rotates each pair (x[i], x[i + K/2]) by position * base^(-2i/K).

  The half-split pairing (as in GPT-NeoX and LLaMA's reference code) makes q.k depend only on the
  distance between positions. It is also Hugging Face's `rotate_half` convention, so Llama, Mistral
  and Qwen q/k projections import as plain copies, without permuting rows. Computed in float32,
  returned in x's dtype.
  """
  head_dim = x_BTHK.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head dim, got {head_dim}")
  angles_BTH = positions_BT.astype(jnp.float32)[..., None] * rotary_frequencies(
      head_dim, base, scaling
  )
  sin = jnp.sin(angles_BTH)[:, :, None, :]
  cos = jnp.cos(angles_BTH)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BTHK.dtype)
