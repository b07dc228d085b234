"""Hugging Face model directories (config.json and safetensors) as bigjax models, and back.

`load(directory)` maps config.json to a bigjax config (TransformerLM for gpt2, llama, mistral, qwen2
and qwen3; ViT for vit; ResNet for resnet) and reads the weights one tensor at a time with
safetensors' lazy reader, reshaping each into bigjax's layout and, given a mesh, placing it straight
into its parameter's sharding: the model never exists whole on one device, and the host holds one
tensor at a time (one parameter of every layer, stacked, under scan_layers).

What cannot be mapped exactly is refused in one line (principle 8): another model_type, a rotary
scaling other than Llama 3's, a sliding window shorter than the context, a ResNet whose widths do
not double per stage, a missing, misshapen or unexpected tensor, a truncated file.

`save(directory, module, variables)` is the inverse, through the same tensor tables: config.json,
and model.safetensors written one parameter at a time. A bigjax model that transformers cannot
express (another block, norm or position scheme, a bias pattern no family has, a ResNet stem for
small images) is refused in one line.

Tensor tables map a bigjax variable path, collection first and layers unrolled
("params/block_0/attn/query/kernel", "batch_stats/stem_bn/mean"), to its Hugging Face tensor.
Shapes: D model width, H query heads, G key/value heads, K head dim, F MLP width, V vocabulary,
P positions, C classes. Hugging Face's Linear stores [out, in], its Conv2d [out, in, kh, kw];
GPT-2's Conv1D stores [in, out].
"""

import contextlib
import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from jax.experimental import multihost_utils

from bigjax import sharding
from bigjax import storage
from bigjax import workdir as workdir_lib
from bigjax.errors import UserError
from bigjax.nn import conv
from bigjax.nn import transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
LM_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
IMAGE_TYPES = ("resnet", "vit")
MODEL_TYPES = LM_TYPES + IMAGE_TYPES

# hidden_act / activation_function -> bigjax activation. GPT-2's "gelu_new" is the tanh form.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu": "gelu_exact",
    "relu": "relu",
}
_DTYPES = ("float32", "bfloat16", "float16")
# Buffers that transformers saves beside the weights; nothing to load from them (older versions'
# causal masks and rotary frequencies, BatchNorm's update counter).
_BUFFER_SUFFIXES = (
    ".attn.bias",
    ".attn.masked_bias",
    ".rotary_emb.inv_freq",
    ".num_batches_tracked",
)


def is_hf_directory(directory: str) -> bool:
  # Hugging Face directories are read from the local disk (safetensors are memory-mapped).
  return not storage.is_remote(directory) and os.path.isfile(os.path.join(directory, CONFIG))


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f"{directory} is not a Hugging Face model directory (no {CONFIG})")
  try:
    with open(path, encoding="utf-8") as f:
      hf_config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(hf_config, dict):
    raise UserError(f"{path} must hold a JSON object, got {type(hf_config).__name__}")
  return hf_config


# ----------------------------------------------------------------------------------------------
# config.json -> TransformerConfig


class _Fields:
  """Reads config.json's fields, each missing or ill-typed one a one-line error naming the file."""

  def __init__(self, hf_config: dict, where: str):
    self.hf, self.where = hf_config, where

  def fail(self, statement: str):
    raise UserError(f"{self.where}: {statement}")

  def int(self, key: str, default=None) -> int:
    # Null means the default there too
    value = default if self.hf.get(key) is None else self.hf[key]
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
      self.fail(f"{key}={value!r} must be an integer >= 1" if value is not None else f"needs {key}")
    return value

  def number(self, key: str, default=None) -> float:
    # Null means the default there too
    value = default if self.hf.get(key) is None else self.hf[key]
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
      self.fail(f"{key}={value!r} must be a number" if value is not None else f"needs {key}")
    return float(value)

  def ints(self, key: str) -> list[int]:
    value = self.hf.get(key)
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
      self.fail(
          f"{key}={value!r} must be a list of integers >= 1"
          if value is not None
          else f"needs {key}"
      )
    return value

  def square(self, key: str, default: int) -> tuple[int, int]:
    """image_size or patch_size: one integer, or [height, width]."""
    value = self.hf.get(key, default)
    pair = value if isinstance(value, list) else [value, value]
    if not (
        len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
      self.fail(f"{key}={value!r} must be an integer >= 1 or [height, width]")
    return tuple(pair)

  def num_labels(self) -> int:
    # transformers writes id2label (its num_labels is len(id2label)); 2 labels when neither is given.
    id2label = self.hf.get("id2label")
    if id2label is None:
      return self.int("num_labels", 2)
    if not (isinstance(id2label, dict) and id2label):
      self.fail(f"id2label={id2label!r} must be a non-empty JSON object")
    return len(id2label)

  def flag(self, key: str, default: bool) -> bool:
    value = self.hf.get(key, default)
    if not isinstance(value, bool):
      self.fail(f"{key}={value!r} must be true or false")
    return value

  def activation(self, key: str) -> str:
    value = self.hf.get(key)
    if value not in _ACTIVATIONS:
      self.fail(f"{key}={value!r} is not supported; bigjax maps {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[value]

  def dtype(self) -> str:
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    value = self.hf.get("dtype", self.hf.get("torch_dtype"))
    return value if value in _DTYPES else "float32"


def _rotary_fields(f: _Fields) -> dict:
  """rotary_base and Llama 3 scaling from either config layout: transformers 5's `rope_parameters`
  or the older `rope_theta` beside `rope_scaling`."""
  params = f.hf.get("rope_parameters") or {}
  legacy = f.hf.get("rope_scaling") or {}
  for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
    if not isinstance(value, dict):
      f.fail(f"{key}={value!r} must be a JSON object")
  if any(isinstance(v, dict) for v in params.values()):
    f.fail(
        "rope_parameters per layer type are not supported; bigjax has one rotary setting for all layers"
    )
  rope = _Fields({**legacy, **params}, f"{f.where} rope parameters")
  kind = rope.hf.get("rope_type", rope.hf.get("type", "default"))
  partial = rope.number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0))
  if partial != 1.0:
    f.fail(f"partial_rotary_factor={partial} is not supported; bigjax rotates the whole head")
  fields = {"rotary_base": rope.number("rope_theta", f.number("rope_theta", 10_000.0))}
  if kind == "default":
    return fields
  if kind != "llama3":
    f.fail(
        f"rope type {kind!r} is not supported; bigjax imports rotary positions of type default or llama3"
    )
  return {
      **fields,
      "rope_scaling": "llama3",
      "rope_scaling_factor": rope.number("factor"),
      "rope_low_freq_factor": rope.number("low_freq_factor"),
      "rope_high_freq_factor": rope.number("high_freq_factor"),
      "rope_original_max_len": rope.int(
          "original_max_position_embeddings", f.hf.get("max_position_embeddings")
      ),
  }


def _refuse_sliding_window(f: _Fields, model_type: str, max_len: int) -> None:
  window = f.hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not f.hf.get("use_sliding_window", False):
    window = None  # Qwen configs carry a window that only use_sliding_window switches on
  if window is not None and window < max_len:
    f.fail(
        f"sliding_window={window} is smaller than max_position_embeddings={max_len}; bigjax attends to "
        f"the whole context, so it would compute a different model"
    )


def _llama_family_fields(f: _Fields, model_type: str) -> dict:
  embed_dim, num_heads = f.int("hidden_size"), f.int("num_attention_heads")
  max_len = f.int("max_position_embeddings")
  _refuse_sliding_window(f, model_type, max_len)
  head_dim = f.hf.get("head_dim") or embed_dim // num_heads
  fields = dict(
      vocab_size=f.int("vocab_size"),
      num_layers=f.int("num_hidden_layers"),
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=f.int("num_key_value_heads", num_heads),
      mlp_dim=f.int("intermediate_size"),
      max_len=max_len,
      position="rotary",
      norm="rmsnorm",
      mlp="gated",
      activation=f.activation("hidden_act"),
      use_bias=False,
      layer_norm_epsilon=f.number("rms_norm_eps"),
      tie_embeddings=f.flag("tie_word_embeddings", False),
      **_rotary_fields(f),
  )
  if head_dim * num_heads != embed_dim:  # the default head_dim stays implicit, as in the presets
    fields["head_dim"] = f.int("head_dim")
  # Bias switches only where a part has biases (use_bias=False covers the rest), as in the presets.
  if model_type == "qwen2":  # q/k/v biases are fixed in Qwen2's code, not in its config
    fields["qkv_bias"] = True
  elif model_type in ("llama", "qwen3") and f.flag("attention_bias", False):
    fields.update(qkv_bias=True, attn_out_bias=True)
  if model_type == "llama" and f.flag("mlp_bias", False):
    fields["mlp_bias"] = True
  if model_type == "qwen3":
    fields["qk_norm"] = True
  return fields


def _gpt2_fields(f: _Fields) -> dict:
  for key, supported in (
      ("scale_attn_weights", True),
      ("scale_attn_by_inverse_layer_idx", False),
      ("add_cross_attention", False),
  ):
    if f.hf.get(key, supported) != supported:
      f.fail(f"{key}={f.hf[key]!r} is not supported (bigjax's GPT-2 has {key}={supported})")
  embed_dim = f.int("n_embd")
  return dict(
      vocab_size=f.int("vocab_size"),
      num_layers=f.int("n_layer"),
      embed_dim=embed_dim,
      num_heads=f.int("n_head"),
      mlp_dim=f.int("n_inner", 4 * embed_dim),
      max_len=f.int("n_positions"),
      position="learned",
      activation=f.activation("activation_function"),
      use_bias=True,
      layer_norm_epsilon=f.number("layer_norm_epsilon", 1e-5),
      tie_embeddings=f.flag("tie_word_embeddings", True),
  )


def _vit_fields(f: _Fields) -> dict:
  if not f.flag("qkv_bias", True):
    f.fail("qkv_bias=false is not supported; bigjax's ViT has q/k/v biases")
  height, width = f.square("image_size", 224)
  patch_height, patch_width = f.square("patch_size", 16)
  if patch_height != patch_width:
    f.fail(
        f"patch_size={[patch_height, patch_width]} is not supported; bigjax's ViT has square patches"
    )
  return dict(
      num_classes=f.num_labels(),
      input_shape=(height, width, f.int("num_channels", 3)),
      patch_size=patch_height,
      num_layers=f.int("num_hidden_layers"),
      embed_dim=f.int("hidden_size"),
      num_heads=f.int("num_attention_heads"),
      mlp_dim=f.int("intermediate_size"),
      pool="cls",
      position="learned",
      activation=f.activation("hidden_act"),
      layer_norm_epsilon=f.number("layer_norm_eps", 1e-12),
  )


def _resnet_widths(width: int, stages: int, block: str) -> list[int]:
  """Each stage's output channels in bigjax's ResNet: the width doubles per stage, x4 after a bottleneck."""
  return [width * 2**stage * (4 if block == "bottleneck" else 1) for stage in range(stages)]


def _resnet_fields(f: _Fields) -> dict:
  block = f.hf.get("layer_type", "bottleneck")
  if block not in ("basic", "bottleneck"):
    f.fail(
        f"layer_type={block!r} is not supported; bigjax's ResNet has basic and bottleneck blocks"
    )
  if f.activation("hidden_act") != "relu":
    f.fail(f"hidden_act={f.hf['hidden_act']!r} is not supported; bigjax's ResNet uses relu")
  for key in ("downsample_in_first_stage", "downsample_in_bottleneck"):
    if f.flag(key, False):
      f.fail(
          f"{key}=true is not supported; bigjax's ResNet is v1.5 (the first stage keeps the stem's "
          f"resolution, a bottleneck strides in its 3x3 convolution)"
      )
  depths, widths, width = f.ints("depths"), f.ints("hidden_sizes"), f.int("embedding_size", 64)
  if widths != _resnet_widths(width, len(depths), block):
    f.fail(
        f"hidden_sizes={widths} with embedding_size={width} is not supported; bigjax's ResNet doubles the "
        f"width every stage: {_resnet_widths(width, len(depths), block)}"
    )
  # Hugging Face's ResNet pools globally and takes any image size; 224 x 224 is its training size.
  return dict(
      num_classes=f.num_labels(),
      stage_sizes=tuple(depths),
      block=block,
      input_shape=(224, 224, f.int("num_channels", 3)),
      width=width,
      stem="imagenet",
  )


def config_from_hf(hf_config: dict, where: str = CONFIG, **overrides):
  """The bigjax config (TransformerConfig, ViTConfig or ResNetConfig) of a Hugging Face config.json
  (as a dict), with `overrides` replacing fields (dtype, param_dtype, scan_layers, input_shape, ...).
  Compute and storage dtypes default to the checkpoint's own."""
  f = _Fields(hf_config, where)
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    f.fail(f"model_type {model_type!r} is not supported; bigjax imports {', '.join(MODEL_TYPES)}")
  family = _FAMILIES[model_type]
  fields = {**family.fields(f, model_type), "dtype": f.dtype(), "param_dtype": f.dtype()}
  try:
    return family.config_class(**{**fields, **overrides})
  except (TypeError, ValueError) as e:  # an override that names no field, or one the config refuses
    raise UserError(f"{where}: {e}") from None


def module_for(cfg):
  """The bigjax module a config_from_hf config describes."""
  for family in _FAMILIES.values():
    if isinstance(cfg, family.config_class):
      return family.module_class(cfg)
  raise UserError(f"{type(cfg).__name__} is not a config of a Hugging Face family")


def _example_input(cfg):
  if isinstance(cfg, transformer.TransformerConfig):
    return jnp.zeros((1, 1), jnp.int32)
  return jnp.zeros((1, *cfg.input_shape), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Tensor names and layouts


class _Layout(NamedTuple):
  """How a Hugging Face tensor becomes a bigjax parameter and back: `to_hf` inverts `to_bigjax`, so
  one table of names serves the importer and the exporter."""

  to_bigjax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


class _Source(NamedTuple):
  """Where a bigjax parameter comes from: a Hugging Face tensor, its shape there, and the reshaping.
  Several parameters that name one tensor are pieces of it along its last axis, in table order
  (GPT-2's fused c_attn)."""

  name: str
  shape: tuple[int, ...]
  layout: _Layout


def _same(x):
  return x


def _transpose(w):
  return w.T


_SAME = _Layout(_same, _same)
_TRANSPOSE = _Layout(_transpose, _transpose)
# A Conv2d kernel [out, in, kh, kw] <-> bigjax's [kh, kw, in, out].
_CONV = _Layout(lambda w: w.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def _out_heads(heads: int, head_dim: int) -> _Layout:
  """A Linear [heads * K, D] <-> bigjax's [D, heads, K] projection kernel; a bias [heads * K] <->
  [heads, K]."""
  return _Layout(
      lambda w: w.T.reshape(-1, heads, head_dim) if w.ndim == 2 else w.reshape(heads, head_dim),
      lambda x: x.reshape(x.shape[0], heads * head_dim).T
      if x.ndim == 3
      else x.reshape(heads * head_dim),
  )


def _in_heads(heads: int, head_dim: int) -> _Layout:
  """An output projection [D, H * K] (Linear) <-> bigjax's [H, K, D]."""
  return _Layout(
      lambda w: w.T.reshape(heads, head_dim, -1), lambda x: x.reshape(heads * head_dim, -1).T
  )


def _llama_family_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.resolved_head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
  sources = {
      "params/token_embed/embedding": _Source(f"{prefix}embed_tokens.weight", (v, d), _SAME),
      "params/ln_final/scale": _Source(f"{prefix}norm.weight", (d,), _SAME),
  }
  if not cfg.tie_embeddings:
    sources["params/head/kernel"] = _Source("lm_head.weight", (v, d), _TRANSPOSE)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}layers.{i}.", f"params/block_{i}/"
    sources[bj + "ln_attn/scale"] = _Source(hf + "input_layernorm.weight", (d,), _SAME)
    sources[bj + "ln_mlp/scale"] = _Source(hf + "post_attention_layernorm.weight", (d,), _SAME)
    for proj, name, heads in (("q", "query", h), ("k", "key", g), ("v", "value", g)):
      sources[bj + f"attn/{name}/kernel"] = _Source(
          hf + f"self_attn.{proj}_proj.weight", (heads * k, d), _out_heads(heads, k)
      )
      if cfg.bias("qkv"):
        sources[bj + f"attn/{name}/bias"] = _Source(
            hf + f"self_attn.{proj}_proj.bias", (heads * k,), _out_heads(heads, k)
        )
    sources[bj + "attn/out/kernel"] = _Source(
        hf + "self_attn.o_proj.weight", (d, h * k), _in_heads(h, k)
    )
    if cfg.bias("attn_out"):
      sources[bj + "attn/out/bias"] = _Source(hf + "self_attn.o_proj.bias", (d,), _SAME)
    if cfg.qk_norm:
      sources[bj + "attn/query_norm/scale"] = _Source(hf + "self_attn.q_norm.weight", (k,), _SAME)
      sources[bj + "attn/key_norm/scale"] = _Source(hf + "self_attn.k_norm.weight", (k,), _SAME)
    for proj, name, shape in (
        ("gate", "wi_gate", (f, d)),
        ("up", "wi_up", (f, d)),
        ("down", "wo", (d, f)),
    ):
      sources[bj + f"mlp/{name}/kernel"] = _Source(
          hf + f"mlp.{proj}_proj.weight", shape, _TRANSPOSE
      )
      if cfg.bias("mlp"):
        sources[bj + f"mlp/{name}/bias"] = _Source(hf + f"mlp.{proj}_proj.bias", shape[:1], _SAME)
  return sources


def _gpt2_fused_qkv(part: int, width: int, heads: int, head_dim: int) -> _Layout:
  """One of q, k, v in GPT-2's fused c_attn ([D, 3D] kernel or [3D] bias) <-> [D, heads, K] or [heads, K]."""

  def take(x):
    x = x[..., part * width : (part + 1) * width]
    return x.reshape(x.shape[:-1] + (heads, head_dim))

  return _Layout(take, lambda x: x.reshape(x.shape[:-2] + (width,)))


def _gpt2_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, h, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_heads, cfg.resolved_head_dim
  sources = {
      "params/token_embed/embedding": _Source(f"{prefix}wte.weight", (v, d), _SAME),
      "params/position_embed/embedding": _Source(f"{prefix}wpe.weight", (cfg.max_len, d), _SAME),
      "params/ln_final/scale": _Source(f"{prefix}ln_f.weight", (d,), _SAME),
      "params/ln_final/bias": _Source(f"{prefix}ln_f.bias", (d,), _SAME),
  }
  if not cfg.tie_embeddings:
    sources["params/head/kernel"] = _Source("lm_head.weight", (v, d), _TRANSPOSE)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}h.{i}.", f"params/block_{i}/"
    for hf_norm, bj_norm in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
      sources[bj + f"{bj_norm}/scale"] = _Source(hf + f"{hf_norm}.weight", (d,), _SAME)
      sources[bj + f"{bj_norm}/bias"] = _Source(hf + f"{hf_norm}.bias", (d,), _SAME)
    for part, name in enumerate(("query", "key", "value")):
      fused = _gpt2_fused_qkv(part, d, h, k)
      sources[bj + f"attn/{name}/kernel"] = _Source(hf + "attn.c_attn.weight", (d, 3 * d), fused)
      sources[bj + f"attn/{name}/bias"] = _Source(hf + "attn.c_attn.bias", (3 * d,), fused)
    # GPT-2's Conv1D stores [in, out] = [H * K, D], bigjax [H, K, D].
    sources[bj + "attn/out/kernel"] = _Source(
        hf + "attn.c_proj.weight",
        (d, d),
        _Layout(lambda w: w.reshape(h, k, d), lambda x: x.reshape(h * k, d)),
    )
    sources[bj + "attn/out/bias"] = _Source(hf + "attn.c_proj.bias", (d,), _SAME)
    sources[bj + "mlp/wi/kernel"] = _Source(hf + "mlp.c_fc.weight", (d, f), _SAME)
    sources[bj + "mlp/wi/bias"] = _Source(hf + "mlp.c_fc.bias", (f,), _SAME)
    sources[bj + "mlp/wo/kernel"] = _Source(hf + "mlp.c_proj.weight", (f, d), _SAME)
    sources[bj + "mlp/wo/bias"] = _Source(hf + "mlp.c_proj.bias", (d,), _SAME)
  return sources


def _vit_tensors(cfg: transformer.ViTConfig, prefix: str) -> dict[str, _Source]:
  """ViTForImageClassification: patch convolution, class token and positions, pre-LN encoder layers,
  the final LayerNorm, and the classifier on the class token."""
  d, f, h, p, c = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.patch_size, cfg.input_shape[2]
  k, positions = d // h, cfg.grid[0] * cfg.grid[1] + 1
  embeddings = f"{prefix}embeddings."
  sources = {
      "params/patch_embed/kernel": _Source(
          embeddings + "patch_embeddings.projection.weight", (d, c, p, p), _CONV
      ),
      "params/patch_embed/bias": _Source(
          embeddings + "patch_embeddings.projection.bias", (d,), _SAME
      ),
      "params/cls_token": _Source(embeddings + "cls_token", (1, 1, d), _SAME),
      "params/position_embed": _Source(
          embeddings + "position_embeddings",
          (1, positions, d),
          _Layout(lambda w: w[0], lambda x: x[None]),
      ),
      "params/ln_final/scale": _Source(f"{prefix}layernorm.weight", (d,), _SAME),
      "params/ln_final/bias": _Source(f"{prefix}layernorm.bias", (d,), _SAME),
      "params/head/kernel": _Source("classifier.weight", (cfg.num_classes, d), _TRANSPOSE),
      "params/head/bias": _Source("classifier.bias", (cfg.num_classes,), _SAME),
  }
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}encoder.layer.{i}.", f"params/block_{i}/"
    for hf_norm, bj_norm in (("layernorm_before", "ln_attn"), ("layernorm_after", "ln_mlp")):
      sources[bj + f"{bj_norm}/scale"] = _Source(hf + f"{hf_norm}.weight", (d,), _SAME)
      sources[bj + f"{bj_norm}/bias"] = _Source(hf + f"{hf_norm}.bias", (d,), _SAME)
    for name in ("query", "key", "value"):
      sources[bj + f"attn/{name}/kernel"] = _Source(
          hf + f"attention.attention.{name}.weight", (d, d), _out_heads(h, k)
      )
      sources[bj + f"attn/{name}/bias"] = _Source(
          hf + f"attention.attention.{name}.bias", (d,), _out_heads(h, k)
      )
    sources[bj + "attn/out/kernel"] = _Source(
        hf + "attention.output.dense.weight", (d, d), _in_heads(h, k)
    )
    sources[bj + "attn/out/bias"] = _Source(hf + "attention.output.dense.bias", (d,), _SAME)
    sources[bj + "mlp/wi/kernel"] = _Source(hf + "intermediate.dense.weight", (f, d), _TRANSPOSE)
    sources[bj + "mlp/wi/bias"] = _Source(hf + "intermediate.dense.bias", (f,), _SAME)
    sources[bj + "mlp/wo/kernel"] = _Source(hf + "output.dense.weight", (d, f), _TRANSPOSE)
    sources[bj + "mlp/wo/bias"] = _Source(hf + "output.dense.bias", (d,), _SAME)
  return sources


def _conv_and_norm(
    sources: dict,
    bj_conv: str,
    bj_norm: str,
    hf_conv: str,
    hf_norm: str,
    shape: tuple[int, int, int, int],
) -> None:
  """A bias-free Conv2d [out, in, kh, kw] and the BatchNorm after it: scale and bias are parameters,
  the running mean and variance batch statistics."""
  sources[f"params/{bj_conv}/kernel"] = _Source(f"{hf_conv}.weight", shape, _CONV)
  for hf_name, bj_name in (
      ("weight", "params/{}/scale"),
      ("bias", "params/{}/bias"),
      ("running_mean", "batch_stats/{}/mean"),
      ("running_var", "batch_stats/{}/var"),
  ):
    sources[bj_name.format(bj_norm)] = _Source(f"{hf_norm}.{hf_name}", shape[:1], _SAME)


def _resnet_tensors(cfg: conv.ResNetConfig, prefix: str) -> dict[str, _Source]:
  """ResNetForImageClassification: the 7x7 stem, stages of basic or bottleneck layers (each conv
  with its BatchNorm, a projection shortcut where the shape changes), and classifier.1 on the pooled
  features."""
  sources = {}
  stem = f"{prefix}embedder.embedder."
  _conv_and_norm(
      sources,
      "stem_conv",
      "stem_bn",
      stem + "convolution",
      stem + "normalization",
      (cfg.width, cfg.input_shape[2], 7, 7),
  )
  channels = cfg.width
  for stage, (num_blocks, out) in enumerate(
      zip(cfg.stage_sizes, _resnet_widths(cfg.width, len(cfg.stage_sizes), cfg.block))
  ):
    features = cfg.width * 2**stage
    for i in range(num_blocks):
      hf, bj = f"{prefix}encoder.stages.{stage}.layers.{i}.", f"stage{stage}_block{i}/"
      if cfg.block == "bottleneck":
        convs = ((features, channels, 1), (features, features, 3), (out, features, 1))
      else:
        convs = ((features, channels, 3), (features, features, 3))
      for j, (c_out, c_in, kernel) in enumerate(convs):
        _conv_and_norm(
            sources,
            bj + f"conv{j + 1}",
            bj + f"bn{j + 1}",
            hf + f"layer.{j}.convolution",
            hf + f"layer.{j}.normalization",
            (c_out, c_in, kernel, kernel),
        )
      if (
          stage > 0 and i == 0
      ) or channels != out:  # as bigjax's ResidualBlock and transformers decide
        _conv_and_norm(
            sources,
            bj + "downsample",
            bj + "downsample_bn",
            hf + "shortcut.convolution",
            hf + "shortcut.normalization",
            (out, channels, 1, 1),
        )
      channels = out
  sources["params/fc/kernel"] = _Source(
      "classifier.1.weight", (cfg.num_classes, channels), _TRANSPOSE
  )
  sources["params/fc/bias"] = _Source("classifier.1.bias", (cfg.num_classes,), _SAME)
  return sources


class _Family(NamedTuple):
  """One Hugging Face model type: its config.json fields, the bigjax config and module it becomes,
  and its tensors (under `prefix` in the task model's checkpoint; `probe`, without the prefix, tells
  a task model's checkpoint from a bare one's)."""

  fields: Callable[[_Fields, str], dict]
  config_class: type
  module_class: type
  tensors: Callable[..., dict[str, _Source]]
  prefix: str
  probe: str


_LLAMA_FAMILY = _Family(
    _llama_family_fields,
    transformer.TransformerConfig,
    transformer.TransformerLM,
    _llama_family_tensors,
    "model.",
    "embed_tokens.weight",
)
_FAMILIES = {
    "gpt2": _Family(
        lambda f, _: _gpt2_fields(f),
        transformer.TransformerConfig,
        transformer.TransformerLM,
        _gpt2_tensors,
        "transformer.",
        "wte.weight",
    ),
    **{model_type: _LLAMA_FAMILY for model_type in ("llama", "mistral", "qwen2", "qwen3")},
    "vit": _Family(
        lambda f, _: _vit_fields(f),
        transformer.ViTConfig,
        transformer.ViT,
        _vit_tensors,
        "vit.",
        "embeddings.cls_token",
    ),
    "resnet": _Family(
        lambda f, _: _resnet_fields(f),
        conv.ResNetConfig,
        conv.ResNet,
        _resnet_tensors,
        "resnet.",
        "embedder.embedder.convolution.weight",
    ),
}


def _tensor_map(model_type: str, cfg, names: set[str] | None = None) -> dict[str, _Source]:
  """bigjax variable path (layers unrolled) -> its source. Checkpoints of the bare model (LlamaModel,
  GPT2Model, ViTModel) lack the task model's prefix ("model.", "transformer.", "vit."); without
  `names` (the exporter), the task model's (LlamaForCausalLM, ViTForImageClassification) names."""
  family = _FAMILIES[model_type]
  bare = names is not None and family.prefix + family.probe not in names
  return family.tensors(cfg, "" if bare else family.prefix)


def _num_layers(cfg) -> int:
  """How many layers scan_layers stacks under "blocks/" (ResNet has none)."""
  return getattr(cfg, "num_layers", 0)


def _scanned(name: str) -> tuple[str, str] | None:
  """("params/", "attn/query/kernel") for a stacked "params/blocks/attn/query/kernel", else None."""
  collection, _, rest = name.partition("/")
  return (f"{collection}/", rest[len("blocks/") :]) if rest.startswith("blocks/") else None


# ----------------------------------------------------------------------------------------------
# Reading safetensors


class _Checkpoint(contextlib.AbstractContextManager):
  """The tensors of a directory's safetensors file or shards, each file opened (header only) on
  first use; `read(name)` loads one tensor into host memory."""

  def __init__(self, directory: str):
    self.directory = directory
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, object] = {}
    index_path, single_path = os.path.join(directory, WEIGHTS_INDEX), os.path.join(
        directory, WEIGHTS
    )
    if os.path.isfile(index_path):
      self._files = self._read_index(index_path)
    elif os.path.isfile(single_path):
      self._files = {name: WEIGHTS for name in self._open(WEIGHTS).keys()}
    else:
      raise UserError(
          f"{directory} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; bigjax reads safetensors "
          f"weights only"
      )
    self.names = set(self._files)

  def _read_index(self, index_path: str) -> dict[str, str]:
    try:
      with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise UserError(
          f"{index_path} is not a safetensors index (a JSON object with a weight_map): " f"{e}"
      ) from None
    for file in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(self.directory, file)):
        raise UserError(f"{index_path} names {file}, which is missing from {self.directory}")
    return weight_map

  def _open(self, file: str):
    if file not in self._handles:
      path = os.path.join(self.directory, file)
      try:
        self._handles[file] = self._stack.enter_context(
            safetensors.safe_open(path, framework="numpy")
        )
      except (
          Exception
      ) as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise UserError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated: "
            f"copy or download it again"
        ) from None
    return self._handles[file]

  def _handle(self, name: str):
    handle = self._open(self._files[name])
    if name not in handle.keys():
      raise UserError(
          f"{os.path.join(self.directory, WEIGHTS_INDEX)} places tensor {name!r} in "
          f"{self._files[name]}, which does not hold it"
      )
    return handle

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    # numpy has no bfloat16; safetensors reads BF16 as ml_dtypes.bfloat16, which jax takes as is.
    try:
      return self._handle(name).get_tensor(name)
    except Exception as e:  # a file cut short after a valid header, a read error
      raise UserError(
          f"cannot read tensor {name!r} from {os.path.join(self.directory, self._files[name])} "
          f"({e}); the file may be damaged"
      ) from None

  def __exit__(self, *exc):
    self._stack.close()


def _check_tensors(ckpt: _Checkpoint, sources: dict[str, _Source], tied: bool, where: str) -> None:
  """Every tensor the architecture needs is there with its shape, and nothing else is: a tensor
  without a bigjax place (a bias config.json does not announce, say) would be silently dropped."""
  for path, source in sources.items():
    if source.name not in ckpt.names:
      raise UserError(
          f"{ckpt.directory}: tensor {source.name!r} is missing ({where} needs it for "
          f"bigjax variable {path})"
      )
    if ckpt.shape(source.name) != source.shape:
      raise UserError(
          f"{ckpt.directory}: tensor {source.name!r} has shape {ckpt.shape(source.name)}, but "
          f"{where} needs {source.shape}"
      )
  needed = {source.name for source in sources.values()}
  for name in sorted(ckpt.names - needed):
    if name.endswith(_BUFFER_SUFFIXES) or (tied and name == "lm_head.weight"):
      continue  # buffers, and a tied head saved anyway: the embedding is the head
    raise UserError(
        f"{ckpt.directory}: tensor {name!r} has no place in the bigjax model {where} describes; "
        f"refusing to drop it"
    )


def _read_variable(
    ckpt: _Checkpoint, sources: dict[str, _Source], path: str, num_layers: int
) -> np.ndarray:
  """One bigjax variable; under scan_layers ("params/blocks/...") every layer's tensor, stacked."""

  def one(unrolled_path):
    source = sources[unrolled_path]
    return source.layout.to_bigjax(ckpt.read(source.name))

  scanned = _scanned(path)
  if scanned:
    collection, rest = scanned
    return np.stack([one(f"{collection}block_{i}/{rest}") for i in range(num_layers)])
  return one(path)


def _read(directory: str, overrides: dict):
  """(absolute directory, config.json as a dict, where it is, the bigjax config)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  hf_config = read_config(directory)
  where = os.path.join(directory, CONFIG)
  return directory, hf_config, where, config_from_hf(hf_config, where, **overrides)


def check(directory: str, **overrides):
  """The bigjax config of a Hugging Face directory, once its tensors' names and shapes (the
  safetensors headers, no values) are those the config calls for: what `load` would refuse is
  refused here, before a run touches its workdir."""
  directory, hf_config, where, cfg = _read(directory, overrides)
  with _Checkpoint(directory) as ckpt:
    _check_tensors(ckpt, _tensor_map(hf_config["model_type"], cfg, ckpt.names), _tied(cfg), where)
  return cfg


def _tied(cfg) -> bool:
  return getattr(cfg, "tie_embeddings", False)


def load(directory: str, *, mesh: jax.sharding.Mesh | None = None, **overrides):
  """(module, variables) from a Hugging Face model directory: a TransformerLM, ViT or ResNet, and
  {"params": ...} (with "batch_stats" for a ResNet), ready for `module.apply(variables, inputs)` and
  bigjax.sample. With `mesh`, each variable lands in the sharding its logical axes give on that mesh
  (bigjax.sharding.LOGICAL_RULES); without, on the default device. `overrides` replace config fields
  (dtype, param_dtype, scan_layers, ...)."""
  directory, hf_config, where, cfg = _read(directory, overrides)
  model = module_for(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), _example_input(cfg)))
  shardings = None
  if mesh is not None:
    shardings = sharding.logical_shardings(abstract, mesh)
    sharding.check_divisible(abstract, shardings)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_box)
  placements = (
      jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
  )
  with _Checkpoint(directory) as ckpt:
    sources = _tensor_map(hf_config["model_type"], cfg, ckpt.names)
    _check_tensors(ckpt, sources, _tied(cfg), where)
    variables = []
    for (path, leaf), placement in zip(leaves, placements, strict=True):
      leaf = leaf.value if is_box(leaf) else leaf
      host = np.asarray(
          _read_variable(ckpt, sources, sharding.path_name(path), _num_layers(cfg)), leaf.dtype
      )
      variables.append(_place(host, placement))
      del host  # one variable on the host at a time
  return model, jax.tree_util.tree_unflatten(treedef, variables)


def _place(host: np.ndarray, placement: jax.sharding.Sharding | None) -> jax.Array:
  if placement is None:
    return jax.device_put(host)
  # Each device (of every process) receives only its own slice of the host array.
  return jax.make_array_from_callback(host.shape, placement, lambda index: host[index])


# ----------------------------------------------------------------------------------------------
# A bigjax model -> a Hugging Face directory

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "vit": "ViTForImageClassification",
    "resnet": "ResNetForImageClassification",
}
# bigjax activation -> a name _ACTIVATIONS reads back as it (GPT-2's own name for the tanh gelu).
_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_COUNTER_DTYPE = ("int64", "I64")  # BatchNorm's num_batches_tracked
# Fields that decide how a model runs, stores or initialises its weights, not what it computes.
_RUN_FIELDS = (
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "dropout_rate",
    "conv_impl",
    "zero_init_residual",
)
_LLAMA3_FIELDS = (
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
)


def _model_type(cfg) -> str:
  """The family cfg describes; whether every other field maps is checked afterwards."""
  if isinstance(cfg, transformer.ViTConfig):
    return "vit"
  if isinstance(cfg, conv.ResNetConfig):
    return "resnet"
  if cfg.block != "pre_norm":
    raise UserError(
        f"block={cfg.block!r} is a registered block type with no Hugging Face counterpart; "
        f"Hugging Face export covers the pre_norm block"
    )
  parts = (cfg.position, cfg.norm, cfg.mlp)
  if parts == ("learned", "layernorm", "dense"):
    return "gpt2"
  if parts != ("rotary", "rmsnorm", "gated"):
    raise UserError(
        f"position={cfg.position!r} with norm={cfg.norm!r} and mlp={cfg.mlp!r} has no Hugging "
        f"Face counterpart (gpt2 is learned/layernorm/dense; llama, qwen2, qwen3 "
        f"rotary/rmsnorm/gated)"
    )
  if cfg.qk_norm:
    return "qwen3"
  # Qwen2 is Llama with q/k/v biases only; Llama's attention_bias switches q/k/v and output together.
  if cfg.bias("qkv") and not cfg.bias("attn_out") and not cfg.bias("mlp"):
    return "qwen2"
  return "llama"  # Mistral's config (without a sliding window) says the same; Llama's is the common one


def _gpt2_config(cfg: transformer.TransformerConfig) -> dict:
  # GPT-2 drops where bigjax does: embeddings, attention weights, residual branches
  rate = cfg.dropout_rate
  return {
      "vocab_size": cfg.vocab_size,
      "n_layer": cfg.num_layers,
      "n_embd": cfg.embed_dim,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "n_positions": cfg.max_len,
      "activation_function": _HF_ACTIVATIONS[cfg.activation],
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "embd_pdrop": rate,
      "attn_pdrop": rate,
      "resid_pdrop": rate,
  }


def _rope_parameters(cfg: transformer.TransformerConfig) -> dict:
  rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
  if cfg.rope_scaling == "llama3":
    rope.update(
        rope_type="llama3",
        factor=cfg.rope_scaling_factor,
        low_freq_factor=cfg.rope_low_freq_factor,
        high_freq_factor=cfg.rope_high_freq_factor,
        original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return rope


def _llama_family_config(cfg: transformer.TransformerConfig, model_type: str) -> dict:
  fields = {
      "vocab_size": cfg.vocab_size,
      "num_hidden_layers": cfg.num_layers,
      "hidden_size": cfg.embed_dim,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
      "head_dim": cfg.resolved_head_dim,
      "intermediate_size": cfg.mlp_dim,
      "max_position_embeddings": cfg.max_len,
      "hidden_act": _HF_ACTIVATIONS[cfg.activation],
      "rms_norm_eps": cfg.layer_norm_epsilon,
      "rope_parameters": _rope_parameters(cfg),
      # Only attention weights have dropout there; bigjax's residual dropout has no counterpart.
      "attention_dropout": 0.0,
  }
  if model_type in ("llama", "qwen3"):
    fields["attention_bias"] = cfg.bias("qkv")
  if model_type == "llama":
    fields["mlp_bias"] = cfg.bias("mlp")
  if model_type in ("qwen2", "qwen3"):
    fields.update(use_sliding_window=False, sliding_window=None)
  return fields


def _labels(num_classes: int) -> dict:
  """Class names as transformers writes them when it knows none (bigjax keeps no names)."""
  return {
      "id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
      "label2id": {f"LABEL_{i}": i for i in range(num_classes)},
  }


def _vit_config(cfg: transformer.ViTConfig) -> dict:
  if (cfg.pool, cfg.position) != ("cls", "learned"):
    raise UserError(
        f"pool={cfg.pool!r} with position={cfg.position!r} has no Hugging Face counterpart (its ViT "
        f"classifies the class token, with learned positions)"
    )
  height, width, channels = cfg.input_shape
  return {
      "hidden_size": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.mlp_dim,
      "hidden_act": _HF_ACTIVATIONS[cfg.activation],
      "layer_norm_eps": cfg.layer_norm_epsilon,
      "image_size": height if height == width else [height, width],
      "patch_size": cfg.patch_size,
      "num_channels": channels,
      "qkv_bias": True,
      # bigjax drops where ViT's hidden dropout does (embeddings, residual branches) and on attention weights.
      "hidden_dropout_prob": cfg.dropout_rate,
      "attention_probs_dropout_prob": cfg.dropout_rate,
      **_labels(cfg.num_classes),
  }


def _resnet_config(cfg: conv.ResNetConfig) -> dict:
  if cfg.stem != "imagenet":
    raise UserError(
        f"stem={cfg.stem!r} has no Hugging Face counterpart (its ResNet has the 7x7/2 convolution "
        f"and 3x3/2 max pool stem, stem='imagenet')"
    )
  return {
      "num_channels": cfg.input_shape[2],
      "embedding_size": cfg.width,
      "hidden_sizes": _resnet_widths(cfg.width, len(cfg.stage_sizes), cfg.block),
      "depths": list(cfg.stage_sizes),
      "layer_type": cfg.block,
      "hidden_act": "relu",
      "downsample_in_first_stage": False,
      "downsample_in_bottleneck": False,
      **_labels(cfg.num_classes),
  }


def _run_fields(cfg) -> dict:
  """cfg's fields that config.json does not hold: how it runs, and a ResNet's image size (any fits)."""
  fields = {name: getattr(cfg, name) for name in _RUN_FIELDS if hasattr(cfg, name)}
  if isinstance(cfg, conv.ResNetConfig):
    fields["input_shape"] = cfg.input_shape
  return fields


def _architecture(cfg) -> dict:
  """The fields that decide what cfg computes, each at its effective value (defaults resolved, unused
  fields dropped, sequences as tuples), so two configs of one model compare equal."""
  fields = {
      name: tuple(value) if isinstance(value, list) else value
      for name, value in dataclasses.asdict(cfg).items()
      if name not in _RUN_FIELDS
  }
  if not isinstance(cfg, transformer.TransformerConfig):
    return fields
  fields.update(
      num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
      head_dim=cfg.resolved_head_dim,
      **{f"{part}_bias": cfg.bias(part) for part in ("qkv", "attn_out", "mlp")},
  )
  if cfg.norm != "layernorm":
    del fields["use_bias"]  # then only LayerNorm's bias reads it beyond the three switches above
  if cfg.position != "rotary":
    del fields["rotary_base"]
  if cfg.rope_scaling == "none":
    for name in _LLAMA3_FIELDS:
      del fields[name]
  return fields


def _family_config(cfg, model_type: str) -> dict:
  if model_type == "vit":
    return _vit_config(cfg)
  if model_type == "resnet":
    return _resnet_config(cfg)
  fields = _gpt2_config(cfg) if model_type == "gpt2" else _llama_family_config(cfg, model_type)
  # Token ids belong to the tokenizer, which bigjax keeps apart; transformers' defaults (Llama's 1
  # and 2) would stop generate() at arbitrary tokens.
  return {
      **fields,
      "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": None,
      "eos_token_id": None,
      "pad_token_id": None,
  }


def config_to_hf(cfg) -> dict:
  """The config.json (as a dict) of the Hugging Face model that computes what module_for(cfg) does:
  the inverse of config_from_hf, checked by reading it back. A field it cannot express is a
  one-line error naming the field."""
  model_type = _model_type(cfg)
  if cfg.param_dtype not in _SAFETENSORS_DTYPES:
    raise UserError(
        f"param_dtype={cfg.param_dtype!r} has no Hugging Face export; use one of "
        f"{', '.join(_SAFETENSORS_DTYPES)}"
    )
  hf_config = {
      "model_type": model_type,
      "architectures": [ARCHITECTURES[model_type]],
      **_family_config(cfg, model_type),
      "dtype": cfg.param_dtype,
  }
  back = config_from_hf(hf_config, f"Hugging Face {model_type} config", **_run_fields(cfg))
  want, got = _architecture(cfg), _architecture(back)
  differ = [name for name in want if want[name] != got.get(name)]
  if differ:
    raise UserError(
        f"{', '.join(f'{n}={want[n]!r}' for n in differ)} has no counterpart in a Hugging Face "
        f"{model_type} config.json (it would load as "
        f"{', '.join(f'{n}={got.get(n)!r}' for n in differ)})"
    )
  return hf_config


def check_exportable(module) -> dict:
  """config_to_hf of a TransformerLM, ViT or ResNet; any other module is a one-line error (before any
  weights move)."""
  exportable = (transformer.TransformerLM, transformer.ViT, conv.ResNet)
  if not isinstance(module, exportable):
    raise UserError(
        f"{type(module).__name__} has no Hugging Face export; it covers "
        f"{', '.join(c.__name__ for c in exportable)} models of the {', '.join(ARCHITECTURES)} "
        f"families"
    )
  return config_to_hf(module.config)


def _gather(leaf) -> np.ndarray:
  """One parameter, whole, on this host; across processes every one takes part."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = multihost_utils.process_allgather(leaf, tiled=True)
  return np.asarray(jax.device_get(leaf))


def _unrolled(name: str, num_layers: int) -> list[str]:
  """A variable's path per layer: "params/blocks/x" (scan_layers) -> "params/block_0/x", ..."""
  scanned = _scanned(name)
  if scanned is None:
    return [name]
  collection, rest = scanned
  return [f"{collection}block_{i}/{rest}" for i in range(num_layers)]


def _host_variables(variables, num_layers: int):
  """(path, host array) per variable, layers unrolled; gathers one variable at a time (under
  scan_layers, one variable of every layer)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    name, host = sharding.path_name(path), _gather(leaf)
    names = _unrolled(name, num_layers)
    yield from zip(names, host) if _scanned(name) else [(name, host)]
    del host


def _unrolled_names(variables, num_layers: int) -> set[str]:
  return {
      unrolled
      for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
      for unrolled in _unrolled(sharding.path_name(path), num_layers)
  }


def _counters(sources: dict[str, _Source]) -> dict[str, np.ndarray]:
  """A zero num_batches_tracked beside every BatchNorm's running mean: transformers keeps the counter
  as a buffer and reports it missing otherwise (its value only matters for momentum=None)."""
  suffix = ".running_mean"
  return {
      source.name[: -len(suffix)] + ".num_batches_tracked": np.zeros((), np.int64)
      for source in sources.values()
      if source.name.endswith(suffix)
  }


def _safetensors_header(
    entries: dict[str, tuple[tuple[int, ...], str]],
) -> tuple[bytes, dict[str, int]]:
  """The file's header (length-prefixed JSON, padded so the data starts 8-byte aligned) for tensors
  name -> (shape, numpy dtype name), and each tensor's offset from the data's start."""
  header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
  for name in sorted(entries):
    shape, dtype = entries[name]
    size = math.prod(shape) * jnp.dtype(dtype).itemsize
    code = _COUNTER_DTYPE[1] if dtype == _COUNTER_DTYPE[0] else _SAFETENSORS_DTYPES[dtype]
    header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offsets[name], offset = offset, offset + size
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-(8 + len(text)) % 8)
  return struct.pack("<Q", len(text)) + text, offsets


def _write_safetensors(
    path: str | None, sources: dict[str, _Source], variables, dtype: str
) -> None:
  """model.safetensors from (path, host array) pairs, in `dtype`, and BatchNorm's counters. The
  header follows from the table alone, so each tensor goes to its offset as soon as its variables
  arrive and the host holds one at a time (safetensors.numpy.save_file wants them all in memory,
  and copies each to bytes besides). Processes other than 0 (path None) only take part in the
  gathering."""
  pieces = {}  # tensor name -> its bigjax variables, in table order
  for variable_path, source in sources.items():
    pieces.setdefault(source.name, []).append(variable_path)
  counters = _counters(sources)
  tensors = _hf_tensors(sources, pieces, variables)
  if path is None:
    for _ in tensors:
      pass
    return
  entries = {source.name: (source.shape, dtype) for source in sources.values()}
  entries.update({name: (value.shape, _COUNTER_DTYPE[0]) for name, value in counters.items()})
  header, offsets = _safetensors_header(entries)
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(header)
      for name, tensor in (*tensors, *counters.items()):
        f.seek(len(header) + offsets[name])
        # As raw bytes (a bfloat16 buffer is not exportable as one); JAX's platforms are little-endian.
        f.write(
            np.ascontiguousarray(tensor, jnp.dtype(entries[name][1]))
            .reshape(-1)
            .view(np.uint8)
            .data
        )
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise UserError(
          f"cannot write {path} ({e.strerror or e}); free space or fix the directory, "
          f"then rerun"
      ) from None
    raise


def _hf_tensors(sources: dict[str, _Source], pieces: dict[str, list[str]], variables):
  """(tensor name, array) as soon as every variable that makes the tensor has arrived."""
  pending: dict[str, dict[str, np.ndarray]] = {}
  for param_path, host in variables:
    source = sources[param_path]
    got = pending.setdefault(source.name, {})
    got[param_path] = source.layout.to_hf(host)
    if len(got) < len(pieces[source.name]):
      continue  # a fused tensor waits for its other pieces
    del pending[source.name]
    parts = [got[p] for p in pieces[source.name]]
    tensor = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if tensor.shape != source.shape:
      raise UserError(
          f"variable {param_path} has shape {host.shape}, which does not fit tensor "
          f"{source.name!r} {source.shape} of the module's config"
      )
    yield source.name, tensor


def save(directory: str, module, variables) -> str:
  """Writes a TransformerLM, ViT or ResNet and its variables ({"params": ...}, with "batch_stats"
  for a ResNet) as a Hugging Face model directory (config.json and model.safetensors in the
  parameters' dtype) that transformers' from_pretrained (and `load`) read as the same model.
  Variables may be sharded over a mesh and stacked by scan_layers; each is gathered to the host in
  turn and written out, so the host holds about one at a time (three for GPT-2's fused q/k/v), never
  the model. Returns the directory."""
  hf_config = check_exportable(module)
  cfg = module.config
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(os.path.join(directory, CONFIG)) or os.path.exists(
      os.path.join(directory, WEIGHTS)
  ):
    raise UserError(
        f"{directory} already holds a model ({CONFIG} or {WEIGHTS}); choose a new directory"
    )
  variables = nn.unbox(dict(variables))
  sources = _tensor_map(hf_config["model_type"], cfg)
  have, want = _unrolled_names(variables, _num_layers(cfg)), set(sources)
  if have != want:
    odd = sorted(want - have)[:1] + sorted(have - want)[:1]
    raise UserError(
        f"the variables do not fit the module's config (variable {odd[0]} is "
        f"{'missing' if odd[0] in want else 'unexpected'})"
    )
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  _write_safetensors(
      os.path.join(directory, WEIGHTS) if writer else None,
      sources,
      _host_variables(variables, _num_layers(cfg)),
      cfg.param_dtype,
  )
  if writer:  # last: a directory with config.json is a complete model
    workdir_lib.replace_file(
        os.path.join(directory, CONFIG), json.dumps(hf_config, indent=2) + "\n"
    )
  return directory
