"""Hugging Face model directories (config.json and safetensors) as bigjax TransformerLMs.

`load(directory)` maps config.json to a TransformerConfig and reads the weights one tensor at a time
with safetensors' lazy reader, reshaping each into bigjax's layout and, given a mesh, placing it
straight into its parameter's sharding: the model never exists whole on one device, and the host
holds one tensor at a time (one parameter of every layer, stacked, under scan_layers).

What cannot be mapped exactly is refused in one line (principle 8): another model_type, a rotary
scaling other than Llama 3's, a sliding window shorter than the context, a missing, misshapen or
unexpected tensor, a truncated file.

`save(directory, module, variables)` is the inverse for a TransformerLM whose config is one of those
families (gpt2, llama, qwen2, qwen3), through the same tensor tables: config.json, and
model.safetensors written one parameter at a time. A bigjax model that transformers cannot express
(another block, norm or position scheme, a bias pattern no family has) is refused in one line.

Shapes: D model width, H query heads, G key/value heads, K head dim, F MLP width, V vocabulary,
P positions. Hugging Face's Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
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
from bigjax import workdir as workdir_lib
from bigjax.errors import UserError
from bigjax.nn import transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")

# hidden_act / activation_function -> bigjax activation. GPT-2's "gelu_new" is the tanh form.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "gelu": "gelu_exact", "relu": "relu"}
_DTYPES = ("float32", "bfloat16", "float16")
# Buffers that older transformers versions saved beside the weights; nothing to load from them.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def is_hf_directory(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG))


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
    value = default if self.hf.get(key) is None else self.hf[key]  # null means the default there too
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
      self.fail(f"{key}={value!r} must be an integer >= 1" if value is not None else f"needs {key}")
    return value

  def number(self, key: str, default=None) -> float:
    value = default if self.hf.get(key) is None else self.hf[key]  # null means the default there too
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
      self.fail(f"{key}={value!r} must be a number" if value is not None else f"needs {key}")
    return float(value)

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
    f.fail("rope_parameters per layer type are not supported; bigjax has one rotary setting for all layers")
  rope = _Fields({**legacy, **params}, f"{f.where} rope parameters")
  kind = rope.hf.get("rope_type", rope.hf.get("type", "default"))
  partial = rope.number("partial_rotary_factor", f.number("partial_rotary_factor", 1.0))
  if partial != 1.0:
    f.fail(f"partial_rotary_factor={partial} is not supported; bigjax rotates the whole head")
  fields = {"rotary_base": rope.number("rope_theta", f.number("rope_theta", 10_000.0))}
  if kind == "default":
    return fields
  if kind != "llama3":
    f.fail(f"rope type {kind!r} is not supported; bigjax imports rotary positions of type default or llama3")
  return {**fields, "rope_scaling": "llama3", "rope_scaling_factor": rope.number("factor"),
          "rope_low_freq_factor": rope.number("low_freq_factor"),
          "rope_high_freq_factor": rope.number("high_freq_factor"),
          "rope_original_max_len": rope.int("original_max_position_embeddings",
                                            f.hf.get("max_position_embeddings"))}


def _refuse_sliding_window(f: _Fields, model_type: str, max_len: int) -> None:
  window = f.hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not f.hf.get("use_sliding_window", False):
    window = None  # Qwen configs carry a window that only use_sliding_window switches on
  if window is not None and window < max_len:
    f.fail(f"sliding_window={window} is smaller than max_position_embeddings={max_len}; bigjax attends to "
           f"the whole context, so it would compute a different model")


def _llama_family_fields(f: _Fields, model_type: str) -> dict:
  embed_dim, num_heads = f.int("hidden_size"), f.int("num_attention_heads")
  max_len = f.int("max_position_embeddings")
  _refuse_sliding_window(f, model_type, max_len)
  head_dim = f.hf.get("head_dim") or embed_dim // num_heads
  fields = dict(
      vocab_size=f.int("vocab_size"), num_layers=f.int("num_hidden_layers"), embed_dim=embed_dim,
      num_heads=num_heads, num_kv_heads=f.int("num_key_value_heads", num_heads),
      mlp_dim=f.int("intermediate_size"),
      max_len=max_len, position="rotary", norm="rmsnorm", mlp="gated", activation=f.activation("hidden_act"),
      use_bias=False, layer_norm_epsilon=f.number("rms_norm_eps"),
      tie_embeddings=f.flag("tie_word_embeddings", False), **_rotary_fields(f))
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
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if f.hf.get(key, supported) != supported:
      f.fail(f"{key}={f.hf[key]!r} is not supported (bigjax's GPT-2 has {key}={supported})")
  embed_dim = f.int("n_embd")
  return dict(
      vocab_size=f.int("vocab_size"), num_layers=f.int("n_layer"), embed_dim=embed_dim,
      num_heads=f.int("n_head"), mlp_dim=f.int("n_inner", 4 * embed_dim), max_len=f.int("n_positions"),
      position="learned", activation=f.activation("activation_function"), use_bias=True,
      layer_norm_epsilon=f.number("layer_norm_epsilon", 1e-5),
      tie_embeddings=f.flag("tie_word_embeddings", True))


def config_from_hf(hf_config: dict, where: str = CONFIG, **overrides) -> transformer.TransformerConfig:
  """The TransformerConfig of a Hugging Face config.json (as a dict), with `overrides` replacing
  fields (dtype, param_dtype, scan_layers, remat, ...). Compute and storage dtypes default to the
  checkpoint's own."""
  f = _Fields(hf_config, where)
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    f.fail(f"model_type {model_type!r} is not supported; bigjax imports {', '.join(MODEL_TYPES)}")
  fields = _gpt2_fields(f) if model_type == "gpt2" else _llama_family_fields(f, model_type)
  fields.update(dtype=f.dtype(), param_dtype=f.dtype())
  try:
    return transformer.TransformerConfig(**{**fields, **overrides})
  except TypeError as e:  # an override that names no field
    raise UserError(f"{where}: {e}") from None


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


def _out_heads(heads: int, head_dim: int) -> _Layout:
  """A Linear [heads * K, D] <-> bigjax's [D, heads, K] projection kernel; a bias [heads * K] <->
  [heads, K]."""
  return _Layout(
      lambda w: w.T.reshape(-1, heads, head_dim) if w.ndim == 2 else w.reshape(heads, head_dim),
      lambda x: x.reshape(x.shape[0], heads * head_dim).T if x.ndim == 3 else x.reshape(heads * head_dim))


def _in_heads(heads: int, head_dim: int) -> _Layout:
  """An output projection [D, H * K] (Linear) <-> bigjax's [H, K, D]."""
  return _Layout(lambda w: w.T.reshape(heads, head_dim, -1), lambda x: x.reshape(heads * head_dim, -1).T)


def _llama_family_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.resolved_head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
  sources = {"token_embed/embedding": _Source(f"{prefix}embed_tokens.weight", (v, d), _SAME),
             "ln_final/scale": _Source(f"{prefix}norm.weight", (d,), _SAME)}
  if not cfg.tie_embeddings:
    sources["head/kernel"] = _Source("lm_head.weight", (v, d), _TRANSPOSE)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}layers.{i}.", f"block_{i}/"
    sources[bj + "ln_attn/scale"] = _Source(hf + "input_layernorm.weight", (d,), _SAME)
    sources[bj + "ln_mlp/scale"] = _Source(hf + "post_attention_layernorm.weight", (d,), _SAME)
    for proj, name, heads in (("q", "query", h), ("k", "key", g), ("v", "value", g)):
      sources[bj + f"attn/{name}/kernel"] = _Source(
          hf + f"self_attn.{proj}_proj.weight", (heads * k, d), _out_heads(heads, k))
      if cfg.bias("qkv"):
        sources[bj + f"attn/{name}/bias"] = _Source(
            hf + f"self_attn.{proj}_proj.bias", (heads * k,), _out_heads(heads, k))
    sources[bj + "attn/out/kernel"] = _Source(hf + "self_attn.o_proj.weight", (d, h * k), _in_heads(h, k))
    if cfg.bias("attn_out"):
      sources[bj + "attn/out/bias"] = _Source(hf + "self_attn.o_proj.bias", (d,), _SAME)
    if cfg.qk_norm:
      sources[bj + "attn/query_norm/scale"] = _Source(hf + "self_attn.q_norm.weight", (k,), _SAME)
      sources[bj + "attn/key_norm/scale"] = _Source(hf + "self_attn.k_norm.weight", (k,), _SAME)
    for proj, name, shape in (("gate", "wi_gate", (f, d)), ("up", "wi_up", (f, d)), ("down", "wo", (d, f))):
      sources[bj + f"mlp/{name}/kernel"] = _Source(hf + f"mlp.{proj}_proj.weight", shape, _TRANSPOSE)
      if cfg.bias("mlp"):
        sources[bj + f"mlp/{name}/bias"] = _Source(hf + f"mlp.{proj}_proj.bias", shape[:1], _SAME)
  return sources


def _gpt2_fused_qkv(part: int, width: int, heads: int, head_dim: int) -> _Layout:
  """One of q, k, v in GPT-2's fused c_attn ([D, 3D] kernel or [3D] bias) <-> [D, heads, K] or [heads, K]."""
  def take(x):
    x = x[..., part * width:(part + 1) * width]
    return x.reshape(x.shape[:-1] + (heads, head_dim))
  return _Layout(take, lambda x: x.reshape(x.shape[:-2] + (width,)))


def _gpt2_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, h, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_heads, cfg.resolved_head_dim
  sources = {"token_embed/embedding": _Source(f"{prefix}wte.weight", (v, d), _SAME),
             "position_embed/embedding": _Source(f"{prefix}wpe.weight", (cfg.max_len, d), _SAME),
             "ln_final/scale": _Source(f"{prefix}ln_f.weight", (d,), _SAME),
             "ln_final/bias": _Source(f"{prefix}ln_f.bias", (d,), _SAME)}
  if not cfg.tie_embeddings:
    sources["head/kernel"] = _Source("lm_head.weight", (v, d), _TRANSPOSE)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}h.{i}.", f"block_{i}/"
    for hf_norm, bj_norm in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
      sources[bj + f"{bj_norm}/scale"] = _Source(hf + f"{hf_norm}.weight", (d,), _SAME)
      sources[bj + f"{bj_norm}/bias"] = _Source(hf + f"{hf_norm}.bias", (d,), _SAME)
    for part, name in enumerate(("query", "key", "value")):
      fused = _gpt2_fused_qkv(part, d, h, k)
      sources[bj + f"attn/{name}/kernel"] = _Source(hf + "attn.c_attn.weight", (d, 3 * d), fused)
      sources[bj + f"attn/{name}/bias"] = _Source(hf + "attn.c_attn.bias", (3 * d,), fused)
    # GPT-2's Conv1D stores [in, out] = [H * K, D], bigjax [H, K, D].
    sources[bj + "attn/out/kernel"] = _Source(hf + "attn.c_proj.weight", (d, d), _Layout(
        lambda w: w.reshape(h, k, d), lambda x: x.reshape(h * k, d)))
    sources[bj + "attn/out/bias"] = _Source(hf + "attn.c_proj.bias", (d,), _SAME)
    sources[bj + "mlp/wi/kernel"] = _Source(hf + "mlp.c_fc.weight", (d, f), _SAME)
    sources[bj + "mlp/wi/bias"] = _Source(hf + "mlp.c_fc.bias", (f,), _SAME)
    sources[bj + "mlp/wo/kernel"] = _Source(hf + "mlp.c_proj.weight", (f, d), _SAME)
    sources[bj + "mlp/wo/bias"] = _Source(hf + "mlp.c_proj.bias", (d,), _SAME)
  return sources


def _tensor_map(model_type: str, cfg: transformer.TransformerConfig,
                names: set[str] | None = None) -> dict[str, _Source]:
  """bigjax parameter path (layers unrolled) -> its source. Checkpoints of the bare model (LlamaModel,
  GPT2Model) lack the task model's "model." / "transformer." prefix; without `names` (the exporter),
  the task model's (GPT2LMHeadModel, LlamaForCausalLM) names."""
  if model_type == "gpt2":
    bare = names is not None and "transformer.wte.weight" not in names
    return _gpt2_tensors(cfg, "" if bare else "transformer.")
  bare = names is not None and "model.embed_tokens.weight" not in names
  return _llama_family_tensors(cfg, "" if bare else "model.")


# ----------------------------------------------------------------------------------------------
# Reading safetensors


class _Checkpoint(contextlib.AbstractContextManager):
  """The tensors of a directory's safetensors file or shards, each file opened (header only) on
  first use; `read(name)` loads one tensor into host memory."""

  def __init__(self, directory: str):
    self.directory = directory
    self._stack = contextlib.ExitStack()
    self._handles: dict[str, object] = {}
    index_path, single_path = os.path.join(directory, WEIGHTS_INDEX), os.path.join(directory, WEIGHTS)
    if os.path.isfile(index_path):
      self._files = self._read_index(index_path)
    elif os.path.isfile(single_path):
      self._files = {name: WEIGHTS for name in self._open(WEIGHTS).keys()}
    else:
      raise UserError(f"{directory} has neither {WEIGHTS} nor {WEIGHTS_INDEX}; bigjax reads safetensors "
                      f"weights only")
    self.names = set(self._files)

  def _read_index(self, index_path: str) -> dict[str, str]:
    try:
      with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise UserError(f"{index_path} is not a safetensors index (a JSON object with a weight_map): "
                      f"{e}") from None
    for file in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(self.directory, file)):
        raise UserError(f"{index_path} names {file}, which is missing from {self.directory}")
    return weight_map

  def _open(self, file: str):
    if file not in self._handles:
      path = os.path.join(self.directory, file)
      try:
        self._handles[file] = self._stack.enter_context(safetensors.safe_open(path, framework="numpy"))
      except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for damaged files
        raise UserError(f"{path} is not a readable safetensors file ({e}); it may be truncated: "
                        f"copy or download it again") from None
    return self._handles[file]

  def _handle(self, name: str):
    handle = self._open(self._files[name])
    if name not in handle.keys():
      raise UserError(f"{os.path.join(self.directory, WEIGHTS_INDEX)} places tensor {name!r} in "
                      f"{self._files[name]}, which does not hold it")
    return handle

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    # numpy has no bfloat16; safetensors reads BF16 as ml_dtypes.bfloat16, which jax takes as is.
    try:
      return self._handle(name).get_tensor(name)
    except Exception as e:  # a file cut short after a valid header, a read error
      raise UserError(f"cannot read tensor {name!r} from {os.path.join(self.directory, self._files[name])} "
                      f"({e}); the file may be damaged") from None

  def __exit__(self, *exc):
    self._stack.close()


def _check_tensors(ckpt: _Checkpoint, sources: dict[str, _Source], tied: bool, where: str) -> None:
  """Every tensor the architecture needs is there with its shape, and nothing else is: a tensor
  without a bigjax place (a bias config.json does not announce, say) would be silently dropped."""
  for path, source in sources.items():
    if source.name not in ckpt.names:
      raise UserError(f"{ckpt.directory}: tensor {source.name!r} is missing ({where} needs it for "
                      f"bigjax parameter {path})")
    if ckpt.shape(source.name) != source.shape:
      raise UserError(f"{ckpt.directory}: tensor {source.name!r} has shape {ckpt.shape(source.name)}, but "
                      f"{where} needs {source.shape}")
  needed = {source.name for source in sources.values()}
  for name in sorted(ckpt.names - needed):
    if name.endswith(_BUFFER_SUFFIXES) or (tied and name == "lm_head.weight"):
      continue  # buffers, and a tied head saved anyway: the embedding is the head
    raise UserError(f"{ckpt.directory}: tensor {name!r} has no place in the bigjax model {where} describes; "
                    f"refusing to drop it")


def _read_parameter(ckpt: _Checkpoint, sources: dict[str, _Source], path: str, num_layers: int) -> np.ndarray:
  """One bigjax parameter; under scan_layers ("blocks/...") every layer's tensor, stacked."""
  def one(unrolled_path):
    source = sources[unrolled_path]
    return source.layout.to_bigjax(ckpt.read(source.name))
  if path.startswith("blocks/"):
    rest = path[len("blocks/"):]
    return np.stack([one(f"block_{i}/{rest}") for i in range(num_layers)])
  return one(path)


def check(directory: str, **overrides) -> transformer.TransformerConfig:
  """The TransformerConfig of a Hugging Face directory, once its tensors' names and shapes (the
  safetensors headers, no values) are those the config calls for: what `load` would refuse is
  refused here, before a run touches its workdir."""
  directory = os.path.abspath(os.path.expanduser(directory))
  hf_config = read_config(directory)
  where = os.path.join(directory, CONFIG)
  cfg = config_from_hf(hf_config, where, **overrides)
  with _Checkpoint(directory) as ckpt:
    _check_tensors(ckpt, _tensor_map(hf_config["model_type"], cfg, ckpt.names), cfg.tie_embeddings, where)
  return cfg


def load(directory: str, *, mesh: jax.sharding.Mesh | None = None, **overrides):
  """(TransformerLM, {"params": ...}) from a Hugging Face model directory, ready for
  `module.apply(variables, tokens_BT)` and bigjax.sample. With `mesh`, each parameter lands in the
  sharding its logical axes give on that mesh (bigjax.sharding.LOGICAL_RULES); without, on the
  default device. `overrides` replace TransformerConfig fields (dtype, param_dtype, scan_layers, ...)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  hf_config = read_config(directory)
  where = os.path.join(directory, CONFIG)
  cfg = config_from_hf(hf_config, where, **overrides)
  model = transformer.TransformerLM(cfg)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
  shardings = None
  if mesh is not None:
    shardings = sharding.logical_shardings(abstract, mesh)
    sharding.check_divisible(abstract, shardings)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_box)
  placements = jax.tree_util.tree_leaves(shardings) if shardings is not None else [None] * len(leaves)
  with _Checkpoint(directory) as ckpt:
    sources = _tensor_map(hf_config["model_type"], cfg, ckpt.names)
    _check_tensors(ckpt, sources, cfg.tie_embeddings, where)
    params = []
    for (path, leaf), placement in zip(leaves, placements, strict=True):
      leaf = leaf.value if is_box(leaf) else leaf
      host = np.asarray(_read_parameter(ckpt, sources, sharding.path_name(path), cfg.num_layers), leaf.dtype)
      params.append(_place(host, placement))
      del host  # one parameter on the host at a time
  return model, {"params": jax.tree_util.tree_unflatten(treedef, params)}


def _place(host: np.ndarray, placement: jax.sharding.Sharding | None) -> jax.Array:
  if placement is None:
    return jax.device_put(host)
  # Each device (of every process) receives only its own slice of the host array.
  return jax.make_array_from_callback(host.shape, placement, lambda index: host[index])


# ----------------------------------------------------------------------------------------------
# TransformerLM -> a Hugging Face directory

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# bigjax activation -> a name _ACTIVATIONS reads back as it (GPT-2's own name for the tanh gelu).
_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Fields that decide how a model runs or stores its weights, not what it computes.
_RUN_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "dropout_rate")
_LLAMA3_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_len")


def _model_type(cfg: transformer.TransformerConfig) -> str:
  """The family whose block cfg describes; whether every other field maps is checked afterwards."""
  if cfg.block != "pre_norm":
    raise UserError(f"block={cfg.block!r} is a registered block type with no Hugging Face counterpart; "
                    f"Hugging Face export covers the pre_norm block")
  parts = (cfg.position, cfg.norm, cfg.mlp)
  if parts == ("learned", "layernorm", "dense"):
    return "gpt2"
  if parts != ("rotary", "rmsnorm", "gated"):
    raise UserError(f"position={cfg.position!r} with norm={cfg.norm!r} and mlp={cfg.mlp!r} has no Hugging "
                    f"Face counterpart (gpt2 is learned/layernorm/dense; llama, qwen2, qwen3 "
                    f"rotary/rmsnorm/gated)")
  if cfg.qk_norm:
    return "qwen3"
  # Qwen2 is Llama with q/k/v biases only; Llama's attention_bias switches q/k/v and output together.
  if cfg.bias("qkv") and not cfg.bias("attn_out") and not cfg.bias("mlp"):
    return "qwen2"
  return "llama"  # Mistral's config (without a sliding window) says the same; Llama's is the common one


def _gpt2_config(cfg: transformer.TransformerConfig) -> dict:
  rate = cfg.dropout_rate  # GPT-2 drops where bigjax does: embeddings, attention weights, residual branches
  return {"vocab_size": cfg.vocab_size, "n_layer": cfg.num_layers, "n_embd": cfg.embed_dim,
          "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len,
          "activation_function": _HF_ACTIVATIONS[cfg.activation],
          "layer_norm_epsilon": cfg.layer_norm_epsilon,
          "embd_pdrop": rate, "attn_pdrop": rate, "resid_pdrop": rate}


def _rope_parameters(cfg: transformer.TransformerConfig) -> dict:
  rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
  if cfg.rope_scaling == "llama3":
    rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len)
  return rope


def _llama_family_config(cfg: transformer.TransformerConfig, model_type: str) -> dict:
  fields = {"vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_layers, "hidden_size": cfg.embed_dim,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads or cfg.num_heads,
            "head_dim": cfg.resolved_head_dim, "intermediate_size": cfg.mlp_dim,
            "max_position_embeddings": cfg.max_len, "hidden_act": _HF_ACTIVATIONS[cfg.activation],
            "rms_norm_eps": cfg.layer_norm_epsilon, "rope_parameters": _rope_parameters(cfg),
            # Only attention weights have dropout there; bigjax's residual dropout has no counterpart.
            "attention_dropout": 0.0}
  if model_type in ("llama", "qwen3"):
    fields["attention_bias"] = cfg.bias("qkv")
  if model_type == "llama":
    fields["mlp_bias"] = cfg.bias("mlp")
  if model_type in ("qwen2", "qwen3"):
    fields.update(use_sliding_window=False, sliding_window=None)
  return fields


def _architecture(cfg: transformer.TransformerConfig) -> dict:
  """The fields that decide what cfg computes, each at its effective value (defaults resolved, unused
  fields dropped), so two configs of one model compare equal."""
  fields = dataclasses.asdict(cfg)
  for name in _RUN_FIELDS:
    del fields[name]
  fields.update(num_kv_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=cfg.resolved_head_dim,
                **{f"{part}_bias": cfg.bias(part) for part in ("qkv", "attn_out", "mlp")})
  if cfg.norm != "layernorm":
    del fields["use_bias"]  # then only LayerNorm's bias reads it beyond the three switches above
  if cfg.position != "rotary":
    del fields["rotary_base"]
  if cfg.rope_scaling == "none":
    for name in _LLAMA3_FIELDS:
      del fields[name]
  return fields


def config_to_hf(cfg: transformer.TransformerConfig) -> dict:
  """The config.json (as a dict) of the Hugging Face model that computes what TransformerLM(cfg)
  does: the inverse of config_from_hf, checked by reading it back. A field it cannot express is a
  one-line error naming the field."""
  model_type = _model_type(cfg)
  if cfg.param_dtype not in _SAFETENSORS_DTYPES:
    raise UserError(f"param_dtype={cfg.param_dtype!r} has no Hugging Face export; use one of "
                    f"{', '.join(_SAFETENSORS_DTYPES)}")
  fields = _gpt2_config(cfg) if model_type == "gpt2" else _llama_family_config(cfg, model_type)
  # Token ids belong to the tokenizer, which bigjax keeps apart; transformers' defaults (Llama's 1
  # and 2) would stop generate() at arbitrary tokens.
  hf_config = {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]], **fields,
               "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
               "pad_token_id": None, "dtype": cfg.param_dtype}
  back = config_from_hf(hf_config, f"Hugging Face {model_type} config",
                        **{name: getattr(cfg, name) for name in _RUN_FIELDS})
  want, got = _architecture(cfg), _architecture(back)
  differ = [name for name in want if want[name] != got.get(name)]
  if differ:
    raise UserError(f"{', '.join(f'{n}={want[n]!r}' for n in differ)} has no counterpart in a Hugging Face "
                    f"{model_type} config.json (it would load as "
                    f"{', '.join(f'{n}={got.get(n)!r}' for n in differ)})")
  return hf_config


def check_exportable(module) -> dict:
  """config_to_hf of a TransformerLM; any other module is a one-line error (before any weights move)."""
  if not isinstance(module, transformer.TransformerLM):
    raise UserError(f"{type(module).__name__} has no Hugging Face export; it covers TransformerLM models of "
                    f"the {', '.join(ARCHITECTURES)} families")
  return config_to_hf(module.config)


def _gather(leaf) -> np.ndarray:
  """One parameter, whole, on this host; across processes every one takes part."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = multihost_utils.process_allgather(leaf, tiled=True)
  return np.asarray(jax.device_get(leaf))


def _host_parameters(params, num_layers: int):
  """(path, host array) per parameter, layers unrolled; gathers one parameter at a time (under
  scan_layers, one parameter of every layer)."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, host = sharding.path_name(path), _gather(leaf)
    if name.startswith("blocks/"):
      for i in range(num_layers):
        yield f"block_{i}/{name[len('blocks/'):]}", host[i]
    else:
      yield name, host
    del host


def _unrolled_names(params, num_layers: int) -> set[str]:
  names = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding.path_name(path)
    rest = name[len("blocks/"):]
    names |= {f"block_{i}/{rest}" for i in range(num_layers)} if name.startswith("blocks/") else {name}
  return names


def _safetensors_header(sources: dict[str, _Source], dtype: str) -> tuple[bytes, dict[str, int]]:
  """The file's header (length-prefixed JSON, padded so the data starts 8-byte aligned) and each
  tensor's offset from the data's start."""
  itemsize = jnp.dtype(dtype).itemsize
  shapes = {source.name: source.shape for source in sources.values()}
  header, offsets, offset = {"__metadata__": {"format": "pt"}}, {}, 0
  for name in sorted(shapes):
    size = math.prod(shapes[name]) * itemsize
    header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                    "data_offsets": [offset, offset + size]}
    offsets[name], offset = offset, offset + size
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-(8 + len(text)) % 8)
  return struct.pack("<Q", len(text)) + text, offsets


def _write_safetensors(path: str | None, sources: dict[str, _Source], parameters, dtype: str) -> None:
  """model.safetensors from (path, host array) pairs. The header follows from the table alone, so
  each tensor goes to its offset as soon as its parameters arrive and the host holds one at a time
  (safetensors.numpy.save_file wants them all in memory, and copies each to bytes besides).
  Processes other than 0 (path None) only take part in the gathering."""
  pieces = {}  # tensor name -> its bigjax parameters, in table order
  for param_path, source in sources.items():
    pieces.setdefault(source.name, []).append(param_path)
  tensors = _hf_tensors(sources, pieces, parameters)
  if path is None:
    for _ in tensors:
      pass
    return
  header, offsets = _safetensors_header(sources, dtype)
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(header)
      for name, tensor in tensors:
        f.seek(len(header) + offsets[name])
        # As raw bytes (a bfloat16 buffer is not exportable as one); JAX's platforms are little-endian.
        f.write(np.ascontiguousarray(tensor, jnp.dtype(dtype)).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise UserError(f"cannot write {path} ({e.strerror or e}); free space or fix the directory, "
                      f"then rerun") from None
    raise


def _hf_tensors(sources: dict[str, _Source], pieces: dict[str, list[str]], parameters):
  """(tensor name, array) as soon as every parameter that makes the tensor has arrived."""
  pending: dict[str, dict[str, np.ndarray]] = {}
  for param_path, host in parameters:
    source = sources[param_path]
    got = pending.setdefault(source.name, {})
    got[param_path] = source.layout.to_hf(host)
    if len(got) < len(pieces[source.name]):
      continue  # a fused tensor waits for its other pieces
    del pending[source.name]
    parts = [got[p] for p in pieces[source.name]]
    tensor = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    if tensor.shape != source.shape:
      raise UserError(f"parameter {param_path} has shape {host.shape}, which does not fit tensor "
                      f"{source.name!r} {source.shape} of the module's config")
    yield source.name, tensor


def save(directory: str, module, variables) -> str:
  """Writes a TransformerLM and its variables as a Hugging Face model directory (config.json and
  model.safetensors in the parameters' dtype) that transformers' from_pretrained (and `load`) read
  as the same model. Parameters may be sharded over a mesh and stacked by scan_layers; each is
  gathered to the host in turn and written out, so the host holds about one at a time (three for
  GPT-2's fused q/k/v), never the model. Returns the directory."""
  hf_config = check_exportable(module)
  cfg = module.config
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(os.path.join(directory, CONFIG)) or os.path.exists(os.path.join(directory, WEIGHTS)):
    raise UserError(f"{directory} already holds a model ({CONFIG} or {WEIGHTS}); choose a new directory")
  params = nn.unbox(variables["params"])
  sources = _tensor_map(hf_config["model_type"], cfg)
  have, want = _unrolled_names(params, cfg.num_layers), set(sources)
  if have != want:
    odd = sorted(want - have)[:1] + sorted(have - want)[:1]
    raise UserError(f"the variables do not fit the module's config (parameter {odd[0]} is "
                    f"{'missing' if odd[0] in want else 'unexpected'})")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  _write_safetensors(os.path.join(directory, WEIGHTS) if writer else None, sources,
                     _host_parameters(params, cfg.num_layers), cfg.param_dtype)
  if writer:  # last: a directory with config.json is a complete model
    workdir_lib.replace_file(os.path.join(directory, CONFIG), json.dumps(hf_config, indent=2) + "\n")
  return directory
