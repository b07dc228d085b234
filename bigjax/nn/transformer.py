"""Pre-norm Transformer blocks and the decoder-only language model.

One block type covers GPT-2 and today's open LMs (Llama, Mistral, Qwen) as choices of
`TransformerConfig`: LayerNorm or RMSNorm, a dense or gated (SwiGLU, GeGLU) MLP, biases per part,
q/k norms, rotary positions with Llama 3 scaling. A fork adds a block type of its own with
`register_block` and names it in `TransformerConfig.block`; scan over layers, remat and the KV cache
then work for it unchanged.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.nn import attention
from bigjax.nn import conv
from bigjax.nn import norm as norm_lib
from bigjax.nn import position

_ACTIVATIONS = {
    "gelu": nn.gelu,  # tanh approximation, as GPT-2 uses
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,  # SwiGLU's gate (Llama, Mistral, Qwen)
}

POSITIONS = ("learned", "sinusoidal", "rotary", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("dense", "gated")
ROPE_SCALINGS = ("none", "llama3")

# Block types by name (register_block); TransformerConfig.block picks one.
_BLOCKS: dict[str, type[nn.Module]] = {}

# --remat: which activations a block keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # keep everything (no rematerialisation)
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # ... but not attention's
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Everything that shapes a Transformer; one instance configures every layer."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  mlp_dim: int
  max_len: int
  num_kv_heads: int | None = None  # None: as many as num_heads (plain multi-head attention)
  head_dim: int | None = None  # None: embed_dim // num_heads
  # The attention kernel: "auto" lets bigjax.ops.attention pick for the platform and inputs;
  # one of ops.attention.IMPLEMENTATIONS pins it (splash off a TPU runs in Pallas' interpreter).
  attention: str = "auto"
  position: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
  rotary_base: float = 10_000.0
  # Llama 3.1's rotary frequency scaling (position.Llama3Scaling), used when rope_scaling="llama3".
  rope_scaling: Literal["none", "llama3"] = "none"
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm: Literal["layernorm", "rmsnorm"] = "layernorm"
  # Gated: wo(activation(x wi_gate) * (x wi_up)), SwiGLU with silu
  mlp: Literal["dense", "gated"] = "dense"
  activation: str = "gelu"
  # Every bias (LayerNorm's too), unless one of the three below says otherwise
  use_bias: bool = True
  qkv_bias: bool | None = None  # None: as use_bias
  attn_out_bias: bool | None = None  # None: as use_bias
  mlp_bias: bool | None = None  # None: as use_bias
  qk_norm: bool = False  # RMS-normalise each query and key head before rotary (Qwen3)
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  # The epsilon of every norm: LayerNorm, RMSNorm and the q/k norms
  layer_norm_epsilon: float = 1e-5
  block: str = "pre_norm"  # a register_block name
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"  # storage
  remat: str = "none"  # a REMAT_POLICIES name
  # One block under nn.scan, parameters stacked on a leading "layers" axis
  scan_layers: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_len"):
      checks.positive_int(self, name)
    checks.optional_positive_int(self, "num_kv_heads")
    checks.optional_positive_int(self, "head_dim")
    checks.one_of(self, "attention", ("auto", *attention.IMPLEMENTATIONS), "attention kernel")
    checks.one_of(self, "position", POSITIONS)
    checks.positive_number(self, "rotary_base")
    checks.one_of(self, "rope_scaling", ROPE_SCALINGS)
    self._check_llama3_scaling()  # even when unused, so that a typo never waits to be switched on
    checks.one_of(self, "norm", NORMS)
    checks.one_of(self, "mlp", MLPS)
    checks.one_of(self, "activation", _ACTIVATIONS)
    for name in ("use_bias", "qk_norm", "tie_embeddings", "scan_layers"):
      checks.boolean(self, name)
    for name in ("qkv_bias", "attn_out_bias", "mlp_bias"):
      if getattr(self, name) is not None:
        checks.boolean(self, name)
    checks.one_of(
        self, "block", _BLOCKS, "block type (register a new one with transformer.register_block)"
    )
    checks.fraction(self, "dropout_rate")
    checks.positive_number(self, "layer_norm_epsilon")
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")
    checks.one_of(self, "remat", REMAT_POLICIES, "remat policy")
    if self.head_dim is None:
      checks.divides(self, "num_heads", "embed_dim", "or set head_dim")
    if self.num_kv_heads is not None:
      checks.divides(self, "num_kv_heads", "num_heads")
    # The fixed tables pair sines with cosines, and rotary embeddings rotate pairs of dimensions.
    if self.position == "sinusoidal" and self.embed_dim % 2:
      checks.fail(self, f"embed_dim={self.embed_dim} must be even for sinusoidal positions")
    if self.position == "rotary" and self.resolved_head_dim % 2:
      head_dim = (
          f"head_dim={self.head_dim}"
          if self.head_dim
          else f"embed_dim // num_heads = {self.resolved_head_dim}"
      )
      checks.fail(self, f"{head_dim} must be even for rotary positions")
    if self.rope_scaling != "none" and self.position != "rotary":
      checks.fail(
          self, f"rope_scaling={self.rope_scaling!r} needs position='rotary', got {self.position!r}"
      )

  def _check_llama3_scaling(self):
    for name in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
      checks.positive_number(self, name)
    checks.positive_int(self, "rope_original_max_len")
    if self.rope_high_freq_factor <= self.rope_low_freq_factor:
      # The blend between the two wavelength bands divides by their difference.
      checks.fail(
          self,
          f"rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
          f"rope_low_freq_factor={self.rope_low_freq_factor}",
      )

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property  # the annotation is quoted: in the class body the field `position` hides the module
  def rotary_scaling(self) -> "position.Llama3Scaling | None":
    if self.rope_scaling == "none":
      return None
    return position.Llama3Scaling(
        self.rope_scaling_factor,
        self.rope_low_freq_factor,
        self.rope_high_freq_factor,
        self.rope_original_max_len,
    )

  def bias(self, part: Literal["qkv", "attn_out", "mlp"]) -> bool:
    """Whether the projections of `part` have biases: its own switch, else use_bias."""
    own = getattr(self, f"{part}_bias")
    return self.use_bias if own is None else own


def _dense(
    cfg: TransformerConfig, features: int, axes: tuple[str, str], init, name: str
) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=cfg.bias("mlp"),
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
  )


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense(mlp_dim), activation, Dense(embed_dim)."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    h_BTF = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), nn.initializers.normal(stddev=0.02), "wi")(
        x_BTD
    )
    h_BTF = nn.with_logical_constraint(
        _ACTIVATIONS[cfg.activation](h_BTF), ("batch", "length", "act_mlp")
    )
    return _dense(cfg, x_BTD.shape[-1], ("mlp", "embed"), _residual_init(cfg), "wo")(h_BTF)


class GatedMlp(nn.Module):
  """Gated linear unit feed-forward (Shazeer 2020): wo(activation(x wi_gate) * (x wi_up)).

  SwiGLU with activation="silu" (Llama, Mistral, Qwen), GeGLU with "gelu" (Gemma).
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    init = nn.initializers.normal(stddev=0.02)
    gate_BTF = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), init, "wi_gate")(x_BTD)
    up_BTF = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), init, "wi_up")(x_BTD)
    h_BTF = nn.with_logical_constraint(
        _ACTIVATIONS[cfg.activation](gate_BTF) * up_BTF, ("batch", "length", "act_mlp")
    )
    return _dense(cfg, x_BTD.shape[-1], ("mlp", "embed"), _residual_init(cfg), "wo")(h_BTF)


def _residual_init(cfg: TransformerConfig):
  # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers), so the
  # stream's variance does not grow with depth.
  return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * cfg.num_layers))


# The parts a block composes, built from the config. A registered block uses them too, so it reads
# the same fields (norm, mlp, biases, rotary) as the standard one.


def make_norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """The config's norm over the model width: LayerNorm (bias if use_bias) or RMSNorm."""
  if cfg.norm == "rmsnorm":
    return norm_lib.RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, cfg.storage_dtype, name=name)
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_epsilon,
      use_bias=cfg.use_bias,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
  )


def make_attention(
    cfg: TransformerConfig, name: str = "attn", *, cross: bool = False
) -> attention.MultiHeadAttention:
  """Self-attention as the config describes it, with a KV cache of max_len positions; with
  `cross`, attention to another sequence (no rotary across the two)."""
  rotary = cfg.position == "rotary" and not cross
  return attention.MultiHeadAttention(
      num_heads=cfg.num_heads,
      head_dim=cfg.resolved_head_dim,
      num_kv_heads=cfg.num_kv_heads,
      use_bias=cfg.bias("qkv"),
      out_bias=cfg.bias("attn_out"),
      dropout_rate=cfg.dropout_rate,
      qk_norm_epsilon=cfg.layer_norm_epsilon if cfg.qk_norm else None,
      rotary_base=cfg.rotary_base if rotary else None,
      rotary_scaling=cfg.rotary_scaling if rotary else None,
      cache_len=cfg.max_len,
      implementation=None if cfg.attention == "auto" else cfg.attention,
      cross_attention=cross,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      out_kernel_init=_residual_init(cfg),
      name=name,
  )


def make_mlp(cfg: TransformerConfig, name: str = "mlp") -> nn.Module:
  return (GatedMlp if cfg.mlp == "gated" else Mlp)(cfg, name=name)


def register_block(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
  """Class decorator adding a block type under `name`, for `TransformerConfig(block=name)`.

  The class is a Linen module constructed as `Block(config, name=...)` and called as
  `block(x_BTD, mask, positions_BT, *, causal, train, decode)` -> x_BTD, like TransformerBlock
  (`mask` is what MultiHeadAttention takes: an ops.attention.Mask, an array or None); any KV
  cache lives in its "cache" collection (make_attention's does). Its parameters and caches then
  get the layers axis under scan_layers, and remat wraps it whole.
  """

  def add(block_cls: type[nn.Module]) -> type[nn.Module]:
    if name in _BLOCKS:
      raise ValueError(
          f"block type {name!r} is already registered (by {_BLOCKS[name].__qualname__})"
      )
    if not (isinstance(block_cls, type) and issubclass(block_cls, nn.Module)):
      raise TypeError(
          f"register_block({name!r}) takes a flax.linen Module class, got {block_cls!r}"
      )
    _BLOCKS[name] = block_cls
    return block_cls

  return add


def block_names() -> list[str]:
  return sorted(_BLOCKS)


@register_block("pre_norm")
class TransformerBlock(nn.Module):
  """x + Attention(Norm(x)), then x + Mlp(Norm(x)): the pre-norm block of GPT-2, Llama, Mistral, Qwen.

  A decoder block is causal, an encoder (ViT) block is not.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
      self,
      x_BTD,
      mask=None,
      positions_BT=None,
      *,
      causal: bool = False,
      train: bool = False,
      decode: bool = False,
  ):
    cfg = self.config
    h_BTD = make_attention(cfg)(
        make_norm(cfg, "ln_attn")(x_BTD),
        mask,
        positions_BT,
        causal=causal,
        train=train,
        decode=decode,
    )
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=not train)
    h_BTD = make_mlp(cfg)(make_norm(cfg, "ln_mlp")(x_BTD))
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=not train)
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))


def apply_blocks(
    cfg: TransformerConfig,
    x_BTD,
    mask,
    positions_BT,
    *,
    causal: bool,
    train: bool,
    decode: bool,
    num_layers: int | None = None,
    block_cls: type[nn.Module] | None = None,
    cross=None,
):
  """Runs `num_layers` (default cfg.num_layers) blocks of type `block_cls` (default: the one
  cfg.block names) inside a compact method: as block_0, block_1, ..., or with `cfg.scan_layers` as
  one scanned block "blocks" whose parameters (and KV caches) have a leading layers axis, which
  compiles one block instead of num_layers. `cfg.remat` wraps each block in jax.checkpoint with
  the named policy. `cross`, when given, reaches every block as its `cross` argument (an
  encoder-decoder's encoder output and source mask)."""
  block_cls = block_cls or _BLOCKS[cfg.block]
  num_layers = num_layers or cfg.num_layers

  def block(module, x_BTD, mask, positions_BT, cross):
    extra = {} if cross is None else {"cross": cross}
    return module(x_BTD, mask, positions_BT, causal=causal, train=train, decode=decode, **extra)

  policy = REMAT_POLICIES[cfg.remat]
  if cfg.remat != "none":
    # Under scan the loop already stops XLA from merging recomputation into the forward pass.
    block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for i in range(num_layers):
      x_BTD = block(block_cls(cfg, name=f"block_{i}"), x_BTD, mask, positions_BT, cross)
    return x_BTD
  scanned = nn.scan(
      lambda module, x_BTD, mask, positions_BT, cross: (
          block(module, x_BTD, mask, positions_BT, cross),
          None,
      ),
      variable_axes={"params": 0, "cache": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )
  x_BTD, _ = scanned(block_cls(cfg, name="blocks"), x_BTD, mask, positions_BT, cross)
  return x_BTD


class TransformerLM(nn.Module):
  """Decoder-only language model: token (+ position) embedding, causal blocks, final norm, logits.

  Returns float32 logits [B, T, vocab]. `valid_BT` (True for real tokens) masks padding keys;
  `segment_ids_BT` keeps each token's attention inside its own packed document (pass the
  within-document `positions_BT` with them).
  `decode=True` runs with a KV cache (the `cache` collection, see bigjax.sample): pass the new
  tokens and their absolute `positions_BT`.
  """

  config: TransformerConfig
  # Packed windows give it segment ids and within-document positions (bigjax.lm_inputs).
  takes_segment_ids: ClassVar[bool] = True

  @nn.nowrap
  def decoder(self, apply_model: nn.Module):
    """bigjax.sample's decode interface: (start, step) running `apply_model` (this model, or a
    wrapper that computes as it does, such as a Lora) with a KV cache."""

    def start(params, prompt_BP):
      # Only the cache's shapes are needed: an empty cache is all zeros.
      init = functools.partial(apply_model.init, decode=True)  # decode stays a Python bool
      cache_shapes = jax.eval_shape(init, jax.random.PRNGKey(0), prompt_BP[:, :1])["cache"]
      cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache_shapes)
      return step(params, cache, prompt_BP, 0)

    def step(params, cache, tokens_BT, start_position):
      positions_BT = start_position + jnp.arange(tokens_BT.shape[1])[None, :]
      logits, variables = apply_model.apply(
          {"params": params, "cache": cache},
          tokens_BT,
          positions_BT=positions_BT,
          decode=True,
          mutable=["cache"],
      )
      return logits[:, -1], variables["cache"]

    return start, step

  @nn.compact
  def __call__(
      self,
      tokens_BT,
      *,
      positions_BT=None,
      valid_BT=None,
      segment_ids_BT=None,
      train: bool = False,
      decode: bool = False,
  ):
    cfg = self.config
    length = tokens_BT.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds the model's max_len={cfg.max_len}")
    if positions_BT is None:
      positions_BT = jnp.arange(length)[None, :]
    embed = make_token_embed(cfg, cfg.vocab_size, "token_embed")
    x_BTD = add_positions(cfg, embed(tokens_BT), positions_BT, cfg.max_len)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=not train)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))

    # Kept as its parts: fused attention kernels take segment ids, not a [T, T] array.
    mask = attention.Mask(segment_ids_BT=segment_ids_BT, valid_BS=valid_BT)
    x_BTD = apply_blocks(cfg, x_BTD, mask, positions_BT, causal=True, train=train, decode=decode)
    return output_logits(cfg, make_norm(cfg, "ln_final")(x_BTD), embed)


# The embedding and output parts a language model and an encoder-decoder share (call them inside a
# compact method; the names are the parameters' names).


def make_token_embed(cfg: TransformerConfig, vocab_size: int, name: str) -> nn.Embed:
  return nn.Embed(
      vocab_size,
      cfg.embed_dim,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype,
      name=name,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), ("vocab", "embed")
      ),
  )


def add_positions(cfg: TransformerConfig, x_BTD, positions_BT, max_len: int, name="position_embed"):
  """x plus the config's absolute position embeddings (learned or sinusoidal); rotary positions
  are applied in attention instead."""
  if cfg.position == "learned":
    return x_BTD + position.LearnedPositions(
        max_len, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name=name
    )(positions_BT)
  if cfg.position == "sinusoidal":
    return x_BTD + position.SinusoidalPositions(max_len, cfg.embed_dim, dtype=cfg.compute_dtype)(
        positions_BT
    )
  return x_BTD


def output_logits(cfg: TransformerConfig, x_BTD, embed: nn.Embed):
  """float32 logits [B, T, vocab]: through the token embedding when tie_embeddings, else a head."""
  if cfg.tie_embeddings:
    logits_BTV = jnp.einsum(
        "btd,vd->btv",
        x_BTD,
        embed.embedding.astype(x_BTD.dtype),
        preferred_element_type=jnp.float32,
    )
  else:
    logits_BTV = nn.Dense(
        embed.num_embeddings,
        use_bias=False,
        dtype=jnp.float32,
        param_dtype=cfg.storage_dtype,
        name="head",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), ("embed", "vocab")
        ),
    )(x_BTD)
  return nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Vision Transformer (Dosovitskiy et al. 2021): patches by a strided convolution, pre-LN encoder
  blocks (no causal mask), a class token or mean pooling, and a linear head."""

  num_classes: int
  input_shape: tuple[int, int, int]  # height, width, channels
  patch_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  mlp_dim: int
  pool: Literal["cls", "mean"] = "cls"
  position: Literal["learned", "sinusoidal_2d"] = "learned"
  activation: str = "gelu_exact"  # of the MLP; as TransformerConfig's
  layer_norm_epsilon: float = 1e-6  # timm's; Hugging Face's ViT uses 1e-12
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # as TransformerConfig
  scan_layers: bool = False

  def __post_init__(self):
    # Every field the encoder blocks take is checked here, so block_config() cannot fail later
    # with the decoder's config name in the message.
    checks.positive_int(self, "num_classes")
    checks.positive_ints(self, "input_shape", length=3, meaning="height, width, channels")
    for name in ("patch_size", "num_layers", "embed_dim", "num_heads", "mlp_dim"):
      checks.positive_int(self, name)
    checks.one_of(self, "pool", ("cls", "mean"))
    checks.one_of(self, "position", ("learned", "sinusoidal_2d"))
    checks.one_of(self, "activation", _ACTIVATIONS)
    checks.positive_number(self, "layer_norm_epsilon")
    checks.fraction(self, "dropout_rate")
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")
    checks.one_of(self, "remat", REMAT_POLICIES, "remat policy")
    checks.boolean(self, "scan_layers")
    height, width, _ = self.input_shape
    if height % self.patch_size or width % self.patch_size:
      checks.fail(
          self,
          f"patch_size={self.patch_size} must divide the image's height and width "
          f"(input_shape={tuple(self.input_shape)})",
      )
    checks.divides(self, "num_heads", "embed_dim")
    if self.position == "sinusoidal_2d" and self.embed_dim % 4:
      # Half the dimensions encode the row and half the column, each as sine-cosine pairs.
      checks.fail(
          self, f"embed_dim={self.embed_dim} must be divisible by 4 for sinusoidal_2d positions"
      )

  @property
  def grid(self) -> tuple[int, int]:
    return self.input_shape[0] // self.patch_size, self.input_shape[1] // self.patch_size

  def block_config(self) -> TransformerConfig:
    """The encoder blocks' settings, in the decoder's config type (vocabulary and length unused)."""
    return TransformerConfig(
        vocab_size=1,  # unused by the blocks; 1 passes the decoder's check
        num_layers=self.num_layers,
        embed_dim=self.embed_dim,
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        max_len=self.grid[0] * self.grid[1] + 1,
        position="none",
        activation=self.activation,
        dropout_rate=self.dropout_rate,
        layer_norm_epsilon=self.layer_norm_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        remat=self.remat,
        scan_layers=self.scan_layers,
    )


class ViT(nn.Module):
  """Image classifier; returns float32 logits [B, num_classes]."""

  config: ViTConfig

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool = False):
    cfg = self.config
    conv.check_image_shape(images_BHWC, cfg.input_shape)
    block_cfg = cfg.block_config()
    dtype = block_cfg.compute_dtype
    p = cfg.patch_size
    x = conv.Conv(
        cfg.embed_dim,
        (p, p),
        strides=(p, p),
        dtype=dtype,
        param_dtype=block_cfg.storage_dtype,
        name="patch_embed",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(images_BHWC.astype(dtype))
    batch = x.shape[0]
    x_BTD = x.reshape(batch, -1, cfg.embed_dim)
    num_patches = x_BTD.shape[1]
    if cfg.position == "learned":
      pos_TD = self.param(
          "position_embed",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
          (num_patches + (cfg.pool == "cls"), cfg.embed_dim),
          block_cfg.storage_dtype,
      )
    else:
      table = jnp.asarray(position.sinusoidal_2d(*cfg.grid, cfg.embed_dim))
      pos_TD = (
          jnp.concatenate([jnp.zeros((1, cfg.embed_dim)), table]) if cfg.pool == "cls" else table
      )
    if cfg.pool == "cls":
      cls_11D = self.param(
          "cls_token",
          nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
          (1, 1, cfg.embed_dim),
          block_cfg.storage_dtype,
      )
      x_BTD = jnp.concatenate(
          [jnp.broadcast_to(cls_11D.astype(dtype), (batch, 1, cfg.embed_dim)), x_BTD], axis=1
      )
    x_BTD = x_BTD + pos_TD.astype(dtype)[None]
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=not train)
    x_BTD = apply_blocks(block_cfg, x_BTD, None, None, causal=False, train=train, decode=False)
    x_BTD = make_norm(block_cfg, "ln_final")(x_BTD)
    pooled_BD = x_BTD[:, 0] if cfg.pool == "cls" else jnp.mean(x_BTD, axis=1)
    return conv.classifier_head(pooled_BD, cfg.num_classes, block_cfg.storage_dtype)
