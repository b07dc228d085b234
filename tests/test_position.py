import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.nn import position


def test_sinusoidal_1d_matches_the_formula():
  length, dim = 7, 8
  table = position.sinusoidal_1d(length, dim)
  for pos in range(length):
    for i in range(dim // 2):
      angle = pos / 10_000 ** (i / (dim // 2))
      np.testing.assert_allclose(table[pos, i], math.sin(angle), atol=1e-6)
      np.testing.assert_allclose(table[pos, dim // 2 + i], math.cos(angle), atol=1e-6)


def test_sinusoidal_2d_encodes_row_then_column():
  height, width, dim = 3, 4, 16
  table = position.sinusoidal_2d(height, width, dim)
  assert table.shape == (height * width, dim)
  rows, cols = position.sinusoidal_1d(height, dim // 2), position.sinusoidal_1d(width, dim // 2)
  for r in range(height):
    for c in range(width):
      np.testing.assert_allclose(table[r * width + c], np.concatenate([rows[r], cols[c]]))


def _naive_rotary(x, pos, base=10_000.0):
  """Rotates pair (x[i], x[i + K/2]) by the angle pos * base^(-2i/K), one 2x2 matrix at a time."""
  out = np.array(x, dtype=np.float64)
  half = x.shape[-1] // 2
  for i in range(half):
    theta = pos * base ** (-i / half)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    out[i], out[i + half] = rot @ np.array([x[i], x[i + half]])
  return out


def test_rotary_matches_pairwise_rotation_matrices():
  x = np.asarray(jax.random.normal(jax.random.key(0), (1, 5, 2, 8)))
  positions = np.array([[0, 1, 2, 7, 30]])
  got = np.asarray(position.apply_rotary(jnp.asarray(x), jnp.asarray(positions)))
  for t in range(5):
    for h in range(2):
      np.testing.assert_allclose(
          got[0, t, h], _naive_rotary(x[0, t, h], positions[0, t]), atol=1e-5
      )


def test_rotary_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 1, 16))

  def score(pq, pk):
    rq = position.apply_rotary(q, jnp.array([[pq]]))
    rk = position.apply_rotary(k, jnp.array([[pk]]))
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)
  np.testing.assert_allclose(score(0, 0), score(40, 40), rtol=1e-5)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_learned_positions_look_up_their_table():
  module = position.LearnedPositions(max_len=10, features=4)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  table = np.asarray(nn.unbox(variables)["params"]["embedding"])
  out = module.apply(variables, jnp.array([[9, 0, 4]]))
  np.testing.assert_array_equal(out[0], table[[9, 0, 4]])
