"""Hugging Face model directories (config.json and safetensors) as bigjax TransformerLMs.

`load(directory)` maps config.json to a TransformerConfig and reads the weights one tensor at a time
with safetensors' lazy reader, reshaping each into bigjax's layout and, given a mesh, placing it
straight into its parameter's sharding: the model never exists whole on one device, and the host
holds one tensor at a time (one parameter of every layer, stacked, under scan_layers).

What cannot be mapped exactly is refused in one line (principle 8): another model_type, a rotary
scaling other than Llama 3's, a sliding window shorter than the context, a missing, misshapen or
unexpected tensor, a truncated file.

Shapes: D model width, H query heads, G key/value heads, K head dim, F MLP width, V vocabulary,
P positions. Hugging Face's Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
"""

import contextlib
import json
import os
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from bigjax import sharding
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


class _Source(NamedTuple):
  """Where a bigjax parameter comes from: a Hugging Face tensor, its shape there, and the reshaping."""
  name: str
  shape: tuple[int, ...]
  to_bigjax: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _transpose(w):
  return w.T


def _split_out_heads(heads: int, head_dim: int):
  """A Linear [heads * K, D] -> bigjax's [D, heads, K] projection kernel; a bias [heads * K] -> [heads, K]."""
  return lambda w: w.T.reshape(-1, heads, head_dim) if w.ndim == 2 else w.reshape(heads, head_dim)


def _split_in_heads(heads: int, head_dim: int):
  """An output projection [D, H * K] (Linear) -> bigjax's [H, K, D]."""
  return lambda w: w.T.reshape(heads, head_dim, -1)


def _llama_family_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.resolved_head_dim
  h, g = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
  sources = {"token_embed/embedding": _Source(f"{prefix}embed_tokens.weight", (v, d), _same),
             "ln_final/scale": _Source(f"{prefix}norm.weight", (d,), _same)}
  if not cfg.tie_embeddings:
    sources["head/kernel"] = _Source("lm_head.weight", (v, d), _transpose)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}layers.{i}.", f"block_{i}/"
    sources[bj + "ln_attn/scale"] = _Source(hf + "input_layernorm.weight", (d,), _same)
    sources[bj + "ln_mlp/scale"] = _Source(hf + "post_attention_layernorm.weight", (d,), _same)
    for proj, name, heads in (("q", "query", h), ("k", "key", g), ("v", "value", g)):
      sources[bj + f"attn/{name}/kernel"] = _Source(
          hf + f"self_attn.{proj}_proj.weight", (heads * k, d), _split_out_heads(heads, k))
      if cfg.bias("qkv"):
        sources[bj + f"attn/{name}/bias"] = _Source(
            hf + f"self_attn.{proj}_proj.bias", (heads * k,), _split_out_heads(heads, k))
    sources[bj + "attn/out/kernel"] = _Source(
        hf + "self_attn.o_proj.weight", (d, h * k), _split_in_heads(h, k))
    if cfg.bias("attn_out"):
      sources[bj + "attn/out/bias"] = _Source(hf + "self_attn.o_proj.bias", (d,), _same)
    if cfg.qk_norm:
      sources[bj + "attn/query_norm/scale"] = _Source(hf + "self_attn.q_norm.weight", (k,), _same)
      sources[bj + "attn/key_norm/scale"] = _Source(hf + "self_attn.k_norm.weight", (k,), _same)
    for proj, name, shape in (("gate", "wi_gate", (f, d)), ("up", "wi_up", (f, d)), ("down", "wo", (d, f))):
      sources[bj + f"mlp/{name}/kernel"] = _Source(hf + f"mlp.{proj}_proj.weight", shape, _transpose)
      if cfg.bias("mlp"):
        sources[bj + f"mlp/{name}/bias"] = _Source(hf + f"mlp.{proj}_proj.bias", shape[:1], _same)
  return sources


def _gpt2_fused_qkv(part: int, width: int, heads: int, head_dim: int):
  """One of q, k, v from GPT-2's fused c_attn ([D, 3D] kernel or [3D] bias)."""
  def take(x):
    x = x[..., part * width:(part + 1) * width]
    return x.reshape(x.shape[:-1] + (heads, head_dim))
  return take


def _gpt2_tensors(cfg: transformer.TransformerConfig, prefix: str) -> dict[str, _Source]:
  d, f, v, h, k = cfg.embed_dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_heads, cfg.resolved_head_dim
  sources = {"token_embed/embedding": _Source(f"{prefix}wte.weight", (v, d), _same),
             "position_embed/embedding": _Source(f"{prefix}wpe.weight", (cfg.max_len, d), _same),
             "ln_final/scale": _Source(f"{prefix}ln_f.weight", (d,), _same),
             "ln_final/bias": _Source(f"{prefix}ln_f.bias", (d,), _same)}
  if not cfg.tie_embeddings:
    sources["head/kernel"] = _Source("lm_head.weight", (v, d), _transpose)
  for i in range(cfg.num_layers):
    hf, bj = f"{prefix}h.{i}.", f"block_{i}/"
    for hf_norm, bj_norm in (("ln_1", "ln_attn"), ("ln_2", "ln_mlp")):
      sources[bj + f"{bj_norm}/scale"] = _Source(hf + f"{hf_norm}.weight", (d,), _same)
      sources[bj + f"{bj_norm}/bias"] = _Source(hf + f"{hf_norm}.bias", (d,), _same)
    for part, name in enumerate(("query", "key", "value")):
      take = _gpt2_fused_qkv(part, d, h, k)
      sources[bj + f"attn/{name}/kernel"] = _Source(hf + "attn.c_attn.weight", (d, 3 * d), take)
      sources[bj + f"attn/{name}/bias"] = _Source(hf + "attn.c_attn.bias", (3 * d,), take)
    sources[bj + "attn/out/kernel"] = _Source(hf + "attn.c_proj.weight", (d, d), lambda w: w.reshape(h, k, d))
    sources[bj + "attn/out/bias"] = _Source(hf + "attn.c_proj.bias", (d,), _same)
    sources[bj + "mlp/wi/kernel"] = _Source(hf + "mlp.c_fc.weight", (d, f), _same)
    sources[bj + "mlp/wi/bias"] = _Source(hf + "mlp.c_fc.bias", (f,), _same)
    sources[bj + "mlp/wo/kernel"] = _Source(hf + "mlp.c_proj.weight", (f, d), _same)
    sources[bj + "mlp/wo/bias"] = _Source(hf + "mlp.c_proj.bias", (d,), _same)
  return sources


def _tensor_map(model_type: str, cfg: transformer.TransformerConfig, names: set[str]) -> dict[str, _Source]:
  """bigjax parameter path (layers unrolled) -> its source. Checkpoints of the bare model (LlamaModel,
  GPT2Model) lack the task model's "model." / "transformer." prefix."""
  if model_type == "gpt2":
    return _gpt2_tensors(cfg, "transformer." if "transformer.wte.weight" in names else "")
  return _llama_family_tensors(cfg, "model." if "model.embed_tokens.weight" in names else "")


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
    return source.to_bigjax(ckpt.read(source.name))
  if path.startswith("blocks/"):
    rest = path[len("blocks/"):]
    return np.stack([one(f"block_{i}/{rest}") for i in range(num_layers)])
  return one(path)


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
