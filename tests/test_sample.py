import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import models
from bigjax import sample
from bigjax.errors import UserError


def _full_forward_greedy(model, params, prompt, num_tokens):
  """The reference: rerun the whole sequence through the model for every new token."""
  tokens = prompt
  forward = jax.jit(model.apply)
  for _ in range(num_tokens):
    logits = forward({"params": params}, tokens)
    tokens = jnp.concatenate(
        [tokens, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(tokens.dtype)], axis=1
    )
  return tokens


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("transformer-tiny", dict(position="learned")),
        ("transformer-tiny", dict(position="rotary", num_kv_heads=2)),
        ("transformer-tiny", dict(position="sinusoidal", num_kv_heads=1)),
        (
            "transformer-tiny",
            dict(position="rotary", scan_layers=True, remat="full"),
        ),  # caches stacked by layer
        ("lstm-lm", dict(num_layers=2)),
        ("gru-lm", dict()),
    ],
)
def test_cached_greedy_decoding_equals_full_forward(name, overrides):
  small = (
      dict(embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=32)
      if "transformer" in name
      else dict(embed_dim=16, hidden_size=32)
  )
  model = models.create(name, **{**small, **overrides})
  prompt = jax.random.randint(jax.random.key(0), (3, 5), 0, 256).astype(jnp.int32)
  params = nn.unbox(model.init(jax.random.key(1), prompt))["params"]
  # Sharpen the distribution so that near-ties cannot flip an argmax between the two paths.
  params = jax.tree.map(lambda p: p * 3.0, params)
  got = sample.generate(
      model,
      params,
      prompt,
      jax.random.key(2),
      num_tokens=8,
      cfg=sample.SamplingConfig(temperature=0.0),
  )
  want = _full_forward_greedy(model, params, prompt, 8)
  np.testing.assert_array_equal(got, want)


def _naive_filter(logits, top_k, top_p):
  """Top-k first, then the nucleus of the renormalised top-k distribution (as Hugging Face does)."""
  keep = np.ones_like(logits, bool)
  order = np.argsort(-logits)
  if top_k:
    keep[order[top_k:]] = False
  if top_p < 1:
    probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    total = 0.0
    for i in order:
      if total >= top_p:
        keep[i] = False
      total += probs[i]
  return keep


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (3, 1.0), (5, 0.8), (0, 0.999), (1, 1.0)])
def test_filtering_keeps_the_top_k_and_nucleus(top_k, top_p):
  logits = jax.random.normal(jax.random.key(3), (4, 20)) * 2
  got = np.isfinite(sample.filter_logits(logits, sample.SamplingConfig(top_k=top_k, top_p=top_p)))
  for row in range(4):
    np.testing.assert_array_equal(
        got[row], _naive_filter(np.asarray(logits[row], np.float64), top_k, top_p)
    )


def test_sampling_follows_the_temperature():
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = lambda t: jax.vmap(
      lambda k: sample.choose_tokens(logits, k, sample.SamplingConfig(temperature=t))
  )(keys)
  freqs = np.bincount(np.asarray(draw(1.0)).ravel(), minlength=3) / 4000
  np.testing.assert_allclose(freqs, [0.7, 0.2, 0.1], atol=0.03)
  cold = np.bincount(np.asarray(draw(0.25)).ravel(), minlength=3) / 4000
  assert cold[0] > 0.95


def test_bad_settings_and_too_long_requests_are_user_errors():
  with pytest.raises(UserError, match="top_p"):
    sample.SamplingConfig(top_p=0.0)
  model = models.create(
      "transformer-tiny", max_len=8, embed_dim=16, num_heads=2, mlp_dim=32, num_layers=1
  )
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  with pytest.raises(UserError, match=r"exceed the model's max_len=8"):
    sample.generate(model, params, jnp.zeros((1, 4), jnp.int32), jax.random.key(0), num_tokens=5)
