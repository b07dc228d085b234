"""The encoder-decoder Transformer (bigjax/nn/seq2seq.py) and cross-attention: padded source
positions are invisible (gradients), the decoder is causal, decoding with the cache equals the full
pass, a 2x2x2 mesh trains to the 1-device losses, and the config refuses what cannot work."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import beam
from bigjax import models
from bigjax import sample
from bigjax import tasks
from bigjax.errors import UserError
from bigjax.nn import attention
from bigjax.nn import seq2seq
from tests.test_beam import EOS
from tests.test_beam import V
from tests.test_beam import _every_hypothesis
from tests.test_sharding import run_steps

VOCAB = 16


def _model(**overrides):
  defaults = dict(
      vocab_size=VOCAB,
      num_layers=2,
      embed_dim=32,
      num_heads=4,
      mlp_dim=64,
      max_len=10,
      max_source_len=9,
  )
  return seq2seq.TransformerSeq2Seq(seq2seq.Seq2SeqConfig(**{**defaults, **overrides}))


def _inputs(batch=3, source_len=9, target_len=7, seed=0):
  rng = np.random.default_rng(seed)
  inputs = jnp.asarray(rng.integers(1, VOCAB, (batch, source_len)), jnp.int32)
  lengths = jnp.asarray([source_len, 5, 2][:batch], jnp.int32)
  decoder_inputs = jnp.asarray(rng.integers(1, VOCAB, (batch, target_len)), jnp.int32)
  return inputs, lengths, decoder_inputs.at[:, 0].set(0)


def _init(model, inputs, lengths, decoder_inputs):
  return model.init(jax.random.PRNGKey(1), inputs, lengths, decoder_inputs)


def test_cross_attention_sees_the_real_source_positions_only():
  x_BTD = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 16))
  kv_BSD = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 16))
  valid_BS = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
  layer = attention.MultiHeadAttention(num_heads=2, head_dim=8, cross_attention=True)
  variables = layer.init(
      jax.random.PRNGKey(2), x_BTD, attention.Mask(valid_BS=valid_BS), kv_BSD=kv_BSD
  )

  def out(kv):
    return layer.apply(variables, x_BTD, attention.Mask(valid_BS=valid_BS), kv_BSD=kv)

  grad_BSD = jax.grad(lambda kv: jnp.sum(out(kv) ** 2))(kv_BSD)
  assert np.all(np.asarray(grad_BSD[1, 3:]) == 0)  # padding keys: no influence at all
  assert np.all(np.abs(np.asarray(grad_BSD[1, :3])).sum(-1) > 0)
  assert np.all(np.abs(np.asarray(grad_BSD[0])).sum(-1) > 0)
  # Against a plain softmax over the real keys of row 1.
  params = nn.meta.unbox(variables["params"])
  q = jnp.einsum("td,dhk->thk", x_BTD[1], params["query"]["kernel"]) + params["query"]["bias"]
  k = jnp.einsum("sd,dhk->shk", kv_BSD[1, :3], params["key"]["kernel"]) + params["key"]["bias"]
  v = jnp.einsum("sd,dhk->shk", kv_BSD[1, :3], params["value"]["kernel"]) + params["value"]["bias"]
  probs = jax.nn.softmax(jnp.einsum("thk,shk->hts", q, k) / np.sqrt(8), axis=-1)
  heads = jnp.einsum("hts,shk->thk", probs, v)
  want = jnp.einsum("thk,hkd->td", heads, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(out(kv_BSD)[1], want, atol=1e-5)


@pytest.mark.parametrize(
    "overrides", [{}, {"position": "rotary", "share_embeddings": False, "source_vocab_size": 7}]
)
def test_padded_source_tokens_change_nothing_and_the_decoder_is_causal(overrides):
  model = _model(**overrides)
  inputs, lengths, decoder_inputs = _inputs()
  inputs = inputs % model.config.source_vocab
  variables = _init(model, inputs, lengths, decoder_inputs)
  apply = jax.jit(model.apply)  # compiled once for every call below
  logits = apply(variables, inputs, lengths, decoder_inputs)
  padded = inputs.at[1, 5:].set(3).at[2, 2:].set(4)
  np.testing.assert_array_equal(apply(variables, padded, lengths, decoder_inputs), logits)
  changed = apply(
      variables,
      inputs.at[2, 1].set((inputs[2, 1] + 1) % model.config.source_vocab),
      lengths,
      decoder_inputs,
  )
  assert not np.allclose(changed[2], logits[2]) and np.allclose(changed[:2], logits[:2])

  # The decoder is causal: logits at t depend on decoder inputs <= t only.
  t = 3
  for later in range(t + 1, decoder_inputs.shape[1]):
    moved = apply(
        variables,
        inputs,
        lengths,
        decoder_inputs.at[:, later].set((decoder_inputs[:, later] + 1) % VOCAB),
    )
    np.testing.assert_array_equal(moved[:, : t + 1], logits[:, : t + 1])
  moved = apply(
      variables, inputs, lengths, decoder_inputs.at[:, t].set((decoder_inputs[:, t] + 1) % VOCAB)
  )
  assert not np.allclose(moved[:, t], logits[:, t])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"scan_layers": True, "remat": "full", "position": "sinusoidal", "scale_embeddings": True},
        {
            "position": "rotary",
            "norm": "rmsnorm",
            "mlp": "gated",
            "activation": "silu",
            "num_kv_heads": 2,
            "qk_norm": True,
            "use_bias": False,
            "tie_embeddings": False,
            "num_encoder_layers": 3,
        },
    ],
)
def test_decoding_with_the_cache_equals_the_full_decoder_pass(overrides):
  model = _model(**overrides)
  inputs, lengths, decoder_inputs = _inputs()
  variables = _init(model, inputs, lengths, decoder_inputs)
  full_BTV = model.apply(variables, inputs, lengths, decoder_inputs)
  start, step = (jax.jit(f) for f in model.decoder(model))  # position traced: one compilation
  logits_BV, carry = start(variables["params"], (inputs, lengths))
  stepped = [logits_BV]
  for t in range(1, decoder_inputs.shape[1]):
    logits_BV, carry = step(variables["params"], carry, decoder_inputs[:, t : t + 1], jnp.int32(t))
    stepped.append(logits_BV)
  np.testing.assert_allclose(jnp.stack(stepped, axis=1), full_BTV, atol=2e-5, rtol=0)
  # The cross-attention keys and values are projected once, at the start: a step never reads the
  # encoder output (it is not passed) and the cache keeps them per layer.
  cache = carry[0]
  cross = [
      p
      for p, _ in jax.tree_util.tree_leaves_with_path(cache)
      if "cross_key" in jax.tree_util.keystr(p)
  ]
  assert len(cross) == (1 if overrides.get("scan_layers") else model.config.num_layers)


def _seq2seq_batch(batch=8, source_len=9, target_len=8):
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, source_len + 1, batch).astype(np.int32)
  inputs = rng.integers(1, VOCAB, (batch, source_len)).astype(np.int32)
  inputs[np.arange(source_len)[None, :] >= lengths[:, None]] = 0
  targets = np.zeros((batch, target_len + 1), np.int32)
  loss_mask = np.zeros((batch, target_len), np.float32)
  for row, n in enumerate(rng.integers(1, target_len, batch)):
    targets[row, 1 : n + 1] = rng.integers(1, VOCAB, n)
    loss_mask[row, : n + 1] = 1
  return {"inputs": inputs, "input_lengths": lengths, "targets": targets, "loss_mask": loss_mask}


def test_a_2x2x2_mesh_gives_the_one_device_losses():
  kwargs = lambda: dict(  # noqa: E731
      model=_model(embed_dim=32, num_heads=4, mlp_dim=64, num_layers=1),
      task=tasks.SequenceToSequence(),
      batch=_seq2seq_batch(),
  )
  want, _ = run_steps("data:1,fsdp:1,tensor:1", jax.devices()[:1], **kwargs())
  got, state = run_steps("data:2,fsdp:2,tensor:2", jax.devices(), **kwargs())
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert want[-1] < want[0]
  cross_query = state.params["decoder_stack"]["block_0"]["cross_attn"]["query"]["kernel"]
  assert cross_query.addressable_shards[0].data.size < cross_query.size  # really split


def test_the_task_scores_only_the_masked_targets_and_counts_exact_matches():
  model = _model()
  batch = _seq2seq_batch(batch=4)
  task = tasks.SequenceToSequence()
  variables = task.init(model, jax.random.PRNGKey(0), batch)
  sums, _ = jax.jit(lambda v, b: task.loss_sums(model, v, b))(variables, batch)
  logits = jax.jit(model.apply)(
      variables, batch["inputs"], batch["input_lengths"], batch["targets"][:, :-1]
  )
  log_probs = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(log_probs, batch["targets"][:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(sums["loss"], -jnp.sum(picked * batch["loss_mask"]), rtol=1e-5)
  assert float(sums["count"]) == batch["loss_mask"].sum()
  right = (jnp.argmax(logits, -1) == batch["targets"][:, 1:]) | (batch["loss_mask"] == 0)
  assert float(sums["exact"]) == float(jnp.sum(jnp.all(right, axis=1)))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"source_vocab_size": 20}, "share_embeddings=True needs one vocabulary"),
        ({"eos_id": VOCAB}, f"eos_id={VOCAB} is not an id of vocab_size={VOCAB}"),
        ({"num_encoder_layers": 0}, "num_encoder_layers=0"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
  with pytest.raises(UserError, match=message) as e:
    _model(**overrides)
  assert "\n" not in str(e.value)


def test_a_source_longer_than_the_model_is_refused_with_the_numbers():
  model = _model()
  inputs, lengths, decoder_inputs = _inputs(source_len=9)
  variables = _init(model, inputs, lengths, decoder_inputs)
  with pytest.raises(
      UserError, match="the source has 12 tokens, more than the model's max_source_len=9"
  ):
    model.apply(variables, jnp.zeros((3, 12), jnp.int32), lengths, decoder_inputs)


def test_presets_build_and_the_base_model_has_its_size():
  base = models.create("transformer-base-wmt")
  shapes = jax.eval_shape(
      base.init,
      jax.random.PRNGKey(0),
      jnp.zeros((1, 4), jnp.int32),
      jnp.ones((1,), jnp.int32),
      jnp.zeros((1, 4), jnp.int32),
  )
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
  # 6 + 6 blocks of width 512 and a shared, tied 37,000-id table: 63.1 M (the paper rounds to 65 M).
  assert count == 63_084_544


# Beam search over an encoder-decoder's decode interface (bigjax/beam.py; tests/test_beam.py holds
# it to greedy decoding and exhaustive search on language models).


def _peaky(model, inputs, lengths, decoder_inputs, seed):
  """Parameters drawn large (std 2), so that distributions are peaky and far from ties."""
  shapes = nn.unbox(
      jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs, lengths, decoder_inputs)
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 2.0, x.shape), x.dtype), shapes)["params"]


def _small_vocab_model(kind: str):
  if kind == "rnn":
    model = models.create(
        "lstm-attention-tiny", vocab_size=V, eos_id=EOS, embed_dim=8, hidden_size=16
    )
  else:
    model = _model(vocab_size=V, eos_id=EOS, num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32)
  inputs = jnp.asarray([[2, 3, 0, 2, 3], [3, 2, 2, 0, 0]], jnp.int32)
  lengths = jnp.asarray([5, 3], jnp.int32)
  return model, inputs, lengths, _peaky(model, inputs, lengths, inputs[:, :3], seed=5)


@pytest.mark.parametrize("kind", ["transformer", "rnn"])
def test_beam_of_one_translates_as_greedy_decoding(kind):
  model, inputs, lengths, params = _small_vocab_model(kind)
  start, step = model.decoder(model)
  tokens_BWN, lengths_BW, _ = beam.beam_search(
      start,
      step,
      params,
      (inputs, lengths),
      first_position=1,
      num_tokens=8,
      eos_id=EOS,
      cfg=beam.BeamConfig(beam_size=1, length_penalty=0.0),
  )
  greedy_BN = sample.translate(
      model,
      params,
      (inputs, lengths),
      jax.random.PRNGKey(0),
      num_tokens=8,
      cfg=sample.SamplingConfig(temperature=0),
  )
  for row in range(2):
    n = int(lengths_BW[row, 0])
    np.testing.assert_array_equal(tokens_BWN[row, 0, :n], greedy_BN[row, :n])


@pytest.mark.parametrize(
    "kind, length_penalty", [("transformer", 0.0), ("transformer", 1.0), ("rnn", 0.6)]
)
def test_a_wide_beam_returns_the_best_translation_of_an_exhaustive_search(kind, length_penalty):
  model, inputs, lengths, params = _small_vocab_model(kind)
  num_tokens = 3
  hyps_HN, hyp_lengths_H = _every_hypothesis(num_tokens)
  start, step = model.decoder(model)
  tokens_BWN, lengths_BW, scores_BW = beam.beam_search(
      start,
      step,
      params,
      (inputs, lengths),
      first_position=1,
      num_tokens=num_tokens,
      eos_id=EOS,
      cfg=beam.BeamConfig(beam_size=(V - 1) ** (num_tokens - 1) + 1, length_penalty=length_penalty),
  )
  hyp_count = len(hyps_HN)
  for row in range(2):
    # The reference: every hypothesis scored from one teacher-forced pass of the whole model.
    decoder_inputs = np.concatenate([np.full((hyp_count, 1), EOS), hyps_HN[:, :-1]], 1)
    log_probs = jax.nn.log_softmax(
        model.apply(
            {"params": params},
            jnp.repeat(inputs[row : row + 1], hyp_count, 0),
            jnp.repeat(lengths[row : row + 1], hyp_count, 0),
            jnp.asarray(decoder_inputs, jnp.int32),
        )
    )
    token_logp = np.take_along_axis(np.asarray(log_probs, np.float64), hyps_HN[..., None], -1)[
        ..., 0
    ]
    log_prob_H = np.sum(token_logp * (np.arange(num_tokens) < hyp_lengths_H[:, None]), 1)
    want_H = beam.sequence_score(log_prob_H, hyp_lengths_H, length_penalty)
    best = np.argsort(-want_H, kind="stable")[: tokens_BWN.shape[1]]
    np.testing.assert_array_equal(tokens_BWN[row, 0], hyps_HN[best[0]])
    # Logits of these large weights reach the hundreds: the cached and the full pass sum in other
    # orders, which moves float32 log-probabilities by up to ~1e-4.
    np.testing.assert_allclose(scores_BW[row], want_H[best], rtol=1e-4, atol=1e-4)
