"""The LSTM recurrence with its hand-written backward (recurrent.lstm_scan) against autodiff of the
generic scan (recurrent._masked_scan over recurrent.cell_step)."""

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.nn import recurrent


def test_lstm_scan_matches_autodiff_with_padding_and_initial_state():
  keys = jax.random.split(jax.random.key(0), 7)
  length, batch, hidden = 6, 3, 5
  kernel = 0.5 * jax.random.normal(keys[0], (hidden, 4, hidden))
  xproj = jax.random.normal(keys[1], (length, batch, 4, hidden))
  carry = (jax.random.normal(keys[2], (batch, hidden)), jax.random.normal(keys[3], (batch, hidden)))
  lengths = jnp.array([6, 4, 0])  # full, padded, and a sequence with no real step
  valid = jnp.arange(length)[:, None] < lengths[None, :]
  cotangents = ((jax.random.normal(keys[4], (batch, hidden)), jax.random.normal(keys[5], (batch, hidden))),
                jax.random.normal(keys[6], (length, batch, hidden)))

  def value_and_grads(fn):
    out, vjp = jax.vjp(lambda w, c, x: fn(w, c, x), kernel, carry, xproj)
    return out, vjp(cotangents)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda: value_and_grads(lambda w, c, x: recurrent.lstm_scan(w, c, x, valid)))()
    want = jax.jit(lambda: value_and_grads(
        lambda w, c, x: recurrent._masked_scan("lstm", w, None, c, x, valid)))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)
