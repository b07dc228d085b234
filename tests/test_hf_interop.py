"""Hugging Face interop against transformers itself (DESIGN.md: the reference library wherever one
exists): the open-LM presets have the published models' parameter counts and configs, and a tiny
random model of each family, made and saved by transformers, loads into bigjax with the same logits
and the same greedy continuation; what cannot be mapped is a one-line error naming it.
"""

import copy
import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from bigjax import models
from bigjax import sample
from bigjax import sharding
from bigjax import train
from bigjax.errors import UserError
from bigjax.interop import hf

# The published architectures, as their Hugging Face config.json files give them.
_PUBLISHED = {
    # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters.
    "smollm2-135m": transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Qwen/Qwen2.5-0.5B: 494,032,768 parameters.
    "qwen2.5-0.5b": transformers.Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    # meta-llama/Llama-3.2-1B: 1,235,814,400 parameters.
    "llama3.2-1b": transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
    "llama3-8b": transformers.LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
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
_PUBLISHED_COUNTS = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama3.2-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_open_lm_presets_have_the_published_parameter_counts(name):
  count = _bigjax_param_count(models.create(name))
  assert count == _hf_param_count(_PUBLISHED[name]) == _PUBLISHED_COUNTS[name]


def test_llama_tiny_is_about_transformer_tiny_size():
  tiny, llama = (_bigjax_param_count(models.create(n)) for n in ("transformer-tiny", "llama-tiny"))
  assert 0.8 < llama / tiny < 1.2


def _same_architecture(cfg):
  # An explicit head_dim equal to the default is the same model.
  return dataclasses.replace(cfg, head_dim=cfg.resolved_head_dim)


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_published_configs_import_as_the_presets(name):
  imported = hf.config_from_hf(_PUBLISHED[name].to_dict())
  assert _same_architecture(imported) == _same_architecture(models.create(name).config)


def test_configs_written_before_transformers_5_import_alike():
  # Hub files older than transformers 5 keep rope_theta and rope_scaling at the top level.
  legacy = _PUBLISHED["llama3.2-1b"].to_dict()
  rope = legacy.pop("rope_parameters")
  legacy["rope_theta"] = rope.pop("rope_theta")
  legacy["rope_scaling"] = rope
  legacy["torch_dtype"] = legacy.pop("dtype", None) or "bfloat16"
  imported = hf.config_from_hf(legacy)
  assert _same_architecture(imported) == _same_architecture(
      models.create("llama3.2-1b", dtype="bfloat16", param_dtype="bfloat16").config
  )


# ----------------------------------------------------------------------------------------------
# Tiny random models of each family, made by transformers and saved as a user downloads them.

_SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
)

_FAMILIES = {
    # Llama 3.1's rotary scaling; original length 64 puts the 8 frequencies in all three bands.
    "llama": lambda: transformers.LlamaConfig(
        **{**_SMALL, "max_position_embeddings": 128},
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_SMALL, rope_theta=1_000_000.0, tie_word_embeddings=True
    ),
    # An explicit head_dim narrower than hidden_size / heads, as Mistral NeMo has.
    "mistral": lambda: transformers.MistralConfig(**_SMALL, head_dim=8, sliding_window=None),
    "qwen3": lambda: transformers.Qwen3Config(**_SMALL, head_dim=16, tie_word_embeddings=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=None,
        eos_token_id=None,
    ),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """model_type -> (directory, transformers model). Norm scales and biases, which transformers
  initialises to ones and zeros, are perturbed so that a misplaced one shows in the logits."""
  made = {}
  for model_type, make_config in _FAMILIES.items():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32).eval()
    with torch.no_grad():
      for param in model.parameters():
        if param.ndim == 1:
          param.add_(0.1 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp(model_type)
    # The Llama checkpoint in shards, with model.safetensors.index.json.
    model.save_pretrained(directory, max_shard_size="100KB" if model_type == "llama" else "5GB")
    made[model_type] = (str(directory), model)
  return made


_TOKENS_BT = np.random.RandomState(0).randint(0, 128, (2, 11))


def _reference_logits(model, tokens_BT):
  with torch.no_grad():
    return model(torch.tensor(tokens_BT)).logits.numpy()


def _relative_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("model_type", sorted(_FAMILIES))
def test_imported_model_gives_transformers_logits_and_greedy_tokens(hf_dirs, model_type):
  directory, reference = hf_dirs[model_type]
  module, variables = models.load(directory)
  assert module.config.param_dtype == "float32"
  with jax.default_matmul_precision("highest"):
    logits_BTV = module.apply(variables, _TOKENS_BT)
    assert _relative_error(logits_BTV, _reference_logits(reference, _TOKENS_BT)) < 1e-5
    prompt_BP = _TOKENS_BT[:, :4]
    got = sample.generate(
        module,
        variables["params"],
        jnp.asarray(prompt_BP),
        jax.random.key(0),
        num_tokens=8,
        cfg=sample.SamplingConfig(temperature=0.0),
    )
  with torch.no_grad():
    prompt = torch.tensor(prompt_BP)
    want = reference.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        pad_token_id=0,
    )
  np.testing.assert_array_equal(np.asarray(got), want.numpy())


def test_import_onto_a_mesh_places_each_parameter_in_its_sharding_scanned(hf_dirs):
  directory, reference = hf_dirs["llama"]
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  module, variables = models.load(directory, mesh=mesh, scan_layers=True)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
      "params"
  ]
  want_shardings = sharding.logical_shardings(abstract, mesh)
  for got, want in zip(
      jax.tree.leaves(variables["params"]), jax.tree.leaves(want_shardings), strict=True
  ):
    assert got.sharding == want
  kernel = variables["params"]["blocks"]["attn"]["query"]["kernel"]
  assert kernel.shape == (2, 64, 4, 16)  # layers, embed (fsdp), heads (tensor), head_dim
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with train.mesh_context(mesh), jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)(variables, _TOKENS_BT)
  assert _relative_error(logits, _reference_logits(reference, _TOKENS_BT)) < 1e-5


def test_bfloat16_checkpoint_loads_as_bfloat16(hf_dirs, tmp_path):
  directory, reference = hf_dirs["qwen2"]
  copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
  module, variables = models.load(str(tmp_path))
  assert module.config.dtype == module.config.param_dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(variables))
  _, float32 = models.load(directory)
  np.testing.assert_array_equal(
      variables["params"]["token_embed"]["embedding"],
      float32["params"]["token_embed"]["embedding"].astype(jnp.bfloat16),
  )


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong, before anything is loaded.


def _copy(hf_dirs, model_type, tmp_path) -> str:
  target = tmp_path / model_type
  shutil.copytree(hf_dirs[model_type][0], target)
  return str(target)


def _edit_config(directory: str, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def _edit_tensors(directory: str, edit):
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def _assert_one_line_error(directory: str, message: str):
  with pytest.raises(UserError, match=message) as error:
    models.load(directory)
  assert "\n" not in str(error.value)


def test_directory_without_config_json(tmp_path):
  _assert_one_line_error(
      str(tmp_path),
      "is neither a bigjax export .* nor a Hugging Face model directory " r"\(no config.json\)",
  )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model_type="bert"), "model_type 'bert' is not supported; bigjax imports gpt2, llama"),
        (
            dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
            "rope type 'yarn' is not supported",
        ),
        (dict(hidden_act="gelu_fast"), "hidden_act='gelu_fast' is not supported"),
        (dict(num_hidden_layers=None), "config.json: needs num_hidden_layers"),
    ],
)
def test_unsupported_config_is_refused(hf_dirs, tmp_path, changes, message):
  directory = _copy(hf_dirs, "qwen2", tmp_path)
  _edit_config(directory, **changes)
  _assert_one_line_error(directory, message)


def test_sliding_window_shorter_than_the_context_is_refused(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "mistral", tmp_path)
  _edit_config(directory, sliding_window=16)
  _assert_one_line_error(directory, "sliding_window=16 is smaller than max_position_embeddings=64")


def test_biases_the_config_does_not_announce_are_refused(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "qwen2", tmp_path)
  # Llama: q/k/v biases only if announced
  _edit_config(directory, model_type="llama", attention_bias=False)
  _assert_one_line_error(
      directory,
      "tensor 'model.layers.0.self_attn.k_proj.bias' has no place in the bigjax model .*config",
  )


def test_missing_tensor_is_named(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  _edit_tensors(directory, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))
  _assert_one_line_error(
      directory,
      "tensor 'transformer.h.1.mlp.c_fc.bias' is missing .* for bigjax "
      "variable params/block_1/mlp/wi/bias",
  )


def test_misshapen_tensor_is_named(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  _edit_tensors(
      directory,
      lambda tensors: tensors.update({"transformer.wpe.weight": np.zeros((32, 64), np.float32)}),
  )
  _assert_one_line_error(
      directory,
      r"tensor 'transformer.wpe.weight' has shape \(32, 64\), but .* needs " r"\(64, 64\)",
  )


def test_truncated_safetensors_file_is_named(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "gpt2", tmp_path)
  path = os.path.join(directory, "model.safetensors")
  os.truncate(path, os.path.getsize(path) // 2)
  _assert_one_line_error(
      directory, "model.safetensors is not a readable safetensors file .* truncated"
  )


def test_missing_shard_is_named(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "llama", tmp_path)
  shard = sorted(f for f in os.listdir(directory) if f.startswith("model-"))[-1]
  os.remove(os.path.join(directory, shard))
  _assert_one_line_error(directory, f"model.safetensors.index.json names {shard}, which is missing")
