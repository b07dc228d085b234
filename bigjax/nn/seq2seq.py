"""The encoder-decoder Transformer (Vaswani et al. 2017), pre-norm: an encoder of the blocks the
language model uses (not causal, source padding masked), a decoder whose blocks add
cross-attention to the encoder's output, and shared or separate token embeddings.

Every field of TransformerConfig shapes both stacks (norms, gated MLPs, biases, q/k norms, rotary
positions, remat, scan over layers). Decoding keeps the decoder's self-attention keys and values
in a KV cache and projects the encoder's output into cross-attention keys and values once.

Shapes are named by suffix: B batch, S source time, T target time, D width, V vocabulary.
"""

import dataclasses
import functools
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.errors import UserError
from bigjax.nn import attention
from bigjax.nn import transformer


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(transformer.TransformerConfig):
  """A TransformerConfig for both stacks (num_layers: decoder blocks; vocab_size: the target side;
  max_len: the longest decoder input), and the source side's own fields."""

  num_encoder_layers: int | None = None  # None: num_layers
  source_vocab_size: int | None = None  # None: vocab_size
  max_source_len: int | None = None  # None: max_len
  # One table for source and target tokens (and, with tie_embeddings, the output): a shared
  # vocabulary, as the base model of the paper has.
  share_embeddings: bool = True
  # Multiply token embeddings by sqrt(embed_dim), as the paper does, so that they are not drowned by
  # sinusoidal positions of unit size.
  scale_embeddings: bool = False
  eos_id: int = 0  # starts every decoder input and ends every target

  def __post_init__(self):
    super().__post_init__()
    for name in ("num_encoder_layers", "source_vocab_size", "max_source_len"):
      checks.optional_positive_int(self, name)
    checks.boolean(self, "share_embeddings")
    checks.boolean(self, "scale_embeddings")
    checks.nonnegative_int(self, "eos_id")
    if self.eos_id >= self.vocab_size:
      checks.fail(self, f"eos_id={self.eos_id} is not an id of vocab_size={self.vocab_size}")
    if self.share_embeddings and self.source_vocab != self.vocab_size:
      checks.fail(
          self,
          f"share_embeddings=True needs one vocabulary, but source_vocab_size="
          f"{self.source_vocab_size} and vocab_size={self.vocab_size}; set share_embeddings=False",
      )

  @property
  def encoder_layers(self) -> int:
    return self.num_encoder_layers or self.num_layers

  @property
  def source_vocab(self) -> int:
    return self.source_vocab_size or self.vocab_size

  @property
  def source_len(self) -> int:
    return self.max_source_len or self.max_len


class CrossAttentionBlock(nn.Module):
  """x + SelfAttention(Norm(x)), x + CrossAttention(Norm(x), encoder output), x + Mlp(Norm(x)).

  `cross` is (encoded_BSD, source mask); when decoding after the first step, encoded_BSD is None
  and the cross-attention reuses the keys and values it cached.
  """

  config: transformer.TransformerConfig

  @nn.compact
  def __call__(
      self,
      x_BTD,
      mask,
      positions_BT,
      *,
      cross,
      causal: bool,
      train: bool = False,
      decode: bool = False,
  ):
    cfg = self.config
    encoded_BSD, source_mask = cross
    dropout = nn.Dropout(cfg.dropout_rate)
    h_BTD = transformer.make_attention(cfg)(
        transformer.make_norm(cfg, "ln_attn")(x_BTD),
        mask,
        positions_BT,
        causal=causal,
        train=train,
        decode=decode,
    )
    x_BTD = x_BTD + dropout(h_BTD, deterministic=not train)
    h_BTD = transformer.make_attention(cfg, "cross_attn", cross=True)(
        transformer.make_norm(cfg, "ln_cross")(x_BTD),
        source_mask,
        kv_BSD=encoded_BSD,
        train=train,
        decode=decode,
    )
    x_BTD = x_BTD + dropout(h_BTD, deterministic=not train)
    h_BTD = transformer.make_mlp(cfg)(transformer.make_norm(cfg, "ln_mlp")(x_BTD))
    x_BTD = x_BTD + dropout(h_BTD, deterministic=not train)
    return nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))


def _embed_tokens(cfg: Seq2SeqConfig, embed: nn.Embed, tokens_BT):
  x_BTD = embed(tokens_BT)
  return x_BTD * math.sqrt(cfg.embed_dim) if cfg.scale_embeddings else x_BTD


class Encoder(nn.Module):
  """Source tokens -> [B, S, D]: embeddings, positions, num_encoder_layers blocks of cfg.block
  type attending to every real source position, final norm."""

  config: Seq2SeqConfig
  embed: nn.Embed

  @nn.compact
  def __call__(self, inputs_BS, valid_BS, *, train: bool = False):
    cfg = self.config
    positions_BS = jnp.arange(inputs_BS.shape[1])[None, :]
    x_BSD = transformer.add_positions(
        cfg, _embed_tokens(cfg, self.embed, inputs_BS), positions_BS, cfg.source_len
    )
    x_BSD = nn.Dropout(cfg.dropout_rate)(x_BSD, deterministic=not train)
    x_BSD = nn.with_logical_constraint(x_BSD, ("batch", "length", "act_embed"))
    x_BSD = transformer.apply_blocks(
        cfg,
        x_BSD,
        attention.Mask(valid_BS=valid_BS),
        positions_BS,
        causal=False,
        train=train,
        decode=False,
        num_layers=cfg.encoder_layers,
    )
    return transformer.make_norm(cfg, "ln_final")(x_BSD)


class Decoder(nn.Module):
  """Target tokens and the encoder's output -> float32 logits [B, T, V]."""

  config: Seq2SeqConfig
  embed: nn.Embed

  @nn.compact
  def __call__(
      self, encoded_BSD, source_valid_BS, tokens_BT, positions_BT, *, train: bool, decode: bool
  ):
    cfg = self.config
    x_BTD = transformer.add_positions(
        cfg, _embed_tokens(cfg, self.embed, tokens_BT), positions_BT, cfg.max_len
    )
    x_BTD = nn.Dropout(cfg.dropout_rate)(x_BTD, deterministic=not train)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", "act_embed"))
    x_BTD = transformer.apply_blocks(
        cfg,
        x_BTD,
        None,
        positions_BT,
        causal=True,
        train=train,
        decode=decode,
        block_cls=CrossAttentionBlock,
        cross=(encoded_BSD, attention.Mask(valid_BS=source_valid_BS)),
    )
    return transformer.output_logits(cfg, transformer.make_norm(cfg, "ln_final")(x_BTD), self.embed)


def source_valid(input_lengths_B, source_len: int):
  """[B, S] True at each row's real source tokens."""
  return jnp.arange(source_len)[None, :] < input_lengths_B[:, None]


class TransformerSeq2Seq(nn.Module):
  """Encoder-decoder: `(inputs_BS, input_lengths_B, decoder_inputs_BT)` -> float32 logits
  [B, T, vocab]. Decoder position t sees decoder inputs up to t and every real source token (those
  past a row's input length are padding, which no query sees)."""

  config: Seq2SeqConfig
  is_seq2seq: ClassVar[bool] = True

  def setup(self):
    cfg = self.config
    self.embed = transformer.make_token_embed(cfg, cfg.vocab_size, "embed")
    if not cfg.share_embeddings:
      self.source_embed = transformer.make_token_embed(cfg, cfg.source_vocab, "source_embed")
    self.encoder = Encoder(cfg, self.embed if cfg.share_embeddings else self.source_embed)
    self.decoder_stack = Decoder(cfg, self.embed)

  def _check_lengths(self, source_len: int, target_len: int) -> None:
    cfg = self.config
    if source_len > cfg.source_len:
      raise UserError(
          f"the source has {source_len} tokens, more than the model's max_source_len="
          f"{cfg.source_len}; raise it (--model_override=max_source_len=N) or shorten the sources"
      )
    if target_len > cfg.max_len:
      raise UserError(
          f"the decoder input has {target_len} tokens, more than the model's max_len="
          f"{cfg.max_len}; raise it (--model_override=max_len=N) or shorten the targets"
      )

  def encode(self, inputs_BS, input_lengths_B, *, train: bool = False):
    """(encoder output [B, S, D], the source's valid positions [B, S])."""
    valid_BS = source_valid(input_lengths_B, inputs_BS.shape[1])
    return self.encoder(inputs_BS, valid_BS, train=train), valid_BS

  def decode(
      self,
      encoded_BSD,
      source_valid_BS,
      tokens_BT,
      positions_BT=None,
      *,
      train: bool = False,
      decode: bool = False,
  ):
    if positions_BT is None:
      positions_BT = jnp.arange(tokens_BT.shape[1])[None, :]
    return self.decoder_stack(
        encoded_BSD, source_valid_BS, tokens_BT, positions_BT, train=train, decode=decode
    )

  def __call__(
      self,
      inputs_BS,
      input_lengths_B,
      decoder_inputs_BT,
      *,
      train: bool = False,
      decode: bool = False,
  ):
    self._check_lengths(inputs_BS.shape[1], decoder_inputs_BT.shape[1])
    encoded_BSD, valid_BS = self.encode(inputs_BS, input_lengths_B, train=train)
    return self.decode(encoded_BSD, valid_BS, decoder_inputs_BT, train=train, decode=decode)

  @nn.nowrap
  def decoder(self, apply_model: nn.Module):
    """The decode interface (bigjax.sample, bigjax.beam): start(params, (inputs_BS,
    input_lengths_B)) encodes the source, fills the cross-attention caches and feeds eos_id at
    position 0; step(params, (cache, source_valid_BS), tokens_B1, position) feeds one token."""
    eos_id = self.config.eos_id

    def start(params, source):
      inputs_BS, input_lengths_B = source
      start_B1 = jnp.full((inputs_BS.shape[0], 1), eos_id, jnp.int32)
      init = functools.partial(apply_model.init, decode=True)  # decode stays a Python bool
      cache_shapes = jax.eval_shape(
          init, jax.random.PRNGKey(0), inputs_BS, input_lengths_B, start_B1
      )["cache"]
      cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache_shapes)
      logits_B1V, variables = apply_model.apply(
          {"params": params, "cache": cache},
          inputs_BS,
          input_lengths_B,
          start_B1,
          decode=True,
          mutable=["cache"],
      )
      valid_BS = source_valid(input_lengths_B, inputs_BS.shape[1])
      return logits_B1V[:, -1], (variables["cache"], valid_BS)

    def step(params, carry, tokens_B1, position):
      cache, valid_BS = carry
      logits_B1V, variables = apply_model.apply(
          {"params": params, "cache": cache},
          None,
          valid_BS,
          tokens_B1,
          position + jnp.arange(tokens_B1.shape[1])[None, :],
          decode=True,
          method="decode",
          mutable=["cache"],
      )
      return logits_B1V[:, -1], (variables["cache"], valid_BS)

    return start, step
