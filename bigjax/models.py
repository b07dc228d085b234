"""Named model presets. `create("gpt2-small")` builds one; forks add their own with `@register`.

A preset is a function from keyword overrides to a Linen module, so a fork registers a model without
touching the core:

    @bigjax.models.register("my-net")
    def my_net(**overrides):
      return MyNet(MyConfig(**{"width": 64, **overrides}))
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn

from bigjax.errors import UserError
from bigjax.nn import transformer

_PRESETS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator that adds a preset under `name`; registering a taken name is an error."""
  def add(preset: Callable[..., nn.Module]):
    if name in _PRESETS:
      raise ValueError(f"model preset {name!r} is already registered")
    _PRESETS[name] = preset
    return preset
  return add


def names() -> list[str]:
  """All registered preset names, sorted."""
  return sorted(_PRESETS)


def create(name: str, **overrides) -> nn.Module:
  """Builds preset `name`, with any config field replaced by `overrides`."""
  if name not in _PRESETS:
    raise UserError(f"unknown model {name!r}; known models: {', '.join(names())}")
  try:
    return _PRESETS[name](**overrides)
  except TypeError as e:  # an override that names no config field
    raise UserError(f"model {name!r}: {e}") from None


def _config(cls, defaults: dict, overrides: dict):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise UserError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
  try:
    return cls(**{**defaults, **overrides})
  except ValueError as e:
    raise UserError(f"{cls.__name__}: {e}") from None


def _transformer_lm(defaults: dict):
  def preset(**overrides) -> transformer.TransformerLM:
    return transformer.TransformerLM(_config(transformer.TransformerConfig, defaults, overrides))
  return preset


# Byte-level LM that trains in minutes on a 2-core CPU (experiments/configs/transformer_tiny.flags).
register("transformer-tiny")(_transformer_lm(dict(
    vocab_size=256, num_layers=2, embed_dim=256, num_heads=4, mlp_dim=1024, max_len=256,
    position="learned")))

# GPT-2 124M (Radford et al. 2019; openai/gpt-2 hparams.json "117M"): 124,439,808 parameters.
register("gpt2-small")(_transformer_lm(dict(
    vocab_size=50257, num_layers=12, embed_dim=768, num_heads=12, mlp_dim=3072, max_len=1024,
    position="learned", activation="gelu", use_bias=True, tie_embeddings=True)))

register("gpt2-medium")(_transformer_lm(dict(
    vocab_size=50257, num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096, max_len=1024,
    position="learned", activation="gelu", use_bias=True, tie_embeddings=True)))
