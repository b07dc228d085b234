"""Beam search over any model's decode interface (`decoder(apply_model)` -> (start, step), as
TransformerLM, RNNLM and the seq2seq models have), in one jitted loop.

Each step ranks the expansions of the alive hypotheses by log-probability and walks down the
ranking until `beam_size` unfinished ones are found (at most 2 * beam_size expansions, as in T5X
and fairseq): those stay alive, and the ones met on the way that end in eos_id compete with the
finished hypotheses for `beam_size` places, scored with Wu et al.'s length penalty. An end ranked
below every surviving alive hypothesis is dropped (fairseq drops it too; T5X keeps it), so that
beam_size=1 with length_penalty=0 is greedy decoding. Once beam_size exceeds the number of
unfinished prefixes of num_tokens - 1 tokens, (V - 1) ** (num_tokens - 1) for V tokens, nothing is
ever dropped and the search is exact. It always runs num_tokens steps (no early exit).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  beam_size: int = 4  # hypotheses kept per row, alive and finished each
  length_penalty: float = 0.6  # alpha of Wu et al. 2016 (see sequence_score); 0 ranks by log P

  def __post_init__(self):
    checks.positive_int(self, "beam_size")
    checks.nonnegative_number(self, "length_penalty")


def sequence_score(log_prob, length, length_penalty):
  """Wu et al. 2016: log P(Y) / ((5 + |Y|) / 6) ** alpha, |Y| counting the end token."""
  return log_prob / ((5.0 + length) / 6.0) ** length_penalty


def _batch_axes(start, params, source, carry):
  """For each leaf of `carry` (start's, flattened), the axis that holds the batch, or None: the
  axis whose size changes when start sees one more row."""
  rows = jax.tree.leaves(source)[0].shape[0]
  one_more = lambda x: jax.ShapeDtypeStruct((rows + 1,) + x.shape[1:], x.dtype)
  bigger = jax.tree.leaves(jax.eval_shape(start, params, jax.tree.map(one_more, source))[1])
  axes = []
  for x, y in zip(jax.tree.leaves(carry), bigger):
    differ = [a for a, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
    if len(differ) > 1 or (differ and x.shape[differ[0]] != rows):
      raise UserError(
          f"beam search cannot reorder a decoder carry leaf of shape {x.shape} for {rows} rows: "
          "each carry leaf needs the batch on one axis of its own (or none)"
      )
    axes.append(differ[0] if differ else None)
  return axes


def _keep_best(finished, candidates):
  """The best (tokens_BWN, lengths_BW, scores_BW) of both, as many per row as `finished` has."""
  seq_BKN, len_BK, score_BK = (jnp.concatenate(pair, 1) for pair in zip(finished, candidates))
  score_BW, best_BW = jax.lax.top_k(score_BK, finished[2].shape[1])
  return (
      jnp.take_along_axis(seq_BKN, best_BW[..., None], 1),
      jnp.take_along_axis(len_BK, best_BW, 1),
      score_BW,
  )


@functools.partial(
    jax.jit, static_argnames=("start", "step", "first_position", "num_tokens", "eos_id", "cfg")
)
def beam_search(
    start,
    step,
    params,
    source,
    *,
    first_position: int,
    num_tokens: int,
    eos_id: int,
    cfg: BeamConfig,
):
  """-> (tokens_BWN int32, lengths_BW int32, scores_BW float32): the beam_size best hypotheses
  per row of `source` (a pytree of arrays, batch on axis 0), best first.

  start(params, source) -> (logits_BV, carry) and step(params, carry, tokens_B1, position) ->
  (logits_BV, carry) are a model's decode interface; the first generated token is fed at
  `first_position` (the prompt length for an LM, 1 for a seq2seq decoder). A hypothesis ends with
  its first eos_id or after num_tokens tokens; lengths count its tokens, the end included, and the
  tokens after it are eos_id. Scores are sequence_score's, -inf for filler when a row has fewer
  than beam_size hypotheses. start and step are static arguments, hashed by identity: build them
  once (a model's decoder() makes new functions each call) and reuse them, or each call compiles.
  """
  if not (checks.is_int(num_tokens) and num_tokens >= 1):
    raise UserError(f"beam search: num_tokens={num_tokens!r} must be an integer >= 1")
  W, N = cfg.beam_size, num_tokens
  B = jax.tree.leaves(source)[0].shape[0]
  source = jax.tree.map(lambda x: jnp.repeat(x, W, axis=0), source)  # a row's beams adjacent
  logits_BV, carry = start(params, source)
  axes, treedef = _batch_axes(start, params, source, carry), jax.tree.structure(carry)
  V = logits_BV.shape[-1]
  if not (checks.is_int(eos_id) and 0 <= eos_id < V):
    raise UserError(f"beam search: eos_id={eos_id!r} must be a token id in [0, {V})")

  score = lambda log_prob, length: sequence_score(log_prob, length, cfg.length_penalty)

  def reorder(carry, beam_BW):
    rows = (jnp.arange(B)[:, None] * W + beam_BW).reshape(-1)
    leaves = treedef.flatten_up_to(carry)
    leaves = [x if a is None else jnp.take(x, rows, axis=a) for x, a in zip(leaves, axes)]
    return treedef.unflatten(leaves)

  def expand(state, logits_BV, i):
    alive_BWN, alive_logp_BW, finished = state
    log_probs_BWV = jax.nn.log_softmax(logits_BV.astype(jnp.float32)).reshape(B, W, V)
    logp_BWV = alive_logp_BW[..., None] + log_probs_BWV  # dead beams stay -inf: no inf - inf
    grown_BW, flat_BW = jax.lax.top_k(logp_BWV.at[..., eos_id].set(-jnp.inf).reshape(B, W * V), W)
    beam_BW, token_BW = flat_BW // V, (flat_BW % V).astype(jnp.int32)
    grown_BWN = jnp.take_along_axis(alive_BWN, beam_BW[..., None], 1).at[:, :, i].set(token_BW)
    # Ends that rank above the last surviving alive hypothesis; the alive sequences already hold
    # eos_id at position i, so they are the ended sequences.
    end_BW = logp_BWV[..., eos_id]
    end_BW = jnp.where(end_BW >= grown_BW[:, -1:], end_BW, -jnp.inf)
    ended = (alive_BWN, jnp.full((B, W), i + 1, jnp.int32), score(end_BW, i + 1))
    finished = _keep_best(finished, ended)
    return (grown_BWN, grown_BW, finished), beam_BW, token_BW

  def body(loop, i):
    state, logits_BV, carry = loop
    state, beam_BW, token_BW = expand(state, logits_BV, i)
    carry = reorder(carry, beam_BW)
    logits_BV, carry = step(params, carry, token_BW.reshape(B * W, 1), first_position + i)
    return (state, logits_BV, carry), None

  # Every beam of a row starts as the same empty hypothesis: only the first one may expand.
  alive_logp_BW = jnp.tile(jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf), (B, 1)).astype(jnp.float32)
  finished = (
      jnp.full((B, W, N), eos_id, jnp.int32),
      jnp.zeros((B, W), jnp.int32),
      jnp.full((B, W), -jnp.inf, jnp.float32),
  )
  state = (jnp.full((B, W, N), eos_id, jnp.int32), alive_logp_BW, finished)
  # The last token needs no step after it (a full KV cache has no room for one).
  (state, logits_BV, _), _ = jax.lax.scan(body, (state, logits_BV, carry), jnp.arange(N - 1))
  (alive_BWN, alive_logp_BW, finished), _, _ = expand(state, logits_BV, N - 1)
  # Hypotheses still alive after num_tokens tokens end there, scored as they stand.
  unended = (alive_BWN, jnp.full((B, W), N, jnp.int32), score(alive_logp_BW, N))
  return _keep_best(finished, unended)
