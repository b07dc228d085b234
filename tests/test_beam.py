import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import beam
from bigjax import models
from bigjax import sample
from bigjax.errors import UserError

V = 4  # the vocabulary: small enough to enumerate every hypothesis
EOS = 1  # not 0, so that nothing passes by treating zero padding as the end


@functools.cache
def _model(key):
  """(model, params, start, step) for key "transformer", "transformer-scanned" or "lstm"; start and
  step are made once, so beam_search compiles once per configuration."""
  if key == "lstm":
    model = models.create("lstm-lm", vocab_size=V, embed_dim=8, hidden_size=16)
  else:
    sizes = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, max_len=16)
    if key == "transformer-scanned":  # its KV cache is [layers, B, ...]
      sizes.update(num_layers=2, scan_layers=True)
    model = models.create("transformer-tiny", vocab_size=V, **sizes)
  # Plain normal weights: model.init's random initialisers take seconds to compile, and these large
  # ones make peaky, varied distributions (near-ties unlikely). The seeds give greedy decodes that
  # end both ways (at an end token and after num_tokens) for the prompts of the greedy test.
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32)))
  rng = np.random.default_rng(19 if key == "lstm" else 18)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 2.0, x.shape), x.dtype), shapes)
  return (model, params["params"], *model.decoder(model))


@functools.cache
def _full_log_probs(key):
  """tokens_BT -> log P(token t+1 | tokens <= t) [B, T, V], from one forward pass."""
  model, params, _, _ = _model(key)
  return jax.jit(lambda tokens: jax.nn.log_softmax(model.apply({"params": params}, tokens), -1))


def _search(key, prompt_BP, num_tokens, cfg):
  _, params, start, step = _model(key)
  return beam.beam_search(
      start,
      step,
      params,
      prompt_BP,
      first_position=prompt_BP.shape[1],
      num_tokens=num_tokens,
      eos_id=EOS,
      cfg=cfg,
  )


def _every_hypothesis(num_tokens):
  """Every token sequence cut after its first end, padded with EOS: ([H, N], lengths [H])."""
  cut = set()
  for seq in itertools.product(range(V), repeat=num_tokens):
    cut.add(seq[: seq.index(EOS) + 1] if EOS in seq else seq)
  cut = sorted(cut)
  lengths = np.array([len(seq) for seq in cut], np.int32)
  return np.array([seq + (EOS,) * (num_tokens - len(seq)) for seq in cut], np.int32), lengths


_REFERENCE_SHAPE = (128, 12)  # hypotheses, prompt + hypothesis tokens


def _reference_scores(key, prompt_P, hyps_HN, lengths_H, length_penalty):
  """Scores from one full forward pass over prompt + hypothesis, without the decode interface."""
  P, (H, N) = len(prompt_P), hyps_HN.shape
  tokens = np.full(_REFERENCE_SHAPE, EOS, np.int32)  # one shape, compiled once; causal, so
  tokens[:H, :P], tokens[:H, P : P + N] = prompt_P, hyps_HN  # the padding changes nothing
  log_probs = np.asarray(_full_log_probs(key)(tokens), np.float64)[:H, P - 1 : P + N - 1]
  token_logp_HN = np.take_along_axis(log_probs, hyps_HN[..., None], -1)
  log_prob_H = np.sum(token_logp_HN[..., 0] * (np.arange(N) < lengths_H[:, None]), 1)
  return beam.sequence_score(log_prob_H, lengths_H, length_penalty)


def _check_well_formed(tokens_WN, lengths_W):
  for seq, length in zip(tokens_WN, lengths_W):
    assert 1 <= length <= len(seq)
    assert EOS not in seq[: length - 1], "an end inside the hypothesis"
    assert np.all(seq[length:] == EOS), "padding after the end must be EOS"
    assert seq[length - 1] == EOS or length == len(seq)


# float32 log-probabilities near 0 (likely tokens) carry an absolute error of about 1e-7 as well.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
PROMPTS_BP = np.array([[0, 2, 3], [3, 0, 0]], np.int32)


@pytest.mark.parametrize("key", ["transformer", "lstm"])
def test_beam_of_one_is_greedy_decoding(key):
  model, params, _, _ = _model(key)
  prompt_BP = np.array(
      [
          [1, 0, 0, 1],
          [3, 3, 0, 3],
          [1, 3, 0, 2],
          [0, 3, 3, 3],
          [2, 2, 2, 1],
          [3, 0, 0, 3],
          [1, 1, 0, 1],
          [0, 0, 1, 0],
      ],
      np.int32,
  )
  N = 8
  tokens_BWN, lengths_BW, scores_BW = map(
      np.asarray, _search(key, prompt_BP, N, beam.BeamConfig(beam_size=1, length_penalty=0.0))
  )
  greedy_BN = sample.generate(
      model,
      params,
      jnp.asarray(prompt_BP),
      jax.random.key(2),
      num_tokens=N,
      cfg=sample.SamplingConfig(temperature=0),
  )
  greedy_BN = np.asarray(greedy_BN)[:, prompt_BP.shape[1] :]
  ended_early = 0
  for b, greedy in enumerate(greedy_BN):
    length = list(greedy).index(EOS) + 1 if EOS in greedy else N
    ended_early += length < N
    assert lengths_BW[b, 0] == length
    np.testing.assert_array_equal(tokens_BWN[b, 0, :length], greedy[:length])
    _check_well_formed(tokens_BWN[b], lengths_BW[b])
    want = _reference_scores(key, prompt_BP[b], greedy[None], np.array([length]), 0.0)
    np.testing.assert_allclose(scores_BW[b], want, **TOLERANCE)
  assert 0 < ended_early < len(greedy_BN), "the prompts should exercise both ways of ending"


@pytest.mark.parametrize(
    "key,length_penalty",
    [
        ("transformer", 0.0),
        ("transformer", 1.0),
        ("transformer-scanned", 0.6),
        ("lstm", 0.0),
        ("lstm", 1.0),
    ],
)
def test_wide_beam_finds_the_best_hypotheses_of_an_exhaustive_search(key, length_penalty):
  # More beams than unfinished prefixes, so the search prunes nothing; for the LSTM more than there
  # are hypotheses (40), which leaves -inf filler.
  N, W = (3, 48) if key == "lstm" else (4, (V - 1) ** 3 + 1)
  tokens_BWN, lengths_BW, scores_BW = _search(
      key, PROMPTS_BP, N, beam.BeamConfig(W, length_penalty)
  )
  hyps_HN, lengths_H = _every_hypothesis(N)
  H = min(W, len(hyps_HN))
  for b in range(len(PROMPTS_BP)):
    scores_H = _reference_scores(key, PROMPTS_BP[b], hyps_HN, lengths_H, length_penalty)
    best = np.argsort(-scores_H, kind="stable")[:H]
    np.testing.assert_array_equal(tokens_BWN[b, :H], hyps_HN[best])
    np.testing.assert_array_equal(lengths_BW[b, :H], lengths_H[best])
    np.testing.assert_allclose(scores_BW[b, :H], scores_H[best], **TOLERANCE)
    assert np.all(scores_BW[b, H:] == -np.inf)


@pytest.mark.parametrize("key", ["transformer-scanned", "lstm"])
def test_narrow_beam_returns_valid_hypotheses_best_first(key):
  N, W = 4, 3
  tokens_BWN, lengths_BW, scores_BW = map(
      np.asarray, _search(key, PROMPTS_BP, N, beam.BeamConfig(W))
  )
  hyps_HN, lengths_H = _every_hypothesis(N)
  for b in range(len(PROMPTS_BP)):
    _check_well_formed(tokens_BWN[b], lengths_BW[b])
    assert len({tuple(seq) for seq in tokens_BWN[b]}) == W, "the hypotheses must differ"
    assert np.all(np.diff(scores_BW[b]) <= 0), "best first"
    want = _reference_scores(key, PROMPTS_BP[b], tokens_BWN[b], lengths_BW[b], 0.6)
    np.testing.assert_allclose(scores_BW[b], want, **TOLERANCE)
    exact = _reference_scores(key, PROMPTS_BP[b], hyps_HN, lengths_H, 0.6)
    best = np.max(exact)  # which the beam cannot beat
    assert scores_BW[b, 0] <= best + TOLERANCE["atol"] + TOLERANCE["rtol"] * abs(best)


def test_carry_with_the_batch_on_two_axes_is_refused():
  start = lambda params, source: (jnp.zeros((len(source[0]), 3)), jnp.zeros((len(source[0]),) * 2))
  step = lambda params, carry, tokens_B1, position: (jnp.zeros((len(carry), 3)), carry)
  source = (jnp.zeros((2, 4), jnp.int32), jnp.full((2,), 4, jnp.int32))  # as a seq2seq model's
  with pytest.raises(UserError, match="batch on one axis"):
    beam.beam_search(
        start, step, {}, source, first_position=1, num_tokens=2, eos_id=0, cfg=beam.BeamConfig(2)
    )


@pytest.mark.parametrize(
    "fields,field",
    [(dict(beam_size=0), "beam_size"), (dict(length_penalty=-1.0), "length_penalty")],
)
def test_bad_config_is_one_line_naming_the_field(fields, field):
  with pytest.raises(UserError) as error:
    beam.BeamConfig(**fields)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"BeamConfig: {field}=")
