"""Autoregressive sampling from any model with a decode interface (`decoder`: a KV cache for
TransformerLM and TransformerSeq2Seq, the carried state for the recurrent models), in one jitted
loop: language models continue a prompt (generate), encoder-decoders translate a source.
Temperature, top-k and top-p (nucleus) filtering."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import config_checks as checks
from bigjax.errors import UserError
from bigjax.nn import lora


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # 0 is greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0 keeps all
  top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 keeps all

  def __post_init__(self):
    checks.nonnegative_number(self, "temperature")
    checks.nonnegative_int(self, "top_k")
    if not (checks.is_number(self.top_p) and 0 < self.top_p <= 1):
      checks.fail(self, f"top_p={self.top_p!r} must be a number in (0, 1]")


def filter_logits(logits_BV, cfg: SamplingConfig):
  """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.top_k:
    kth_largest = jax.lax.top_k(logits_BV, min(cfg.top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_largest, -jnp.inf, logits_BV)
  if cfg.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # A token stays if the tokens more likely than it hold less than top_p (the first always stays).
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    threshold_B1 = jnp.min(
        jnp.where(before_BV < cfg.top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True
    )
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def choose_tokens(logits_BV, rng, cfg: SamplingConfig):
  if cfg.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BV, cfg) / cfg.temperature).astype(
      jnp.int32
  )


def _decoder(model: nn.Module):
  """The model's decode interface: its architecture's `decoder(apply_model)` method, returning
  (start(params, prompt_BP) -> (logits_BV, carry), step(params, carry, tokens_BT, position) ->
  (logits_BV, carry)); TransformerLM and RNNLM have one. A Lora samples as its base does, through
  its own apply."""
  architecture = lora.base_of(model)
  make = getattr(architecture, "decoder", None)
  if make is None:
    raise UserError(
        f"cannot sample from {type(architecture).__name__}: it has no decoder(apply_model) method "
        "(bigjax.sample's decode interface, as TransformerLM and RNNLM have)"
    )
  return make(model)


def length_limit(model: nn.Module) -> int | None:
  """The most tokens, prompt and continuation together, that `generate` returns for `model`: its
  config's max_len (a TransformerLM's KV cache holds that many positions), or None for no limit."""
  return getattr(getattr(model, "config", None), "max_len", None)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "cfg"))
def generate(
    model: nn.Module,
    params,
    prompt_BP,
    rng,
    *,
    num_tokens: int,
    cfg: SamplingConfig = SamplingConfig(),
):
  """The prompt [B, P] followed by `num_tokens` sampled tokens: [B, P + num_tokens]."""
  prompt_len = prompt_BP.shape[1]
  max_len = length_limit(model)
  if max_len is not None and prompt_len + num_tokens > max_len:
    raise UserError(
        f"prompt ({prompt_len}) + new tokens ({num_tokens}) exceed the model's max_len={max_len}"
    )
  start, step = _decoder(model)
  new_BN = _sampled_tokens(start, step, params, prompt_BP, rng, prompt_len, num_tokens, cfg)
  return jnp.concatenate([prompt_BP, new_BN], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "cfg"))
def translate(
    model: nn.Module,
    params,
    source,
    rng,
    *,
    num_tokens: int,
    cfg: SamplingConfig = SamplingConfig(),
):
  """An encoder-decoder's `num_tokens` sampled target tokens [B, num_tokens] for `source`
  (inputs_BS, input_lengths_B), from its start token on; tokens after an end token are what the
  model sampled there (cut at the first one). bigjax.beam searches instead."""
  start, step = _decoder(model)
  return _sampled_tokens(start, step, params, source, rng, 1, num_tokens, cfg)


def _sampled_tokens(start, step, params, source, rng, first_position, num_tokens, cfg):
  """[B, num_tokens] tokens chosen one at a time after `start(params, source)`, the first fed at
  decoder position `first_position`."""
  logits_BV, carry = start(params, source)

  def body(state, index):
    logits_BV, carry, rng = state
    rng, key = jax.random.split(rng)
    tokens_B = choose_tokens(logits_BV, key, cfg)
    logits_BV, carry = step(params, carry, tokens_B[:, None], first_position + index)
    return (logits_BV, carry, rng), tokens_B

  _, new_NB = jax.lax.scan(body, (logits_BV, carry, rng), jnp.arange(num_tokens))
  return new_NB.T


def generate_text(
    model: nn.Module,
    params,
    prompt: str,
    *,
    num_tokens: int,
    cfg: SamplingConfig = SamplingConfig(),
    num_samples: int = 1,
    seed: int = 0,
) -> list[str]:
  """Byte-level convenience: continues `prompt` `num_samples` times and decodes the bytes as UTF-8."""
  prompt_tokens = np.frombuffer(prompt.encode(), np.uint8).astype(np.int32)
  if not len(prompt_tokens):
    raise UserError("the prompt is empty; give at least one character to continue")
  prompts = jnp.tile(jnp.asarray(prompt_tokens)[None], (num_samples, 1))
  tokens = generate(
      model, params, prompts, jax.random.PRNGKey(seed), num_tokens=num_tokens, cfg=cfg
  )
  return [bytes(np.asarray(row, np.uint8)).decode("utf-8", errors="replace") for row in tokens]
