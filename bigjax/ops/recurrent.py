"""Running a recurrent cell over time: the reference scan for any cell, and the LSTM's fast path.

Shapes: T time, B batch, G gates, H hidden size. Both take the input projection of every step
already computed ([T, B, G, H], one matmul before the scan) and a validity mask [T, B]: at a
padding step the state stays as it was and the output is zero, so the final carry is the state at
each sequence's true end.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def masked_scan(step: Callable, output: Callable, carry, xproj_TBGH, valid_TB):
  """(final carry, outputs [T, B, H]) of `step(carry, xproj_BGH) -> carry` under plain autodiff;
  `output(carry)` is the hidden state h a carry exposes. The reference every fast path equals."""

  def body(carry, inputs):
    xproj_BGH, valid_B = inputs
    new_carry = step(carry, xproj_BGH)
    keep = lambda new, old: jnp.where(valid_B[:, None], new, old)
    new_carry = jax.tree.map(keep, new_carry, carry)
    return new_carry, jnp.where(valid_B[:, None], output(new_carry), 0.0)

  return jax.lax.scan(body, carry, (xproj_TBGH, valid_TB))


@jax.custom_vjp
def lstm_scan(recurrent_HGH, carry, xproj_TBGH, valid_TB):
  """The LSTM recurrence (masked_scan of bigjax.nn.recurrent.LSTMCell) with its backward written out. Under autodiff the
  scan's backward accumulates the recurrent kernel's gradient at every step (a [B, H] x [B, 4H]
  matmul with only B to contract, plus a full-kernel add) and copies its stacked residuals; here
  each backward step only propagates dh through the kernel, and the kernel's gradient is one
  matmul over all T x B steps after the loop."""
  return _lstm_scan_fwd(recurrent_HGH, carry, xproj_TBGH, valid_TB)[0]


# All four LSTM activations as one elementwise pass over the [B, 4, H] gates: sigmoid(z) =
# 0.5 tanh(0.5 z) + 0.5 and tanh(z) = 1 tanh(1 z) + 0, so a = tanh(scale z) scale + shift with a
# per-gate scale and shift. XLA's CPU backend otherwise emits a separate loop (and a slice of the
# gates) per activation plus a concatenation to save them; its derivative is just as uniform:
# da/dz = scale^2 - (a - shift)^2 (= a (1 - a) for a sigmoid gate, 1 - a^2 for the tanh gate).
# Both are computed in float32: in bfloat16, 0.5 tanh + 0.5 would round small sigmoids to zero
# and the derivative's difference would cancel.
_GATE_SCALE_G1 = np.array([0.5, 0.5, 1.0, 0.5], np.float32)[:, None]
_GATE_SHIFT_G1 = np.array([0.5, 0.5, 0.0, 0.5], np.float32)[:, None]


def _lstm_activations(gates_BGH):
  gates32_BGH = gates_BGH.astype(jnp.float32)
  return (jnp.tanh(gates32_BGH * _GATE_SCALE_G1) * _GATE_SCALE_G1 + _GATE_SHIFT_G1).astype(
      gates_BGH.dtype
  )


def _lstm_activations_grad(activations_BGH):
  activations32_BGH = activations_BGH.astype(jnp.float32)
  return (_GATE_SCALE_G1**2 - (activations32_BGH - _GATE_SHIFT_G1) ** 2).astype(
      activations_BGH.dtype
  )


def _lstm_scan_fwd(recurrent_HGH, carry, xproj_TBGH, valid_TB):
  def step(carry, inputs):
    c_BH, h_BH = carry
    xproj_BGH, valid_B1 = inputs[0], inputs[1][:, None]
    activations_BGH = _lstm_activations(xproj_BGH + jnp.einsum("bh,hgk->bgk", h_BH, recurrent_HGH))
    i, f, g, o = (activations_BGH[:, k] for k in range(4))
    new_c_BH = f * c_BH + i * g
    tanh_c_BH = jnp.tanh(new_c_BH)
    new_h_BH = o * tanh_c_BH
    carry_out = (jnp.where(valid_B1, new_c_BH, c_BH), jnp.where(valid_B1, new_h_BH, h_BH))
    saved = (c_BH, h_BH, activations_BGH, tanh_c_BH)
    return carry_out, (jnp.where(valid_B1, new_h_BH, 0.0), saved)

  final, (outputs_TBH, saved) = jax.lax.scan(step, carry, (xproj_TBGH, valid_TB))
  return (final, outputs_TBH), (recurrent_HGH, valid_TB, saved)


def _lstm_scan_bwd(residuals, cotangents):
  recurrent_HGH, valid_TB, saved = residuals
  (dc_final, dh_final), doutputs_TBH = cotangents
  hidden, gates, _ = recurrent_HGH.shape
  # Transposed once here: XLA does not hoist the loop-invariant transpose out of the loop body and
  # would copy the whole kernel at every step.
  recurrent_T_PH = recurrent_HGH.reshape(hidden, gates * hidden).T

  def step(carry, inputs):
    dc_BH, dh_BH = carry
    (c_BH, _, activations_BGH, tanh_c_BH), dout_BH, valid_B1 = (
        inputs[0],
        inputs[1],
        inputs[2][:, None],
    )
    i, f, g, o = (activations_BGH[:, k] for k in range(4))
    # A padding step passed the state through unchanged: its cotangent goes straight back.
    dnew_h = jnp.where(valid_B1, dh_BH + dout_BH, 0.0)
    dnew_c = jnp.where(valid_B1, dc_BH, 0.0) + dnew_h * o * (1.0 - tanh_c_BH**2)
    dactivations_BGH = jnp.stack(
        [dnew_c * g, dnew_c * c_BH, dnew_c * i, dnew_h * tanh_c_BH], axis=1
    )
    dgates_BGH = dactivations_BGH * _lstm_activations_grad(activations_BGH)
    dh_prev = dgates_BGH.reshape(dgates_BGH.shape[0], -1) @ recurrent_T_PH + jnp.where(
        valid_B1, 0.0, dh_BH
    )
    dc_prev = dnew_c * f + jnp.where(valid_B1, 0.0, dc_BH)
    return (dc_prev, dh_prev), dgates_BGH

  dcarry, dgates_TBGH = jax.lax.scan(
      step, (dc_final, dh_final), (saved, doutputs_TBH, valid_TB), reverse=True
  )
  # Steps and examples flattened into one contracting axis first: contracting (t, b) as two axes,
  # XLA transposed the whole [T, B, 4, H] gate gradient to (b, t) order before the matmul.
  h_prev_NH = saved[1].reshape(-1, hidden)
  drecurrent_HGH = (h_prev_NH.T @ dgates_TBGH.reshape(h_prev_NH.shape[0], -1)).reshape(
      recurrent_HGH.shape
  )
  drecurrent_HGH = drecurrent_HGH.astype(recurrent_HGH.dtype)
  return drecurrent_HGH, dcarry, dgates_TBGH, None


lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)
