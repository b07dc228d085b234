"""Hugging Face interop against transformers itself: the open-LM presets have the published models'
parameter counts (transformers' models built on the meta device, nothing allocated).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from bigjax import models

# The published architectures, as their Hugging Face config.json files give them.
_PUBLISHED = {
    # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters.
    "smollm2-135m": transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True),
    # Qwen/Qwen2.5-0.5B: 494,032,768 parameters.
    "qwen2.5-0.5b": transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters.
    "llama3.2-1b": transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, tie_word_embeddings=True),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
    "llama3-8b": transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False),
}


def _hf_param_count(hf_config) -> int:
  with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
  # parameters() yields a tied embedding once, as the published counts do.
  return sum(p.numel() for p in model.parameters())


def _bigjax_param_count(model) -> int:
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  return sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)))


# As the model cards state them (each is also sum(numel) of the released safetensors).
_PUBLISHED_COUNTS = {"smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768, "llama3.2-1b": 1_235_814_400,
                     "llama3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_open_lm_presets_have_the_published_parameter_counts(name):
  count = _bigjax_param_count(models.create(name))
  assert count == _hf_param_count(_PUBLISHED[name]) == _PUBLISHED_COUNTS[name]


def test_llama_tiny_is_about_transformer_tiny_size():
  tiny, llama = (_bigjax_param_count(models.create(n)) for n in ("transformer-tiny", "llama-tiny"))
  assert 0.8 < llama / tiny < 1.2
