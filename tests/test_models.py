import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import models
from bigjax.errors import UserError


def _param_count(model, length=8):
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))
  )
  return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))


def test_gpt2_small_has_the_published_parameter_count():
  # openai/gpt-2 "117M" = Hugging Face GPT2Model: 124,439,808 parameters with the tied head.
  assert _param_count(models.create("gpt2-small")) == 124_439_808


def test_gpt2_medium_has_the_published_parameter_count():
  assert _param_count(models.create("gpt2-medium")) == 354_823_168


def test_gpt2_small_layer_sizes():
  abstract = jax.eval_shape(
      lambda: models.create("gpt2-small").init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  )
  params = nn.unbox(abstract)["params"]
  assert params["token_embed"]["embedding"].shape == (50257, 768)
  assert params["position_embed"]["embedding"].shape == (1024, 768)
  assert sorted(k for k in params if k.startswith("block_")) == sorted(
      f"block_{i}" for i in range(12)
  )
  assert params["block_0"]["mlp"]["wi"]["kernel"].shape == (768, 3072)
  assert params["block_0"]["attn"]["query"]["kernel"].shape == (768, 12, 64)


def test_untied_embeddings_add_a_head():
  tied = _param_count(models.create("transformer-tiny"))
  untied = _param_count(models.create("transformer-tiny", tie_embeddings=False))
  assert untied - tied == 256 * 256


def test_tiny_forward_is_finite_with_every_position_kind():
  for position in ("learned", "sinusoidal", "rotary", "none"):
    model = models.create("transformer-tiny", position=position, num_kv_heads=2)
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    variables = model.init(jax.random.key(0), tokens)
    logits = model.apply(variables, tokens)
    assert logits.shape == (2, 8, 256) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = models.create("transformer-tiny", dtype="bfloat16")
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))
  assert model.apply(variables, tokens).dtype == jnp.float32


def test_unknown_model_lists_the_known_ones():
  with pytest.raises(UserError, match="unknown model 'gpt5'.*gpt2-small.*transformer-tiny"):
    models.create("gpt5")


def test_unknown_override_names_the_fields():
  with pytest.raises(UserError, match="num_layer.*known fields"):
    models.create("transformer-tiny", num_layer=3)


def test_invalid_override_is_a_user_error():
  with pytest.raises(UserError, match="num_kv_heads=3 must divide num_heads=4"):
    models.create("transformer-tiny", num_kv_heads=3)


def test_sequence_longer_than_max_len_is_rejected():
  model = models.create("transformer-tiny", max_len=8)
  with pytest.raises(ValueError, match="exceeds the model's max_len=8"):
    model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_register_adds_a_preset_and_rejects_duplicates():
  @models.register("test-dense")
  def dense(**overrides):
    return nn.Dense(overrides.get("features", 3))

  assert "test-dense" in models.names()
  assert models.create("test-dense", features=5).features == 5
  with pytest.raises(ValueError, match="already registered"):
    models.register("test-dense")(dense)
