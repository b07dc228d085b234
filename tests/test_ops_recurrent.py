"""bigjax.ops.recurrent: the LSTM's fast path (lstm_scan, its backward written out) against the
reference (masked_scan of LSTMCell.step under autodiff), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.nn import recurrent
from bigjax.ops import recurrent as recurrent_ops


def test_lstm_scan_matches_autodiff_with_padding_and_initial_state():
  keys = jax.random.split(jax.random.key(0), 7)
  length, batch, hidden = 6, 3, 5
  kernel = 0.5 * jax.random.normal(keys[0], (hidden, 4, hidden))
  xproj = jax.random.normal(keys[1], (length, batch, 4, hidden))
  carry = (jax.random.normal(keys[2], (batch, hidden)), jax.random.normal(keys[3], (batch, hidden)))
  lengths = jnp.array([6, 4, 0])  # full, padded, and a sequence with no real step
  valid = jnp.arange(length)[:, None] < lengths[None, :]
  cotangents = (
      (jax.random.normal(keys[4], (batch, hidden)), jax.random.normal(keys[5], (batch, hidden))),
      jax.random.normal(keys[6], (length, batch, hidden)),
  )

  cell = recurrent.get_cell("lstm")

  def value_and_grads(fn):
    out, vjp = jax.vjp(lambda w, c, x: fn(w, c, x), kernel, carry, xproj)
    return out, vjp(cotangents)

  with jax.default_matmul_precision("highest"):
    got = jax.jit(
        lambda: value_and_grads(lambda w, c, x: recurrent_ops.lstm_scan(w, c, x, valid))
    )()
    want = jax.jit(
        lambda: value_and_grads(
            lambda w, c, x: recurrent_ops.masked_scan(
                lambda carry, xp: cell.step(carry, xp, w, {}), cell.output, c, x, valid
            )
        )
    )()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_fused_gate_activations_keep_relative_precision_in_bfloat16():
  """lstm_scan's one-pass activations (sigmoid as a scaled tanh) and their derivative, in bfloat16,
  against jax.nn.sigmoid / tanh in float32: relative error of bfloat16 rounding, small gates kept.
  """
  z = np.linspace(-12.0, 12.0, 97, dtype=np.float32)
  gates = jnp.asarray(np.broadcast_to(z, (1, 4, z.size)), jnp.bfloat16)
  z = np.asarray(gates[0, 0], np.float32)
  want = np.stack([jax.nn.sigmoid(z), jax.nn.sigmoid(z), np.tanh(z), jax.nn.sigmoid(z)])
  want_grad = np.stack([want[0] * (1 - want[0])] * 2 + [1 - want[2] ** 2, want[3] * (1 - want[3])])
  got = recurrent_ops._lstm_activations(gates)
  got_grad = recurrent_ops._lstm_activations_grad(got)
  assert got.dtype == got_grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got[0], np.float32), want, rtol=1e-2, atol=1e-6)
  # The derivative from a bfloat16 activation a: a (1 - a) keeps its relative precision where a is
  # small (z <= 0); near a = 1 (and |tanh| = 1) the stored a itself has rounded to 1, as it would
  # with any activation function stored in bfloat16.
  small = z <= 0
  sigmoid_rows = [0, 1, 3]
  np.testing.assert_allclose(
      np.asarray(got_grad[0], np.float32)[sigmoid_rows][:, small],
      want_grad[sigmoid_rows][:, small],
      rtol=3e-2,
      atol=1e-7,
  )
