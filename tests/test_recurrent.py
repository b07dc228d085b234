import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import models
from bigjax import tasks
from bigjax.errors import UserError
from bigjax.nn import recurrent

CELLS = ["rnn", "lstm", "gru"]


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _naive_run(cell, params, x_TD, h0=None, c0=None):
  """One sequence, one step at a time in float64, straight from the gate formulas."""
  wx, wh, b = (
      np.asarray(params[k], np.float64) for k in ("input_kernel", "recurrent_kernel", "bias")
  )
  hidden = wh.shape[0]
  h = np.zeros(hidden) if h0 is None else h0
  c = np.zeros(hidden) if c0 is None else c0
  outputs = []
  for x in x_TD:
    xp = np.einsum("d,dgh->gh", x, wx) + b
    hp = np.einsum("h,hgk->gk", h, wh)
    if cell == "rnn":
      h = np.tanh(xp[0] + hp[0])
    elif cell == "lstm":
      i, f, g, o = (xp[k] + hp[k] for k in range(4))
      c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
      h = _sigmoid(o) * np.tanh(c)
    else:
      u = np.asarray(params["recurrent_bias"], np.float64)
      r = _sigmoid(xp[0] + hp[0] + u[0])
      z = _sigmoid(xp[1] + hp[1] + u[1])
      n = np.tanh(xp[2] + r * (hp[2] + u[2]))
      h = (1 - z) * n + z * h
    outputs.append(h)
  return np.stack(outputs), h, c


def _layer(cell, width=5, hidden=6, seed=0):
  layer = recurrent.Recurrent(cell, hidden)
  x = jax.random.normal(jax.random.key(seed), (3, 7, width))
  params = nn.unbox(layer.init(jax.random.key(seed + 1), x))["params"]
  # Non-zero biases everywhere, so that a misplaced bias would show.
  params = jax.tree.map(lambda p: p + 0.05, params)
  return layer, params, x


@pytest.mark.parametrize("cell", CELLS)
def test_scanned_layer_equals_a_step_by_step_loop(cell):
  layer, params, x = _layer(cell)
  outputs, carry = layer.apply({"params": params}, x)
  for b in range(x.shape[0]):
    want, h, c = _naive_run(cell, params, np.asarray(x[b], np.float64))
    np.testing.assert_allclose(outputs[b], want, atol=1e-5)
    np.testing.assert_allclose(recurrent.get_cell(cell).output(carry)[b], h, atol=1e-5)
    if cell == "lstm":
      np.testing.assert_allclose(carry[0][b], c, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_given_initial_state_is_used(cell):
  layer, params, x = _layer(cell)
  h0 = np.full((3, 6), 0.3)
  initial = (jnp.full((3, 6), -0.2), jnp.asarray(h0)) if cell == "lstm" else jnp.asarray(h0)
  outputs, _ = layer.apply({"params": params}, x, None, initial)
  want, _, _ = _naive_run(cell, params, np.asarray(x[0], np.float64), h0[0], np.full(6, -0.2))
  np.testing.assert_allclose(outputs[0], want, atol=1e-5)


def _bidirectional(cell):
  stack = recurrent.RecurrentStack(cell, hidden_size=4, num_layers=1, bidirectional=True)
  x = jax.random.normal(jax.random.key(0), (3, 6, 5))
  lengths = jnp.array([6, 4, 1])
  variables = stack.init(jax.random.key(1), x, lengths)
  return stack, nn.unbox(variables)["params"], x, lengths


@pytest.mark.parametrize("cell", CELLS)
def test_backward_direction_starts_at_each_true_end(cell):
  stack, params, x, lengths = _bidirectional(cell)
  outputs, carries = stack.apply({"params": params}, x, lengths)
  for b, length in enumerate(np.asarray(lengths)):
    truncated_reversed = np.asarray(x[b, :length][::-1], np.float64)
    want, h, _ = _naive_run(cell, params["layer0_backward"], truncated_reversed)
    np.testing.assert_allclose(outputs[b, :length, 4:], want[::-1], atol=1e-5)
    np.testing.assert_allclose(recurrent.get_cell(cell).output(carries[1])[b], h, atol=1e-5)
    fwd, h_fwd, _ = _naive_run(
        cell, params["layer0_forward"], np.asarray(x[b, :length], np.float64)
    )
    np.testing.assert_allclose(outputs[b, :length, :4], fwd, atol=1e-5)
    np.testing.assert_allclose(recurrent.get_cell(cell).output(carries[0])[b], h_fwd, atol=1e-5)
    assert np.all(outputs[b, length:] == 0)


@pytest.mark.parametrize("cell", CELLS)
def test_padding_never_changes_real_positions(cell):
  stack, params, x, lengths = _bidirectional(cell)
  noise = jax.random.normal(jax.random.key(9), x.shape) * 10
  padding = (jnp.arange(6)[None, :] >= lengths[:, None])[..., None]
  noisy = jnp.where(padding, noise, x)
  a_out, a_carries = stack.apply({"params": params}, x, lengths)
  b_out, b_carries = stack.apply({"params": params}, noisy, lengths)
  np.testing.assert_allclose(a_out, b_out, atol=1e-6)
  for a, b in zip(jax.tree.leaves(a_carries), jax.tree.leaves(b_carries), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_stay_finite_over_512_steps(cell):
  model = models.create("lstm-lm", cell=cell, embed_dim=16, hidden_size=32, num_layers=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 513), 0, 256)
  variables = model.init(jax.random.key(1), tokens[:, :8])

  def loss(params):
    sums, _ = tasks.LanguageModelling().loss_sums(model, {"params": params}, {"tokens": tokens})
    return sums["loss"] / sums["count"]

  grads = jax.grad(loss)(nn.unbox(variables)["params"])
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(n) for n in norms) and max(norms) > 0
  # The first layer's input kernel learns from the whole sequence, not just the last steps.
  assert float(jnp.linalg.norm(grads["rnn"]["layer0_forward"]["input_kernel"])) > 0


def test_carried_state_continues_a_sequence():
  model = models.create("lstm-lm", embed_dim=8, hidden_size=16, num_layers=2)
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 256)
  variables = model.init(jax.random.key(1), tokens)
  whole = model.apply(variables, tokens)
  first, state = model.apply(variables, tokens[:, :6], return_state=True)
  second = model.apply(variables, tokens[:, 6:], initial_state=state)
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=1e-5)


def test_forget_gate_bias_starts_at_the_option():
  layer = recurrent.Recurrent("lstm", 4, forget_bias=2.5)
  bias = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 2, 3))))["params"]["bias"]
  np.testing.assert_array_equal(bias[1], 2.5)
  np.testing.assert_array_equal(np.asarray(bias)[[0, 2, 3]], 0.0)


@pytest.mark.parametrize("cell", CELLS)
def test_bfloat16_parameters_start_orthogonal_per_gate(cell):
  layer = recurrent.Recurrent(cell, 16, param_dtype=jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 2, 3))))["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  kernel = np.asarray(params["recurrent_kernel"], np.float32)  # [H, gates, H]
  for gate in range(kernel.shape[1]):
    np.testing.assert_allclose(kernel[:, gate] @ kernel[:, gate].T, np.eye(16), atol=0.03)


@pytest.mark.parametrize("name", ["lstm-lm", "gru-lm", "lstm-classifier", "bilstm-classifier"])
def test_recurrent_presets_run(name):
  model = models.create(name)
  if "lm" in name:
    inputs = jnp.zeros((2, 12), jnp.int32)
    want = (2, 12, 256)
  else:
    inputs = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    want = (2, 10)
  variables = model.init(jax.random.key(1), inputs)
  out = model.apply(variables, inputs)
  assert out.shape == want and np.all(np.isfinite(out))


def test_too_long_sequences_and_lengths_are_one_line_errors():
  model = models.create("lstm-lm", max_len=16, embed_dim=8, hidden_size=8)
  with pytest.raises(UserError, match="sequence length 17 exceeds the model's max_len=16"):
    model.init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
  stack = recurrent.RecurrentStack("gru", 4)
  with pytest.raises(UserError, match="a sequence length of 9 exceeds the padded length 5"):
    stack.init(jax.random.key(0), jnp.zeros((2, 5, 3)), jnp.array([5, 9]))
