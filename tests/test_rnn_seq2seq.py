"""The RNN encoder-decoder with attention (bigjax.nn.recurrent.RNNSeq2Seq)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax.errors import UserError
from bigjax.nn import lora
from bigjax.nn import recurrent

ATTENTIONS = ["additive", "dot"]
# Three sources padded to 6 positions: 6, 3 and 1 real tokens.
LENGTHS = np.array([6, 3, 1], np.int32)
REAL_SOURCE = 10  # real source tokens are 10, 11, ... (one id per position), padding 20, 21, ...
PADDING = 20


def _model(**overrides):
  fields = dict(cell="lstm", hidden_size=12, embed_dim=8, vocab_size=32, max_len=8)
  return recurrent.RNNSeq2Seq(recurrent.RNNSeq2SeqConfig(**{**fields, **overrides}))


def _source():
  """Every real position and every padded one has a token of its own: an embedding row's gradient
  is that position's."""
  positions = np.arange(6)[None, :]
  real = positions < LENGTHS[:, None]
  inputs = np.where(real, REAL_SOURCE + positions, 0)
  padded_ids = PADDING + np.arange(np.sum(~real))
  inputs[~real] = padded_ids
  return jnp.asarray(inputs, jnp.int32), jnp.asarray(LENGTHS), padded_ids


def _decoder_inputs(length=5, seed=0):
  tokens = np.random.default_rng(seed).integers(1, REAL_SOURCE, (3, length))
  tokens[:, 0] = 0  # the start token, eos_id
  return jnp.asarray(tokens, jnp.int32)


def _params(model, inputs, lengths, decoder_inputs, seed=1):
  """Random parameters of the model's shapes, biases included (a misplaced one would show); the
  real init's orthogonal matrices cost seconds of compilation on a CPU and are not under test."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs, lengths, decoder_inputs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes["params"]
  )


def _compiled(f, *args):
  """`f` compiled for arguments shaped as `args`. Op by op, the scans and their gradients would
  cost far more; XLA's backend optimisations would take longer than the few runs they speed up."""
  return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})


def _logits_and_grad(model, params, *inputs, weights_BTV):
  """f(params, *inputs) -> (logits, d sum(logits * weights) / d params), one program for all
  inputs shaped as these."""

  def loss(params, *inputs):
    logits_BTV = model.apply({"params": params}, *inputs)
    return jnp.sum(logits_BTV * weights_BTV), logits_BTV

  grad = _compiled(jax.grad(loss, has_aux=True), params, *inputs)
  return lambda params, *inputs: grad(params, *inputs)[::-1]


# Both attention kinds, each with and without a bidirectional encoder, in two models.
@pytest.mark.parametrize(
    "attention, bidirectional, num_layers", [("additive", False, 2), ("dot", True, 1)]
)
def test_padded_source_positions_are_ignored(attention, bidirectional, num_layers):
  model = _model(attention=attention, bidirectional=bidirectional, num_layers=num_layers)
  inputs, lengths, padded_ids = _source()
  decoder_inputs = _decoder_inputs()
  params = _params(model, inputs, lengths, decoder_inputs)
  weights_BTV = np.random.default_rng(2).normal(size=(3, 5, 32))
  run = _logits_and_grad(model, params, inputs, lengths, decoder_inputs, weights_BTV=weights_BTV)

  logits, grads = run(params, inputs, lengths, decoder_inputs)
  table_grad = np.asarray(grads["token_embed"]["embedding"])
  np.testing.assert_array_equal(table_grad[padded_ids], 0.0)
  real_ids = np.asarray(inputs)[np.arange(6)[None, :] < LENGTHS[:, None]]
  assert np.all(np.any(table_grad[real_ids] != 0, axis=-1))

  other_padding = jnp.where(jnp.arange(6)[None, :] < lengths[:, None], inputs, 3)
  np.testing.assert_array_equal(run(params, other_padding, lengths, decoder_inputs)[0], logits)
  # The one real token of the last source matters to that example only.
  changed, _ = run(params, inputs.at[2, 0].set(5), lengths, decoder_inputs)
  assert np.max(np.abs(changed[2] - logits[2])) > 1e-4
  np.testing.assert_array_equal(changed[:2], logits[:2])
  # Nor does the amount of padding: more padded positions, each with its encoder state, get no
  # attention either.
  longer = jnp.pad(inputs, ((0, 0), (0, 2)), constant_values=PADDING)
  np.testing.assert_allclose(
      _compiled(model.apply, {"params": params}, longer, lengths, decoder_inputs)(
          {"params": params}, longer, lengths, decoder_inputs
      ),
      logits,
      atol=1e-6,
  )
  # A filler row (no real source token) stays finite: its loss may be weighted by 0, not NaN.
  assert np.all(np.isfinite(run(params, inputs, jnp.array([6, 3, 0]), decoder_inputs)[0]))


def _decoded_and_full(decoder_model, apply_model, params, source, decoder_inputs_BT):
  """(logits from start and then step on each decoder input, the full pass's logits, the last
  carry), as bigjax.sample runs the decode interface: compiled, the steps in a scan."""

  def run(params):
    start, step = decoder_model.decoder(apply_model)
    first_BV, carry = start(params, source)

    def body(carry, inputs):
      logits_BV, carry = step(params, carry, inputs[0], inputs[1])
      return carry, logits_BV

    tokens_TB1 = decoder_inputs_BT[:, 1:].T[:, :, None]
    positions = jnp.arange(1, decoder_inputs_BT.shape[1])
    carry, rest_TBV = jax.lax.scan(body, carry, (tokens_TB1, positions))
    decoded_BTV = jnp.concatenate([first_BV[:, None], rest_TBV.transpose(1, 0, 2)], axis=1)
    return decoded_BTV, apply_model.apply({"params": params}, *source, decoder_inputs_BT), carry

  return _compiled(run, params)(params)


# Each cell with one attention kind (the attention does not depend on the cell); the second
# decodes through a Lora, as bigjax.sample does (the adapters act on the keys and the head).
@pytest.mark.parametrize(
    "cell, attention, adapted", [("lstm", "additive", False), ("gru", "dot", True)]
)
def test_decoding_with_the_carry_equals_the_full_pass(cell, attention, adapted):
  model = _model(cell=cell, attention=attention, bidirectional=True, decoder_layers=2)
  apply_model = model
  if adapted:
    apply_model = lora.Lora(model, lora.LoraConfig(rank=2, targets=r"(attention_key|head)/kernel$"))
  inputs, lengths, _ = _source()
  decoder_inputs = _decoder_inputs()
  params = _params(apply_model, inputs, lengths, decoder_inputs)
  assert ("lora_b" in params["head"]) == adapted  # random, not zero: the adapters count
  decoded, want, carry = _decoded_and_full(
      model, apply_model, params, (inputs, lengths), decoder_inputs
  )
  assert decoded.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(decoded, want, atol=1e-5)
  # Every carried leaf has the batch first: beam search gathers along it.
  assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(carry))


def test_decoder_position_sees_no_later_decoder_input():
  model = _model(share_embeddings=False, source_vocab_size=40)
  inputs, lengths, _ = _source()
  # Decoder position t reads token t: a target embedding row's gradient is that position's.
  decoder_inputs = jnp.tile(jnp.arange(6, dtype=jnp.int32), (3, 1))
  params = _params(model, inputs, lengths, decoder_inputs)
  t = 2
  weights_BTV = np.zeros((3, 6, 32))
  weights_BTV[:, t] = 1.0
  run = _logits_and_grad(model, params, inputs, lengths, decoder_inputs, weights_BTV=weights_BTV)
  logits, grads = run(params, inputs, lengths, decoder_inputs)
  table_grad = np.asarray(grads["token_embed"]["embedding"])
  np.testing.assert_array_equal(table_grad[t + 1 : 6], 0.0)
  assert np.all(np.any(table_grad[: t + 1] != 0, axis=-1))
  changed, _ = run(params, inputs, lengths, decoder_inputs.at[:, t + 1 :].set(7))
  np.testing.assert_array_equal(changed[:, : t + 1], logits[:, : t + 1])
  assert np.max(np.abs(changed[:, t + 1 :] - logits[:, t + 1 :])) > 1e-4


def _dense(params, x):
  return x @ np.asarray(params["kernel"], np.float64) + np.asarray(
      params.get("bias", 0.0), np.float64
  )


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_bridge_and_attention_equal_a_naive_reference(attention):
  """The initial decoder carry and everything after the decoder RNN, in float64 from the
  formulas in the docstrings, for each example on its own (its real source positions only)."""
  model = _model(attention=attention, bidirectional=True)
  inputs, lengths, _ = _source()
  decoder_inputs = _decoder_inputs()
  params = _params(model, inputs, lengths, decoder_inputs)

  def run(params):
    logits, captured = model.apply(
        {"params": params}, inputs, lengths, decoder_inputs, capture_intermediates=True
    )
    state = model.apply({"params": params}, inputs, lengths, method="encode")
    return logits, captured["intermediates"], state

  logits, captured, state = _compiled(run, params)(params)
  memory_BSE, encoder_carries = captured["encoder_rnn"]["__call__"][0]
  h_BTH = np.asarray(captured["decoder_rnn"]["__call__"][0][0], np.float64)
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for b, length in enumerate(LENGTHS):
    # The bridge: tanh of one projection of both directions' final h, split into (c, h).
    final = np.concatenate([encoder_carries[0][1][b], encoder_carries[1][1][b]])
    c0, h0 = np.split(np.tanh(_dense(p["bridge_layer0"], final)), 2)
    np.testing.assert_allclose(state["rnn"][0][0][b], c0, atol=1e-6)
    np.testing.assert_allclose(state["rnn"][0][1][b], h0, atol=1e-6)

    e_SE = np.asarray(memory_BSE[b, :length], np.float64)
    for t in range(decoder_inputs.shape[1]):
      h = h_BTH[b, t]
      if attention == "additive":
        keys = _dense(p["attention_key"], e_SE)
        scores = np.tanh(h @ p["attention_query"]["kernel"] + keys) @ p["attention_v"]
      else:
        scores = (e_SE @ p["attention_key"]["kernel"]) @ h
      weights = np.exp(scores - scores.max())
      weights /= weights.sum()
      context = weights @ e_SE
      attended = np.tanh(_dense(p["attention_out"], np.concatenate([context, h])))
      np.testing.assert_allclose(logits[b, t], _dense(p["head"], attended), atol=1e-5)


def _reversal_batch(rng, batch, letters=8, longest=6):
  """Random words of 1 to `longest` letters (tokens 1..letters) and their reversals, in the
  seq2seq batch layout (eos_id 0)."""
  lengths = rng.integers(1, longest + 1, batch)
  inputs = np.zeros((batch, longest), np.int32)
  targets = np.zeros((batch, longest + 2), np.int32)
  loss_mask = np.zeros((batch, longest + 1), np.float32)
  for b, length in enumerate(lengths):
    word = rng.integers(1, letters + 1, length)
    inputs[b, :length] = word
    targets[b, 1 : length + 1] = word[::-1]
    loss_mask[b, : length + 1] = 1.0
  return dict(
      inputs=inputs, input_lengths=lengths.astype(np.int32), targets=targets, loss_mask=loss_mask
  )


def test_it_learns_to_reverse_words():
  model = _model(hidden_size=32, embed_dim=16, vocab_size=9, bidirectional=True)
  rng = np.random.default_rng(0)
  first = _reversal_batch(rng, 2)
  init_args = (jax.random.key(0), first["inputs"], first["input_lengths"], first["targets"][:, :-1])
  variables = _compiled(model.init, *init_args)(*init_args)
  params = nn.unbox(variables)["params"]
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch):
    logits = model.apply(
        {"params": params}, batch["inputs"], batch["input_lengths"], batch["targets"][:, :-1]
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"][:, 1:])
    return jnp.sum(losses * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), logits

  @jax.jit
  def train_step(params, opt_state, batch):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, new_opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), new_opt_state, loss, logits

  for _ in range(200):
    params, opt_state, loss, _ = train_step(params, opt_state, _reversal_batch(rng, 64))
  assert float(loss) < 0.1

  # Teacher-forced predictions of the trained parameters (the step's update is thrown away): the
  # same compiled program, and every target token and end right in 9 of 10 unseen examples.
  held_out_rng, exact = np.random.default_rng(1), []
  for _ in range(4):
    batch = _reversal_batch(held_out_rng, 64)
    logits = train_step(params, opt_state, batch)[3]
    right = (np.argmax(logits, -1) == batch["targets"][:, 1:]) | (batch["loss_mask"] == 0)
    exact.append(np.all(right, axis=-1))
  assert np.mean(exact) >= 0.9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(source_vocab_size=40),
            "share_embeddings=True needs source_vocab_size=40 == vocab_size=32; "
            "set share_embeddings=False",
        ),
        (dict(attention="bilinear"), "unknown attention 'bilinear'; use one of additive, dot"),
        (dict(eos_id=32), "eos_id=32 must be below vocab_size=32"),
        (dict(eos_id=-1), "eos_id=-1 must be an integer >= 0"),
        (dict(attention="dot", attention_dim=8), "attention_dim=8 sets the additive score's"),
        (dict(decoder_layers=0), "decoder_layers=0 must be None or an integer >= 1"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
  with pytest.raises(UserError, match="^" + re.escape("RNNSeq2SeqConfig: " + message)) as error:
    _model(**overrides)
  assert "\n" not in str(error.value)


def test_too_long_sources_and_targets_are_one_line_errors():
  model = _model(max_len=4, max_source_len=5)
  inputs, lengths, _ = _source()
  with pytest.raises(
      UserError, match="source length 6 exceeds the model's max_source_len=5; raise"
  ):
    jax.eval_shape(model.init, jax.random.key(0), inputs, lengths, _decoder_inputs(4))
  with pytest.raises(
      UserError, match="decoder input length 5 exceeds the model's max_len=4; raise"
  ):
    jax.eval_shape(
        model.init, jax.random.key(0), inputs[:, :5], jnp.minimum(lengths, 5), _decoder_inputs(5)
    )
