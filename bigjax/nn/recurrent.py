"""Recurrent layers: cells (Elman RNN, LSTM, GRU, and any registered with `register_cell`) run
over time.

Shapes: B batch, T time, D input width, H hidden size, G gates. Each layer projects the whole input
sequence through its input kernel in one matmul before the scan (the part that does not depend on
the previous state), so the scan body holds only the recurrent matmul. Each cell class writes its
equations and its gate layout (the G axis of the kernels and biases); bigjax.ops.recurrent runs
them over time.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import config_checks as checks
from bigjax.errors import UserError
from bigjax.ops import recurrent as recurrent_ops


def check_lengths(lengths_B, padded_length: int) -> None:
  """Fails when a (concrete) length exceeds the padded length; traced lengths are not checked."""
  if lengths_B is None or isinstance(lengths_B, jax.core.Tracer):
    return
  longest = int(np.max(np.asarray(lengths_B)))
  if longest > padded_length:
    raise UserError(
        f"a sequence length of {longest} exceeds the padded length {padded_length}; "
        "lengths must count real steps only"
    )


def reverse_within_lengths(x_BT, lengths_B):
  """Reverses each sequence's first `length` steps and leaves its padding in place, so that a
  backward pass starts at every sequence's true end. Applying it twice restores the input."""
  length = x_BT.shape[1]
  t = jnp.arange(length)[None, :]
  source_BT = jnp.where(t < lengths_B[:, None], lengths_B[:, None] - 1 - t, t)
  return jnp.take_along_axis(
      x_BT, source_BT.reshape(source_BT.shape + (1,) * (x_BT.ndim - 2)), axis=1
  )


class Cell:
  """A recurrent cell, behind the interface Recurrent uses: one class and a `register_cell` make a
  new cell available to every recurrent model (`cell=NAME` in its config).

  The layer owns the input kernel [D, G, H], bias [G, H] and recurrent kernel [H, G, H]; a cell
  says how many gates G it has, may add parameters of its own (`extra_params`), and computes one
  step from the precomputed input projection. `scan` runs it over time (the reference scan unless
  the cell has a fast path).
  """

  num_gates: ClassVar[int]

  def zero_carry(self, batch: int, hidden: int, dtype):
    return jnp.zeros((batch, hidden), dtype)

  def output(self, carry):
    """The hidden state h that a carry exposes."""
    return carry

  def bias_init(self, forget_bias: float):
    del forget_bias  # the LSTM's only
    return nn.initializers.zeros

  def extra_params(self, layer: nn.Module, gates: int, hidden: int) -> dict:
    """Parameters beyond the layer's three, created on `layer` (with layer.param)."""
    del layer, gates, hidden
    return {}

  def step(self, carry, xproj_BGH, recurrent_HGH, extra: dict):
    """The new carry after one time step."""
    raise NotImplementedError

  def scan(self, carry, xproj_TBGH, valid_TB, recurrent_HGH, extra: dict):
    """(final carry, outputs [T, B, H]) over all steps (see bigjax.ops.recurrent)."""
    step = lambda carry, xproj_BGH: self.step(carry, xproj_BGH, recurrent_HGH, extra)
    return recurrent_ops.masked_scan(step, self.output, carry, xproj_TBGH, valid_TB)


_CELLS: dict[str, Cell] = {}


def register_cell(name: str):
  """Class decorator adding a Cell subclass under `name` (for `cell=name` in a config)."""

  def add(cell_cls: type[Cell]) -> type[Cell]:
    if name in _CELLS:
      raise ValueError(
          f"cell {name!r} is already registered (by {type(_CELLS[name]).__qualname__})"
      )
    if not (isinstance(cell_cls, type) and issubclass(cell_cls, Cell)):
      raise TypeError(
          f"register_cell({name!r}) takes a subclass of recurrent.Cell, got {cell_cls!r}"
      )
    _CELLS[name] = cell_cls()
    return cell_cls

  return add


def cell_names() -> list[str]:
  return sorted(_CELLS)


def get_cell(name: str) -> Cell:
  if name not in _CELLS:
    raise UserError(
        f"unknown cell {name!r}: use one of {', '.join(cell_names())} (a cell of your own needs "
        "register_cell, in a module --import_modules imports)"
    )
  return _CELLS[name]


def _recurrent_matmul(h_BH, recurrent_HGH):
  return jnp.einsum("bh,hgk->bgk", h_BH, recurrent_HGH)


@register_cell("rnn")
class ElmanCell(Cell):
  """h' = tanh(x Wx + h Wh + b)."""

  num_gates = 1

  def step(self, carry, xproj_BGH, recurrent_HGH, extra):
    return jnp.tanh(xproj_BGH[:, 0] + _recurrent_matmul(carry, recurrent_HGH)[:, 0])


@register_cell("lstm")
class LSTMCell(Cell):
  """Gates [input, forget, cell, output]: c' = s(f) c + s(i) tanh(g), h' = s(o) tanh(c').
  The carry is (c, h); the forget gate's bias starts at `forget_bias`."""

  num_gates = 4

  def zero_carry(self, batch, hidden, dtype):
    zeros = jnp.zeros((batch, hidden), dtype)
    return zeros, zeros

  def output(self, carry):
    return carry[1]

  def bias_init(self, forget_bias):
    def init(key, shape, dtype):
      del key
      return jnp.zeros(shape, dtype).at[1].set(forget_bias)

    return init

  def step(self, carry, xproj_BGH, recurrent_HGH, extra):
    c_BH, h_BH = carry
    gates_BGH = xproj_BGH + _recurrent_matmul(h_BH, recurrent_HGH)
    i, f, g, o = (gates_BGH[:, k] for k in range(4))
    c_BH = nn.sigmoid(f) * c_BH + nn.sigmoid(i) * jnp.tanh(g)
    return c_BH, nn.sigmoid(o) * jnp.tanh(c_BH)

  def scan(self, carry, xproj_TBGH, valid_TB, recurrent_HGH, extra):
    # The fast path: the same recurrence with its backward written out (bigjax.ops.recurrent).
    return recurrent_ops.lstm_scan(recurrent_HGH, tuple(carry), xproj_TBGH, valid_TB)


@register_cell("gru")
class GRUCell(Cell):
  """Gates [reset, update, candidate]: n = tanh(x Wn + bn + r (h Un + un)), h' = (1 - z) n + z h,
  the PyTorch/cuDNN convention: the reset gate applies after the recurrent matmul, which has its
  own bias u (`recurrent_bias`)."""

  num_gates = 3

  def extra_params(self, layer, gates, hidden):
    bias = layer.param(
        "recurrent_bias",
        nn.with_logical_partitioning(nn.initializers.zeros, (None, "mlp")),
        (gates, hidden),
        layer.param_dtype,
    )
    return {"recurrent_bias": bias.astype(layer.dtype)}

  def step(self, carry, xproj_BGH, recurrent_HGH, extra):
    hproj_BGH = _recurrent_matmul(carry, recurrent_HGH) + extra["recurrent_bias"]
    r = nn.sigmoid(xproj_BGH[:, 0] + hproj_BGH[:, 0])
    z = nn.sigmoid(xproj_BGH[:, 1] + hproj_BGH[:, 1])
    n = jnp.tanh(xproj_BGH[:, 2] + r * hproj_BGH[:, 2])
    return (1.0 - z) * n + z * carry


class Recurrent(nn.Module):
  """One direction of one layer: runs a cell over [B, T, D] and returns ([B, T, H] outputs, final carry).

  With `lengths_B`, steps past a sequence's length leave its state unchanged and output zeros, so
  the final carry is the state at the true end; `reverse=True` runs each sequence from its true
  end back to its start (outputs stay aligned with the inputs).
  """

  cell: str  # a registered Cell's name (register_cell)
  hidden_size: int
  # The LSTM's initial forget-gate bias: remember by default (Jozefowicz et al. 2015).
  forget_bias: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, lengths_B=None, initial_carry=None, *, reverse: bool = False):
    cell = get_cell(self.cell)
    batch, length, width = x_BTD.shape
    check_lengths(lengths_B, length)
    gates, hidden = cell.num_gates, self.hidden_size
    input_kernel = self.param(
        "input_kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axis=0, out_axis=(1, 2)),
            ("embed", None, "mlp"),
        ),
        (width, gates, hidden),
        self.param_dtype,
    )
    recurrent_kernel = self.param(
        "recurrent_kernel",
        nn.with_logical_partitioning(_orthogonal_per_gate, (None, None, "mlp")),
        (hidden, gates, hidden),
        self.param_dtype,
    )
    bias = self.param(
        "bias",
        nn.with_logical_partitioning(cell.bias_init(self.forget_bias), (None, "mlp")),
        (gates, hidden),
        self.param_dtype,
    )
    extra = cell.extra_params(self, gates, hidden)

    if lengths_B is None:
      lengths_B = jnp.full((batch,), length, jnp.int32)
    if reverse:
      x_BTD = reverse_within_lengths(x_BTD, lengths_B)
    xproj_BTGH = jnp.einsum(
        "btd,dgh->btgh", x_BTD.astype(self.dtype), input_kernel.astype(self.dtype)
    ) + bias.astype(self.dtype)
    valid_TB = jnp.arange(length)[:, None] < lengths_B[None, :]
    if initial_carry is None:
      initial_carry = cell.zero_carry(batch, hidden, self.dtype)
    carry, outputs_TBH = cell.scan(
        initial_carry,
        xproj_BTGH.transpose(1, 0, 2, 3),
        valid_TB,
        recurrent_kernel.astype(self.dtype),
        extra,
    )
    outputs_BTH = outputs_TBH.transpose(1, 0, 2)
    if reverse:
      outputs_BTH = reverse_within_lengths(outputs_BTH, lengths_B)
    return outputs_BTH, carry


def _orthogonal_per_gate(key, shape, dtype):
  """An orthogonal [H, H] matrix for each gate: keeps the recurrence's gradient norm stable over time.
  Drawn in float32 and cast: the QR behind it has no bfloat16 kernel on the CPU."""
  hidden, gates, _ = shape
  keys = jax.random.split(key, gates)
  orthogonal = nn.initializers.orthogonal()
  return jnp.stack([orthogonal(k, (hidden, hidden), jnp.float32) for k in keys], axis=1).astype(
      dtype
  )


class RecurrentStack(nn.Module):
  """`num_layers` recurrent layers, optionally bidirectional (outputs concatenated), with dropout
  between layers. Returns ([B, T, H or 2H] outputs, final carries: one per layer and direction).

  `initial_carries`, if given, is a sequence like the returned carries (e.g. from a previous call,
  to continue decoding).
  """

  cell: str
  hidden_size: int
  num_layers: int = 1
  bidirectional: bool = False
  dropout_rate: float = 0.0
  forget_bias: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(
      self, x_BTD, lengths_B=None, initial_carries: Sequence | None = None, *, train: bool = False
  ):
    directions = (False, True) if self.bidirectional else (False,)
    expected = self.num_layers * len(directions)
    if initial_carries is not None and len(initial_carries) != expected:
      raise UserError(
          f"got {len(initial_carries)} initial states, expected {expected} "
          f"({self.num_layers} layers x {len(directions)} directions)"
      )
    carries = []
    for layer in range(self.num_layers):
      if layer > 0:
        x_BTD = nn.Dropout(self.dropout_rate)(x_BTD, deterministic=not train)
      outputs = []
      for reverse in directions:
        name = f"layer{layer}_{'backward' if reverse else 'forward'}"
        initial = None if initial_carries is None else initial_carries[len(carries)]
        out_BTH, carry = Recurrent(
            self.cell, self.hidden_size, self.forget_bias, self.dtype, self.param_dtype, name=name
        )(x_BTD, lengths_B, initial, reverse=reverse)
        outputs.append(out_BTH)
        carries.append(carry)
      x_BTD = jnp.concatenate(outputs, axis=-1) if len(outputs) > 1 else outputs[0]
      x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "length", None))
    return x_BTD, tuple(carries)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNConfig:
  """The recurrent part shared by the language model and the classifier."""

  cell: str = "lstm"  # a registered Cell's name
  hidden_size: int
  num_layers: int = 1
  bidirectional: bool = False
  dropout_rate: float = 0.0
  forget_bias: float = 1.0
  max_len: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    checks.one_of(self, "cell", cell_names())
    checks.positive_int(self, "hidden_size")
    checks.positive_int(self, "num_layers")
    checks.boolean(self, "bidirectional")
    checks.fraction(self, "dropout_rate")
    checks.finite_number(self, "forget_bias")
    checks.positive_int(self, "max_len")
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")

  def stack(self, name: str = "rnn") -> RecurrentStack:
    return RecurrentStack(
        self.cell,
        self.hidden_size,
        self.num_layers,
        self.bidirectional,
        self.dropout_rate,
        self.forget_bias,
        jnp.dtype(self.dtype),
        jnp.dtype(self.param_dtype),
        name=name,
    )

  def check_length(self, length: int) -> None:
    if length > self.max_len:
      raise UserError(
          f"sequence length {length} exceeds the model's max_len={self.max_len}; "
          "raise max_len or shorten the sequences"
      )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNLMConfig(RNNConfig):
  vocab_size: int
  embed_dim: int
  tie_embeddings: bool = False  # needs embed_dim == hidden_size

  def __post_init__(self):
    super().__post_init__()
    checks.positive_int(self, "vocab_size")
    checks.positive_int(self, "embed_dim")
    checks.boolean(self, "tie_embeddings")
    if self.bidirectional:
      checks.fail(
          self, "bidirectional=True cannot be a language model: it would see the tokens it predicts"
      )
    if self.tie_embeddings and self.embed_dim != self.hidden_size:
      checks.fail(
          self,
          f"tie_embeddings=True needs embed_dim={self.embed_dim} == "
          f"hidden_size={self.hidden_size}",
      )


class RNNLM(nn.Module):
  """Embedding, stacked recurrent layers, float32 logits [B, T, vocab].

  With `return_state=True` it also returns the final carries, which `initial_state` accepts to
  continue from where a previous call stopped (decoding one token at a time).
  """

  config: RNNLMConfig
  # It reads a packed window as one stream, its state running across documents' ends, as intended.
  takes_segment_ids: ClassVar[bool] = False

  @nn.nowrap
  def decoder(self, apply_model: nn.Module):
    """bigjax.sample's decode interface: (start, step) running `apply_model` (this model, or a
    wrapper that computes as it does), the recurrent state as the carry."""

    def start(params, prompt_BP):
      logits, state = apply_model.apply({"params": params}, prompt_BP, return_state=True)
      return logits[:, -1], state

    def step(params, state, tokens_BT, start_position):
      del start_position  # the state carries it
      logits, state = apply_model.apply(
          {"params": params}, tokens_BT, initial_state=state, return_state=True
      )
      return logits[:, -1], state

    return start, step

  @nn.compact
  def __call__(
      self, tokens_BT, *, initial_state=None, return_state: bool = False, train: bool = False
  ):
    cfg = self.config
    cfg.check_length(tokens_BT.shape[1])
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = nn.Embed(
        cfg.vocab_size,
        cfg.embed_dim,
        dtype=dtype,
        param_dtype=param_dtype,
        name="token_embed",
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.1), ("vocab", "embed")
        ),
    )
    x_BTD = nn.Dropout(cfg.dropout_rate)(embed(tokens_BT), deterministic=not train)
    h_BTH, state = cfg.stack()(x_BTD, None, initial_state, train=train)
    h_BTH = nn.Dropout(cfg.dropout_rate)(h_BTH, deterministic=not train)
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum(
          "bth,vh->btv",
          h_BTH,
          embed.embedding.astype(h_BTH.dtype),
          preferred_element_type=jnp.float32,
      )
    else:
      logits_BTV = nn.Dense(
          cfg.vocab_size,
          dtype=jnp.float32,
          param_dtype=param_dtype,
          name="head",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("mlp", "vocab")
          ),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
      )(h_BTH)
    return (logits_BTV, state) if return_state else logits_BTV


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNClassifierConfig(RNNConfig):
  """Classifies [B, T, D] sequences; an image [B, H, W, C] is read row by row (T = H, D = W * C)."""

  num_classes: int
  input_shape: tuple[int, ...]
  pool: Literal["last", "mean"] = "last"  # final state(s), or the mean output over real steps

  def __post_init__(self):
    super().__post_init__()
    checks.positive_int(self, "num_classes")
    checks.positive_ints(
        self, "input_shape", nonempty=True, meaning="steps, then the features of each step"
    )
    checks.one_of(self, "pool", ("last", "mean"))
    if self.input_shape[0] > self.max_len:
      checks.fail(
          self,
          f"input_shape={tuple(self.input_shape)} has {self.input_shape[0]} steps, more than "
          f"max_len={self.max_len}; raise max_len",
      )


class RNNClassifier(nn.Module):
  config: RNNClassifierConfig

  @nn.compact
  def __call__(self, inputs, lengths_B=None, *, train: bool = False):
    cfg = self.config
    if tuple(inputs.shape[1:]) != tuple(cfg.input_shape):
      raise UserError(
          f"inputs have shape {tuple(inputs.shape)} but the model expects "
          f"[batch, {', '.join(map(str, cfg.input_shape))}]; set the model's input_shape "
          f"(--model_override='input_shape={tuple(inputs.shape[1:])}')"
      )
    x_BTD = inputs.reshape(inputs.shape[0], inputs.shape[1], -1).astype(jnp.dtype(cfg.dtype))
    cfg.check_length(x_BTD.shape[1])
    h_BTH, carries = cfg.stack()(x_BTD, lengths_B, train=train)
    if cfg.pool == "last":
      # The top layer's final state in each direction: forward at the true end, backward at the start.
      directions = 2 if cfg.bidirectional else 1
      output = get_cell(cfg.cell).output
      pooled = jnp.concatenate([output(c) for c in carries[-directions:]], axis=-1)
    else:
      length = x_BTD.shape[1]
      lengths = jnp.full((x_BTD.shape[0],), length) if lengths_B is None else lengths_B
      valid_BT1 = (jnp.arange(length)[None, :] < lengths[:, None])[..., None]
      pooled = jnp.sum(h_BTH * valid_BT1, axis=1) / jnp.maximum(lengths[:, None], 1)
    pooled = nn.Dropout(cfg.dropout_rate)(pooled, deterministic=not train)
    return nn.Dense(
        cfg.num_classes,
        dtype=jnp.float32,
        param_dtype=jnp.dtype(cfg.param_dtype),
        name="head",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "classes")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
    )(pooled)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RNNSeq2SeqConfig(RNNConfig):
  """An RNN encoder-decoder with global attention. The RNNConfig fields set both RNNs, except that
  `bidirectional` applies to the encoder only (the decoder reads left to right) and
  `decoder_layers` may give the decoder its own depth; max_len bounds the decoder inputs T and
  max_source_len the source S."""

  vocab_size: int  # the target side's
  source_vocab_size: int | None = None  # None: vocab_size
  embed_dim: int
  share_embeddings: bool = True  # one table for both sides; needs equal vocabularies
  eos_id: int = 0  # the decoder's start token and every target's end
  max_source_len: int | None = None  # None: max_len
  # "additive": v^T tanh(W_q h_t + W_k e_s + b) (Bahdanau et al. 2015); "dot": h_t^T W e_s
  # (Luong et al. 2015's "general" score).
  attention: Literal["additive", "dot"] = "additive"
  attention_dim: int | None = None  # the additive score's width; None: hidden_size
  decoder_layers: int | None = None  # None: num_layers

  def __post_init__(self):
    super().__post_init__()
    checks.positive_int(self, "vocab_size")
    checks.optional_positive_int(self, "source_vocab_size")
    checks.positive_int(self, "embed_dim")
    checks.boolean(self, "share_embeddings")
    checks.nonnegative_int(self, "eos_id")
    checks.optional_positive_int(self, "max_source_len")
    checks.one_of(self, "attention", ("additive", "dot"))
    checks.optional_positive_int(self, "attention_dim")
    checks.optional_positive_int(self, "decoder_layers")
    if self.eos_id >= self.vocab_size:
      checks.fail(
          self,
          f"eos_id={self.eos_id} must be below vocab_size={self.vocab_size} "
          "(the end token is a target token)",
      )
    if self.share_embeddings and self.resolved_source_vocab_size != self.vocab_size:
      checks.fail(
          self,
          f"share_embeddings=True needs source_vocab_size={self.source_vocab_size} == "
          f"vocab_size={self.vocab_size}; set share_embeddings=False or make them equal",
      )
    if self.attention == "dot" and self.attention_dim is not None:
      checks.fail(
          self,
          f"attention_dim={self.attention_dim} sets the additive score's width; attention='dot' "
          "has none (leave attention_dim=None)",
      )

  @property
  def resolved_source_vocab_size(self) -> int:
    return self.vocab_size if self.source_vocab_size is None else self.source_vocab_size

  @property
  def resolved_max_source_len(self) -> int:
    return self.max_len if self.max_source_len is None else self.max_source_len

  @property
  def resolved_attention_dim(self) -> int:
    return self.hidden_size if self.attention_dim is None else self.attention_dim

  @property
  def resolved_decoder_layers(self) -> int:
    return self.num_layers if self.decoder_layers is None else self.decoder_layers

  def check_source_length(self, length: int) -> None:
    if length > self.resolved_max_source_len:
      raise UserError(
          f"source length {length} exceeds the model's max_source_len="
          f"{self.resolved_max_source_len}; raise max_source_len or shorten the inputs"
      )

  def check_length(self, length: int) -> None:
    if length > self.max_len:
      raise UserError(
          f"decoder input length {length} exceeds the model's max_len={self.max_len}; "
          "raise max_len or shorten the targets"
      )


class RNNSeq2Seq(nn.Module):
  """An RNN encoder-decoder with global attention (Luong et al. 2015), without input feeding, so
  that a teacher-forced pass runs the decoder RNN over the whole target at once.

  The encoder (bidirectional if configured) reads the embedded source into states e_BSE (E = H,
  or 2H when bidirectional). Each decoder layer starts from tanh(W e_final + b), e_final being
  the top encoder layer's final output (both directions' concatenated): the projection has a
  slice for every part of the cell's carry (an LSTM's c and h), so any registered cell works.
  The decoder RNN reads the embedded decoder inputs into h_BTH; each h_t attends over the real
  source positions only (a padded position's weight is exactly 0), giving the context c_t; the
  attentional state tanh(W_c [c_t; h_t] + b_c), after dropout, gives float32 logits [B, T, V].

  With `return_state=True` it also returns the decoding state: the encoder states, their keys
  projection (computed once per source), the source lengths and the decoder RNN's carries, each
  with the batch on axis 0. Given back as `state`, decoding continues from there without the
  source (pass None for it): that is what `decoder` does.
  """

  config: RNNSeq2SeqConfig
  is_seq2seq: ClassVar[bool] = True

  def setup(self):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def embed(vocab_size, name):
      return nn.Embed(
          vocab_size,
          cfg.embed_dim,
          dtype=dtype,
          param_dtype=param_dtype,
          name=name,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(stddev=0.1), ("vocab", "embed")
          ),
      )

    def dense(features, name, *, use_bias=True, out_axis="mlp", out_dtype=dtype):
      return nn.Dense(
          features,
          use_bias=use_bias,
          dtype=out_dtype,
          param_dtype=param_dtype,
          name=name,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("embed" if out_axis == "mlp" else "mlp", out_axis)
          ),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
      )

    self.token_embed = embed(cfg.vocab_size, "token_embed")  # the target side's, or both's
    if not cfg.share_embeddings:
      self.source_embed = embed(cfg.resolved_source_vocab_size, "source_embed")
    self.encoder_rnn = cfg.stack("encoder_rnn")
    self.decoder_rnn = RecurrentStack(
        cfg.cell,
        cfg.hidden_size,
        cfg.resolved_decoder_layers,
        False,
        cfg.dropout_rate,
        cfg.forget_bias,
        dtype,
        param_dtype,
        name="decoder_rnn",
    )
    width = sum(int(np.prod(part.shape[1:])) for part in jax.tree.leaves(self._carry_template()))
    self.bridges = [
        dense(width, f"bridge_layer{layer}") for layer in range(cfg.resolved_decoder_layers)
    ]
    if cfg.attention == "additive":
      attention_dim = cfg.resolved_attention_dim
      self.attention_query = dense(attention_dim, "attention_query", use_bias=False)
      self.attention_key = dense(attention_dim, "attention_key")
      self.attention_v = self.param(
          "attention_v",
          nn.with_logical_partitioning(
              nn.initializers.normal(stddev=attention_dim**-0.5), ("mlp",)
          ),
          (attention_dim,),
          param_dtype,
      )
    else:
      # h^T b would shift every source position's score equally: a bias has no effect.
      self.attention_key = dense(cfg.hidden_size, "attention_key", use_bias=False)
    self.attention_out = dense(cfg.hidden_size, "attention_out")
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.head = dense(cfg.vocab_size, "head", out_axis="vocab", out_dtype=jnp.float32)

  @nn.nowrap
  def decoder(self, apply_model: nn.Module):
    """The seq2seq decode interface: (start, step) running `apply_model` (this model, or a wrapper
    that computes as it does, such as a Lora: both go through its __call__), the decoding state
    (see the class docstring) as the carry. start(params, (inputs_BS, input_lengths_B)) encodes
    the source and feeds eos_id; step(params, carry, tokens_B1, position) feeds tokens_B1 (the
    position is in the carried RNN state)."""
    eos_id = self.config.eos_id

    def start(params, source):
      inputs_BS, input_lengths_B = source
      start_B1 = jnp.full((inputs_BS.shape[0], 1), eos_id, jnp.int32)
      logits_B1V, state = apply_model.apply(
          {"params": params}, inputs_BS, input_lengths_B, start_B1, return_state=True
      )
      return logits_B1V[:, -1], state

    def step(params, state, tokens_B1, position):
      del position  # the state carries it
      logits_B1V, state = apply_model.apply(
          {"params": params}, None, None, tokens_B1, state=state, return_state=True
      )
      return logits_B1V[:, -1], state

    return start, step

  def __call__(
      self,
      inputs_BS,
      input_lengths_B,
      decoder_inputs_BT,
      *,
      state=None,
      return_state: bool = False,
      train: bool = False,
  ):
    """Float32 logits [B, T, V] for the decoder inputs (a start token, then target tokens) given
    the source (None: every position real), and the decoding state with `return_state`."""
    if state is None:
      state = self.encode(inputs_BS, input_lengths_B, train=train)
    logits_BTV, state = self.decode(state, decoder_inputs_BT, train=train)
    return (logits_BTV, state) if return_state else logits_BTV

  def encode(self, inputs_BS, input_lengths_B=None, *, train: bool = False):
    """The decoding state before the first decoder input."""
    cfg = self.config
    batch, length = inputs_BS.shape
    cfg.check_source_length(length)
    if input_lengths_B is None:
      input_lengths_B = jnp.full((batch,), length, jnp.int32)
    embed = self.token_embed if cfg.share_embeddings else self.source_embed
    x_BSD = self.dropout(embed(inputs_BS), deterministic=not train)
    memory_BSE, carries = self.encoder_rnn(x_BSD, input_lengths_B, train=train)
    # The top layer's final state in each direction: forward at the true end, backward at the start.
    output = get_cell(cfg.cell).output
    directions = 2 if cfg.bidirectional else 1
    final_BF = jnp.concatenate([output(c) for c in carries[-directions:]], axis=-1)
    return {
        "memory": memory_BSE,
        "keys": self.attention_key(memory_BSE),
        "lengths": jnp.asarray(input_lengths_B, jnp.int32),
        "rnn": tuple(self._initial_carry(bridge, final_BF) for bridge in self.bridges),
    }

  @nn.nowrap
  def _carry_template(self):
    """One example's carry of the cell, as shapes: the bridge projects to each of its parts."""
    cfg = self.config
    cell = get_cell(cfg.cell)
    return jax.eval_shape(lambda: cell.zero_carry(1, cfg.hidden_size, jnp.dtype(cfg.dtype)))

  def _initial_carry(self, bridge: nn.Module, final_BF):
    template = self._carry_template()
    structure, parts = jax.tree.structure(template), jax.tree.leaves(template)
    projected_BW = jnp.tanh(bridge(final_BF))
    sizes = [int(np.prod(part.shape[1:])) for part in parts]
    pieces = jnp.split(projected_BW, np.cumsum(sizes)[:-1], axis=-1)
    leaves = [
        piece.reshape((final_BF.shape[0],) + part.shape[1:]).astype(part.dtype)
        for piece, part in zip(pieces, parts, strict=True)
    ]
    return jax.tree.unflatten(structure, leaves)

  def decode(self, state, decoder_inputs_BT, *, train: bool = False):
    """(float32 logits [B, T, V], the state after them) for decoder inputs fed after `state`."""
    cfg = self.config
    cfg.check_length(decoder_inputs_BT.shape[1])
    y_BTD = self.dropout(self.token_embed(decoder_inputs_BT), deterministic=not train)
    h_BTH, carries = self.decoder_rnn(y_BTD, None, state["rnn"], train=train)
    memory_BSE, keys_BSK = state["memory"], state["keys"]
    if cfg.attention == "additive":
      query_BTK = self.attention_query(h_BTH)
      hidden_BTSK = jnp.tanh(query_BTK[:, :, None, :] + keys_BSK[:, None, :, :])
      scores_BTS = jnp.einsum(
          "btsk,k->bts",
          hidden_BTSK,
          self.attention_v.astype(hidden_BTSK.dtype),
          preferred_element_type=jnp.float32,
      )
    else:
      scores_BTS = jnp.einsum("bth,bsh->bts", h_BTH, keys_BSK, preferred_element_type=jnp.float32)
    valid_B1S = (jnp.arange(memory_BSE.shape[1])[None, :] < state["lengths"][:, None])[:, None]
    # The most negative float32 underflows exp to 0: a padded position's weight is exactly 0, and
    # so is its gradient, while a source with no real position (a filler row) gets a uniform
    # softmax rather than NaN.
    masked_BTS = jnp.where(valid_B1S, scores_BTS, float(jnp.finfo(jnp.float32).min))
    weights_BTS = jax.nn.softmax(masked_BTS, axis=-1)
    context_BTE = jnp.einsum("bts,bse->bte", weights_BTS.astype(memory_BSE.dtype), memory_BSE)
    attended_BTH = jnp.tanh(self.attention_out(jnp.concatenate([context_BTE, h_BTH], axis=-1)))
    attended_BTH = self.dropout(attended_BTH, deterministic=not train)
    return self.head(attended_BTH), {**state, "rnn": carries}
