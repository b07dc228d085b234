"""Named model presets. `create("gpt2-small")` builds one; forks add their own with `@register`.

A preset is a function from keyword overrides to a Linen module, so a fork registers a model without
touching the core:

    @bigjax.models.register("my-net")
    def my_net(**overrides):
      return MyNet(MyConfig(**{"width": 64, **overrides}))
"""

import dataclasses
import functools
import os
from collections.abc import Callable

import flax.linen as nn

from bigjax import checkpoint
from bigjax.errors import UserError
from bigjax.interop import hf
from bigjax.nn import conv
from bigjax.nn import mlp
from bigjax.nn import recurrent
from bigjax.nn import seq2seq
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
    raise UserError(
        f"unknown model {name!r}; known models: {', '.join(names())} (a preset registered in a "
        f"module of your own needs that module imported first: --import_modules=MODULE)"
    )
  try:
    return _PRESETS[name](**overrides)
  except TypeError as e:  # an override that names no config field
    raise UserError(f"model {name!r}: {e}") from None


def load(directory: str, *, mesh=None, **overrides):
  """(module, variables) ready for `module.apply(variables, ...)`: evaluate or sample without the
  training state. `directory` is either a bigjax export (written by `--mode=export`) or a Hugging
  Face model directory (config.json and safetensors weights; model types in interop.hf.MODEL_TYPES:
  the LMs gpt2, llama, mistral, qwen2, qwen3 and the image classifiers vit, resnet), whose logits
  then equal transformers'. For the latter, `mesh` places every parameter straight into
  its sharding and `overrides` replace config fields (dtype, param_dtype, scan_layers, ...)."""
  path = os.path.abspath(os.path.expanduser(directory))
  if not os.path.isdir(path):
    raise UserError(
        f"{path} is not a directory (give a bigjax export or a Hugging Face model directory)"
    )
  if checkpoint.is_export(path):
    if mesh is not None or overrides:
      raise UserError(
          f"{path} is a bigjax export: mesh and config overrides apply to Hugging Face "
          f"directories only"
      )
    name, export_overrides, variables = checkpoint.read_export(path)
    return create(name, **export_overrides), variables
  if hf.is_hf_directory(path):
    return hf.load(path, mesh=mesh, **overrides)
  raise UserError(
      f"{path} is neither a bigjax export (no {checkpoint.EXPORT_CONFIG}) nor a Hugging Face "
      f"model directory (no {hf.CONFIG})"
  )


def save_hf(directory: str, module, variables) -> str:
  """Writes a TransformerLM (of the gpt2, llama, qwen2 or qwen3 family), ViT or ResNet and its
  variables as a Hugging Face model directory, which transformers' from_pretrained and `load` read
  back with the same logits; a model without a Hugging Face counterpart is a one-line error naming
  what does not map. Sharded variables are gathered one at a time. Returns the directory."""
  return hf.save(directory, module, variables)


def _config(cls, defaults: dict, overrides: dict):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise UserError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
  try:
    return cls(**{**defaults, **overrides})
  except ValueError as e:
    # bigjax.config_checks messages already start with the class name; others get it here.
    message = str(e) if str(e).startswith(f"{cls.__name__}: ") else f"{cls.__name__}: {e}"
    raise UserError(message) from None


def _preset(module_cls, config_cls, defaults: dict):
  def preset(**overrides) -> nn.Module:
    return module_cls(_config(config_cls, defaults, overrides))

  return preset


def _transformer_lm(defaults: dict):
  return _preset(transformer.TransformerLM, transformer.TransformerConfig, defaults)


# Every config field given, none assumed: what an export of a model whose architecture came from a
# Hugging Face config.json names (bigjax.flags.model_identity), one preset per kind of model.
_FULL_CONFIG_PRESETS = {
    "transformer-lm": (transformer.TransformerLM, transformer.TransformerConfig),
    "vit": (transformer.ViT, transformer.ViTConfig),
    "resnet": (conv.ResNet, conv.ResNetConfig),
}
FULL_CONFIG_PRESETS = tuple(_FULL_CONFIG_PRESETS)
for _name, (_module, _config_cls) in _FULL_CONFIG_PRESETS.items():
  register(_name)(_preset(_module, _config_cls, {}))


def full_config_preset(module: nn.Module) -> str:
  """The preset that rebuilds `module` from all of its config's fields."""
  for name, (module_cls, _) in _FULL_CONFIG_PRESETS.items():
    if type(module) is module_cls:
      return name
  raise UserError(f"{type(module).__name__} has no full-config preset; give --model")


# Byte-level LM that trains in minutes on a 2-core CPU (experiments/configs/transformer_tiny.flags).
register("transformer-tiny")(
    _transformer_lm(
        dict(
            vocab_size=256,
            num_layers=2,
            embed_dim=256,
            num_heads=4,
            mlp_dim=1024,
            max_len=256,
            position="learned",
        )
    )
)

# GPT-2 124M (Radford et al. 2019; openai/gpt-2 hparams.json "117M"): 124,439,808 parameters.
register("gpt2-small")(
    _transformer_lm(
        dict(
            vocab_size=50257,
            num_layers=12,
            embed_dim=768,
            num_heads=12,
            mlp_dim=3072,
            max_len=1024,
            position="learned",
            activation="gelu",
            use_bias=True,
            tie_embeddings=True,
        )
    )
)

register("gpt2-medium")(
    _transformer_lm(
        dict(
            vocab_size=50257,
            num_layers=24,
            embed_dim=1024,
            num_heads=16,
            mlp_dim=4096,
            max_len=1024,
            position="learned",
            activation="gelu",
            use_bias=True,
            tie_embeddings=True,
        )
    )
)

# Llama-family decoders: RMSNorm, SwiGLU, rotary, grouped-query attention, no biases (Qwen2 adds q/k/v
# biases). The published ones are exactly the Hugging Face configs' architectures; their parameter
# counts (tests/test_hf_interop.py checks them against transformers' own models) are in the comments.
_LLAMA_BLOCK = dict(
    position="rotary", norm="rmsnorm", mlp="gated", activation="silu", use_bias=False
)


def _llama_lm(defaults: dict):
  return _transformer_lm({**_LLAMA_BLOCK, **defaults})


# Byte-level, sized and paced like transformer-tiny; mlp_dim is Llama's 8/3 x width rounded up to 256.
register("llama-tiny")(
    _llama_lm(
        dict(
            vocab_size=256,
            num_layers=2,
            embed_dim=256,
            num_heads=4,
            num_kv_heads=2,
            mlp_dim=768,
            max_len=256,
            layer_norm_epsilon=1e-5,
            tie_embeddings=True,
        )
    )
)

# HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters.
register("smollm2-135m")(
    _llama_lm(
        dict(
            vocab_size=49152,
            num_layers=30,
            embed_dim=576,
            num_heads=9,
            num_kv_heads=3,
            mlp_dim=1536,
            max_len=8192,
            rotary_base=100_000.0,
            layer_norm_epsilon=1e-5,
            tie_embeddings=True,
        )
    )
)

# Qwen/Qwen2.5-0.5B: 494,032,768 parameters.
register("qwen2.5-0.5b")(
    _llama_lm(
        dict(
            vocab_size=151936,
            num_layers=24,
            embed_dim=896,
            num_heads=14,
            num_kv_heads=2,
            mlp_dim=4864,
            max_len=32768,
            rotary_base=1_000_000.0,
            layer_norm_epsilon=1e-6,
            qkv_bias=True,
            tie_embeddings=True,
        )
    )
)

# meta-llama/Llama-3.2-1B: 1,235,814,400 parameters.
register("llama3.2-1b")(
    _llama_lm(
        dict(
            vocab_size=128256,
            num_layers=16,
            embed_dim=2048,
            num_heads=32,
            num_kv_heads=8,
            head_dim=64,
            mlp_dim=8192,
            max_len=131072,
            rotary_base=500_000.0,
            rope_scaling="llama3",
            rope_scaling_factor=32.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_len=8192,
            layer_norm_epsilon=1e-5,
            tie_embeddings=True,
        )
    )
)

# meta-llama/Meta-Llama-3-8B: 8,030,261,248 parameters.
register("llama3-8b")(
    _llama_lm(
        dict(
            vocab_size=128256,
            num_layers=32,
            embed_dim=4096,
            num_heads=32,
            num_kv_heads=8,
            mlp_dim=14336,
            max_len=8192,
            rotary_base=500_000.0,
            layer_norm_epsilon=1e-5,
            tie_embeddings=False,
        )
    )
)

# Encoder-decoders (bigjax.nn.seq2seq). Byte-level, trained in minutes on a 2-core CPU
# (experiments/configs/seq2seq_tiny.flags): 2 + 2 blocks of width 128.
_seq2seq = functools.partial(_preset, seq2seq.TransformerSeq2Seq, seq2seq.Seq2SeqConfig)
register("seq2seq-tiny")(
    _seq2seq(
        dict(
            vocab_size=256,
            num_layers=2,
            embed_dim=128,
            num_heads=4,
            mlp_dim=512,
            max_len=64,
            position="learned",
        )
    )
)

# The base model of Vaswani et al. 2017 (6 + 6 layers, width 512, 8 heads, MLP 2048, sinusoidal
# positions, one shared 37,000-id vocabulary tied to the output), pre-norm as today's
# implementations are (flax's wmt example, fairseq's transformer_wmt_en_de with normalize_before).
register("transformer-base-wmt")(
    _seq2seq(
        dict(
            vocab_size=37_000,
            num_layers=6,
            embed_dim=512,
            num_heads=8,
            mlp_dim=2048,
            max_len=256,
            position="sinusoidal",
            activation="relu",
            dropout_rate=0.1,
            scale_embeddings=True,
            tie_embeddings=True,
            share_embeddings=True,
        )
    )
)

# The RNN encoder-decoder with attention (recurrent.RNNSeq2Seq): a bidirectional LSTM encoder, an LSTM
# decoder attending (Bahdanau's additive scores, Luong's attentional state) over the encoder's states;
# 510,336 parameters byte-level (experiments/configs/lstm_attention_tiny.flags).
register("lstm-attention-tiny")(
    _preset(
        recurrent.RNNSeq2Seq,
        recurrent.RNNSeq2SeqConfig,
        dict(
            cell="lstm",
            vocab_size=256,
            embed_dim=64,
            hidden_size=128,
            bidirectional=True,
            attention="additive",
            max_len=64,
        ),
    )
)

# Image classifiers. CPU presets default to scikit-learn's 8x8 digits; the published architectures
# default to ImageNet (224x224x3, 1000 classes), where their parameter counts are the papers'.
register("mlp")(
    _preset(mlp.MLP, mlp.MLPConfig, dict(num_classes=10, input_shape=(8, 8, 1), hidden=(256, 256)))
)

register("cnn-small")(
    _preset(
        conv.CNN,
        conv.CNNConfig,
        dict(
            num_classes=10,
            input_shape=(8, 8, 1),
            features=(32, 64),
            convs_per_stage=2,
            dense=(128,),
        ),
    )
)

_RESNET_DEPTHS = {
    18: ([2, 2, 2, 2], "basic"),
    34: ([3, 4, 6, 3], "basic"),
    50: ([3, 4, 6, 3], "bottleneck"),
    101: ([3, 4, 23, 3], "bottleneck"),
    152: ([3, 8, 36, 3], "bottleneck"),
}
for _depth, (_stages, _block) in _RESNET_DEPTHS.items():
  # torchvision resnet18/34/50/101/152: 11,689,512 / 21,797,672 / 25,557,032 / 44,549,160 / 60,192,808.
  register(f"resnet{_depth}")(
      _preset(
          conv.ResNet,
          conv.ResNetConfig,
          dict(
              num_classes=1000, stage_sizes=tuple(_stages), block=_block, input_shape=(224, 224, 3)
          ),
      )
  )

_VIT_SIZES = {"ti": (192, 3), "s": (384, 6), "b": (768, 12)}
for _size, (_width, _heads) in _VIT_SIZES.items():
  # timm vit_tiny/small/base_patch16_224: 5,717,416 / 22,050,664 / 86,567,656 parameters.
  register(f"vit-{_size}16")(
      _preset(
          transformer.ViT,
          transformer.ViTConfig,
          dict(
              num_classes=1000,
              input_shape=(224, 224, 3),
              patch_size=16,
              num_layers=12,
              embed_dim=_width,
              num_heads=_heads,
              mlp_dim=4 * _width,
              pool="cls",
              position="learned",
          ),
      )
  )

# Recurrent models: byte-level language models and the digits read row by row (8 steps of 8 pixels).
register("lstm-lm")(
    _preset(
        recurrent.RNNLM,
        recurrent.RNNLMConfig,
        dict(cell="lstm", vocab_size=256, embed_dim=128, hidden_size=512, num_layers=1),
    )
)
register("gru-lm")(
    _preset(
        recurrent.RNNLM,
        recurrent.RNNLMConfig,
        dict(cell="gru", vocab_size=256, embed_dim=128, hidden_size=512, num_layers=1),
    )
)
register("lstm-classifier")(
    _preset(
        recurrent.RNNClassifier,
        recurrent.RNNClassifierConfig,
        dict(
            cell="lstm",
            num_classes=10,
            input_shape=(8, 8, 1),
            hidden_size=128,
            num_layers=1,
            pool="last",
        ),
    )
)
register("bilstm-classifier")(
    _preset(
        recurrent.RNNClassifier,
        recurrent.RNNClassifierConfig,
        dict(
            cell="lstm",
            num_classes=10,
            input_shape=(8, 8, 1),
            hidden_size=128,
            num_layers=1,
            bidirectional=True,
            pool="last",
        ),
    )
)
