"""Pre-LayerNorm Transformer blocks and the decoder-only language model."""

import dataclasses
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.nn import attention
from bigjax.nn import conv
from bigjax.nn import position

_ACTIVATIONS = {
    "gelu": nn.gelu,  # tanh approximation, as GPT-2 uses
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}

POSITIONS = ("learned", "sinusoidal", "rotary", "none")

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
  position: Literal["learned", "sinusoidal", "rotary", "none"] = "learned"
  rotary_base: float = 10_000.0
  activation: str = "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-5
  dtype: str = "float32"  # compute
  param_dtype: str = "float32"  # storage
  remat: str = "none"  # a REMAT_POLICIES name
  scan_layers: bool = False  # one block under nn.scan, parameters stacked on a leading "layers" axis

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "embed_dim", "num_heads", "mlp_dim", "max_len"):
      checks.positive_int(self, name)
    checks.optional_positive_int(self, "num_kv_heads")
    checks.optional_positive_int(self, "head_dim")
    checks.one_of(self, "position", POSITIONS)
    checks.positive_number(self, "rotary_base")
    checks.one_of(self, "activation", _ACTIVATIONS)
    for name in ("use_bias", "tie_embeddings", "scan_layers"):
      checks.boolean(self, name)
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
      head_dim = f"head_dim={self.head_dim}" if self.head_dim else \
          f"embed_dim // num_heads = {self.resolved_head_dim}"
      checks.fail(self, f"{head_dim} must be even for rotary positions")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads


class Mlp(nn.Module):
  """Position-wise feed-forward: Dense(mlp_dim), activation, Dense(embed_dim)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    init = nn.initializers.normal(stddev=0.02)
    h_BTF = nn.Dense(
        cfg.mlp_dim, use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="wi",
        kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x_BTD)
    h_BTF = nn.with_logical_constraint(_ACTIVATIONS[cfg.activation](h_BTF), ("batch", "length", "act_mlp"))
    return nn.Dense(
        x_BTD.shape[-1], use_bias=cfg.use_bias, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="wo",
        kernel_init=nn.with_logical_partitioning(_residual_init(cfg), ("mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h_BTF)


def _residual_init(cfg: TransformerConfig):
  # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers), so the
  # stream's variance does not grow with depth.
  return nn.initializers.normal(stddev=0.02 / math.sqrt(2 * cfg.num_layers))


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_epsilon, use_bias=cfg.use_bias, dtype=cfg.compute_dtype,
      param_dtype=cfg.storage_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class TransformerBlock(nn.Module):
  """x + Attention(LN(x)), then x + Mlp(LN(x)): GPT-2's pre-LayerNorm block.

  A decoder block is causal, an encoder (ViT) block is not.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BTD, mask_B1TS=None, positions_BT=None, *, causal: bool = False, train: bool = False,
               decode: bool = False):
    cfg = self.config
    h_BTD = attention.MultiHeadAttention(
        num_heads=cfg.num_heads, head_dim=cfg.resolved_head_dim, num_kv_heads=cfg.num_kv_heads,
        use_bias=cfg.use_bias, dropout_rate=cfg.dropout_rate,
        rotary_base=cfg.rotary_base if cfg.position == "rotary" else None, cache_len=cfg.max_len,
        dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, out_kernel_init=_residual_init(cfg), name="attn",
    )(_layer_norm(cfg, "ln_attn")(x_BTD), mask_B1TS, positions_BT, causal=causal, train=train, decode=decode)
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=not train)
    h_BTD = Mlp(cfg, name="mlp")(_layer_norm(cfg, "ln_mlp")(x_BTD))
    x_BTD = x_BTD + nn.Dropout(cfg.dropout_rate)(h_BTD, deterministic=not train)
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))


def apply_blocks(cfg: TransformerConfig, x_BTD, mask_B1TS, positions_BT, *, causal: bool, train: bool,
                 decode: bool):
  """Runs `cfg.num_layers` blocks (call inside a compact method): as block_0, block_1, ..., or with
  `cfg.scan_layers` as one scanned block "blocks" whose parameters (and KV caches) have a leading
  layers axis, which compiles one block instead of num_layers. `cfg.remat` wraps each block in
  jax.checkpoint with the named policy."""
  def block(module, x_BTD, mask_B1TS, positions_BT):
    return module(x_BTD, mask_B1TS, positions_BT, causal=causal, train=train, decode=decode)

  policy = REMAT_POLICIES[cfg.remat]
  if cfg.remat != "none":
    # Under scan the loop already stops XLA from merging recomputation into the forward pass.
    block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for i in range(cfg.num_layers):
      x_BTD = block(TransformerBlock(cfg, name=f"block_{i}"), x_BTD, mask_B1TS, positions_BT)
    return x_BTD
  scanned = nn.scan(
      lambda module, x_BTD, mask_B1TS, positions_BT: (block(module, x_BTD, mask_B1TS, positions_BT), None),
      variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"})
  x_BTD, _ = scanned(TransformerBlock(cfg, name="blocks"), x_BTD, mask_B1TS, positions_BT)
  return x_BTD


class TransformerLM(nn.Module):
  """Decoder-only language model: token (+ position) embedding, causal blocks, final LN, logits.

  Returns float32 logits [B, T, vocab]. `valid_BT` (True for real tokens) masks padding keys;
  `segment_ids_BT` keeps each token's attention inside its own packed document (pass the
  within-document `positions_BT` with them).
  `decode=True` runs with a KV cache (the `cache` collection, see bigjax.sample): pass the new
  tokens and their absolute `positions_BT`.
  """
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens_BT, *, positions_BT=None, valid_BT=None, segment_ids_BT=None, train: bool = False,
               decode: bool = False):
    cfg = self.config
    length = tokens_BT.shape[1]
    if length > cfg.max_len:
      raise ValueError(f"sequence length {length} exceeds the model's max_len={cfg.max_len}")
    if positions_BT is None:
      positions_BT = jnp.arange(length)[None, :]
    embed = nn.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype, name="token_embed",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
    x_BTD = embed(tokens_BT)
    if cfg.position == "learned":
      x_BTD += position.LearnedPositions(
          cfg.max_len, cfg.embed_dim, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
          name="position_embed")(positions_BT)
    elif cfg.position == "sinusoidal":
      x_BTD += position.SinusoidalPositions(cfg.max_len, cfg.embed_dim, dtype=cfg.compute_dtype)(positions_BT)
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=not train)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))

    mask = attention.combine_masks(
        None if valid_BT is None else attention.padding_mask(valid_BT),
        None if segment_ids_BT is None else attention.segment_mask(segment_ids_BT))
    x_BTD = apply_blocks(cfg, x_BTD, mask, positions_BT, causal=True, train=train, decode=decode)
    x_BTD = _layer_norm(cfg, "ln_final")(x_BTD)

    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, embed.embedding.astype(x_BTD.dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=cfg.storage_dtype, name="head",
          kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed", "vocab")),
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
    checks.fraction(self, "dropout_rate")
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")
    checks.one_of(self, "remat", REMAT_POLICIES, "remat policy")
    checks.boolean(self, "scan_layers")
    height, width, _ = self.input_shape
    if height % self.patch_size or width % self.patch_size:
      checks.fail(self, f"patch_size={self.patch_size} must divide the image's height and width "
                        f"(input_shape={tuple(self.input_shape)})")
    checks.divides(self, "num_heads", "embed_dim")
    if self.position == "sinusoidal_2d" and self.embed_dim % 4:
      # Half the dimensions encode the row and half the column, each as sine-cosine pairs.
      checks.fail(self, f"embed_dim={self.embed_dim} must be divisible by 4 for sinusoidal_2d positions")

  @property
  def grid(self) -> tuple[int, int]:
    return self.input_shape[0] // self.patch_size, self.input_shape[1] // self.patch_size

  def block_config(self) -> TransformerConfig:
    """The encoder blocks' settings, in the decoder's config type (vocabulary and length unused)."""
    return TransformerConfig(
        vocab_size=1,  # unused by the blocks; 1 passes the decoder's check
        num_layers=self.num_layers, embed_dim=self.embed_dim, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, max_len=self.grid[0] * self.grid[1] + 1, position="none",
        activation="gelu_exact", dropout_rate=self.dropout_rate, layer_norm_epsilon=1e-6,
        dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan_layers=self.scan_layers)


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
    x = conv.Conv(cfg.embed_dim, (p, p), strides=(p, p), dtype=dtype,
                  param_dtype=block_cfg.storage_dtype, name="patch_embed",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           (None, None, "conv_in", "embed")),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(images_BHWC.astype(dtype))
    batch = x.shape[0]
    x_BTD = x.reshape(batch, -1, cfg.embed_dim)
    num_patches = x_BTD.shape[1]
    if cfg.position == "learned":
      pos_TD = self.param("position_embed",
                          nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("length", "embed")),
                          (num_patches + (cfg.pool == "cls"), cfg.embed_dim), block_cfg.storage_dtype)
    else:
      table = jnp.asarray(position.sinusoidal_2d(*cfg.grid, cfg.embed_dim))
      pos_TD = jnp.concatenate([jnp.zeros((1, cfg.embed_dim)), table]) if cfg.pool == "cls" else table
    if cfg.pool == "cls":
      cls_11D = self.param("cls_token", nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed")),
                           (1, 1, cfg.embed_dim), block_cfg.storage_dtype)
      x_BTD = jnp.concatenate([jnp.broadcast_to(cls_11D.astype(dtype), (batch, 1, cfg.embed_dim)), x_BTD], axis=1)
    x_BTD = x_BTD + pos_TD.astype(dtype)[None]
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=not train)
    x_BTD = apply_blocks(block_cfg, x_BTD, None, None, causal=False, train=train, decode=False)
    x_BTD = _layer_norm(block_cfg, "ln_final")(x_BTD)
    pooled_BD = x_BTD[:, 0] if cfg.pool == "cls" else jnp.mean(x_BTD, axis=1)
    return conv.classifier_head(pooled_BD, cfg.num_classes, block_cfg.storage_dtype)
