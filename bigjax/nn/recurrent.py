"""Recurrent layers: Elman RNN, LSTM and GRU cells run over time with `jax.lax.scan`.

Shapes: B batch, T time, D input width, H hidden size, G gates. Each layer projects the whole input
sequence through its input kernel in one matmul before the scan (the part that does not depend on
the previous state), so the scan body holds only the recurrent matmul.

Gate layouts (the G axis of the kernels and biases):
  rnn:  [candidate]                      h' = tanh(x Wx + h Wh + b)
  lstm: [input, forget, cell, output]    c' = s(f) c + s(i) tanh(g),  h' = s(o) tanh(c')
  gru:  [reset, update, candidate]       n = tanh(x Wn + bn + r (h Un + un)),  h' = (1 - z) n + z h
        (PyTorch/cuDNN convention: the reset gate applies after the recurrent matmul, which
        has its own bias u.)
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax import config_checks as checks
from bigjax.errors import UserError

CellKind = Literal["rnn", "lstm", "gru"]
NUM_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


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


def zero_carry(cell: CellKind, batch: int, hidden: int, dtype=jnp.float32):
  """The zero initial state: (c, h) for the LSTM, h for the others."""
  zeros = jnp.zeros((batch, hidden), dtype)
  return (zeros, zeros) if cell == "lstm" else zeros


def carry_output(cell: CellKind, carry):
  """The hidden state h that a carry exposes."""
  return carry[1] if cell == "lstm" else carry


def cell_step(cell: CellKind, carry, xproj_BGH, recurrent_HGH, recurrent_bias_GH):
  """One time step from the precomputed input projection; returns the new carry."""
  if cell == "lstm":
    c_BH, h_BH = carry
    gates_BGH = xproj_BGH + jnp.einsum("bh,hgk->bgk", h_BH, recurrent_HGH)
    i, f, g, o = (gates_BGH[:, k] for k in range(4))
    c_BH = nn.sigmoid(f) * c_BH + nn.sigmoid(i) * jnp.tanh(g)
    return c_BH, nn.sigmoid(o) * jnp.tanh(c_BH)
  if cell == "gru":
    h_BH = carry
    hproj_BGH = jnp.einsum("bh,hgk->bgk", h_BH, recurrent_HGH) + recurrent_bias_GH
    r = nn.sigmoid(xproj_BGH[:, 0] + hproj_BGH[:, 0])
    z = nn.sigmoid(xproj_BGH[:, 1] + hproj_BGH[:, 1])
    n = jnp.tanh(xproj_BGH[:, 2] + r * hproj_BGH[:, 2])
    return (1.0 - z) * n + z * h_BH
  if cell == "rnn":
    return jnp.tanh(xproj_BGH[:, 0] + jnp.einsum("bh,hgk->bgk", carry, recurrent_HGH)[:, 0])
  raise ValueError(f"unknown cell {cell!r}: use rnn, lstm or gru")


def _masked_scan(cell: CellKind, recurrent_HGH, recurrent_bias_GH, carry, xproj_TBGH, valid_TB):
  """The recurrence under plain autodiff: (final carry, outputs [T, B, H])."""

  def step(carry, inputs):
    xproj_BGH, valid_B = inputs
    new_carry = cell_step(cell, carry, xproj_BGH, recurrent_HGH, recurrent_bias_GH)
    # Padding steps keep the old state, so the final carry is the state at each true end.
    new_carry = jax.tree.map(
        lambda new, old: jnp.where(valid_B[:, None], new, old), new_carry, carry
    )
    return new_carry, jnp.where(valid_B[:, None], carry_output(cell, new_carry), 0.0)

  return jax.lax.scan(step, carry, (xproj_TBGH, valid_TB))


@jax.custom_vjp
def lstm_scan(recurrent_HGH, carry, xproj_TBGH, valid_TB):
  """The LSTM recurrence (as _masked_scan) with its backward written out. Under autodiff the
  scan's backward accumulates the recurrent kernel's gradient at every step (a [B, H] x [B, 4H]
  matmul with only B to contract, plus a full-kernel add) and copies its stacked residuals; here
  each backward step only propagates dh through the kernel, and the kernel's gradient is one
  matmul over all T x B steps after the loop."""
  return _lstm_scan_fwd(recurrent_HGH, carry, xproj_TBGH, valid_TB)[0]


# All four LSTM activations as one elementwise pass over the [B, 4, H] gates: sigmoid(z) =
# 0.5 tanh(0.5 z) + 0.5 and tanh(z) = 1 tanh(1 z) + 0, so a = tanh(scale z) scale + shift with a
# per-gate scale and shift. XLA's CPU backend otherwise emits a separate loop (and a slice of the
# gates) per activation plus a concatenation to save them; its derivative is just as uniform:
# da/dz = scale^2 - (a - shift)^2 (= a (1 - a) for a sigmoid gate, 1 - a^2 for the tanh gate).
# Both are computed in float32: in bfloat16, 0.5 tanh + 0.5 would round small sigmoids to zero
# and the derivative's difference would cancel.
_GATE_SCALE_G1 = np.array([0.5, 0.5, 1.0, 0.5], np.float32)[:, None]
_GATE_SHIFT_G1 = np.array([0.5, 0.5, 0.0, 0.5], np.float32)[:, None]


def _lstm_activations(gates_BGH):
  gates32_BGH = gates_BGH.astype(jnp.float32)
  return (jnp.tanh(gates32_BGH * _GATE_SCALE_G1) * _GATE_SCALE_G1 + _GATE_SHIFT_G1).astype(
      gates_BGH.dtype
  )


def _lstm_activations_grad(activations_BGH):
  activations32_BGH = activations_BGH.astype(jnp.float32)
  return (_GATE_SCALE_G1**2 - (activations32_BGH - _GATE_SHIFT_G1) ** 2).astype(
      activations_BGH.dtype
  )


def _lstm_scan_fwd(recurrent_HGH, carry, xproj_TBGH, valid_TB):
  def step(carry, inputs):
    c_BH, h_BH = carry
    xproj_BGH, valid_B1 = inputs[0], inputs[1][:, None]
    activations_BGH = _lstm_activations(xproj_BGH + jnp.einsum("bh,hgk->bgk", h_BH, recurrent_HGH))
    i, f, g, o = (activations_BGH[:, k] for k in range(4))
    new_c_BH = f * c_BH + i * g
    tanh_c_BH = jnp.tanh(new_c_BH)
    new_h_BH = o * tanh_c_BH
    carry_out = (jnp.where(valid_B1, new_c_BH, c_BH), jnp.where(valid_B1, new_h_BH, h_BH))
    saved = (c_BH, h_BH, activations_BGH, tanh_c_BH)
    return carry_out, (jnp.where(valid_B1, new_h_BH, 0.0), saved)

  final, (outputs_TBH, saved) = jax.lax.scan(step, carry, (xproj_TBGH, valid_TB))
  return (final, outputs_TBH), (recurrent_HGH, valid_TB, saved)


def _lstm_scan_bwd(residuals, cotangents):
  recurrent_HGH, valid_TB, saved = residuals
  (dc_final, dh_final), doutputs_TBH = cotangents
  hidden, gates, _ = recurrent_HGH.shape
  # Transposed once here: XLA does not hoist the loop-invariant transpose out of the loop body and
  # would copy the whole kernel at every step.
  recurrent_T_PH = recurrent_HGH.reshape(hidden, gates * hidden).T

  def step(carry, inputs):
    dc_BH, dh_BH = carry
    (c_BH, _, activations_BGH, tanh_c_BH), dout_BH, valid_B1 = (
        inputs[0],
        inputs[1],
        inputs[2][:, None],
    )
    i, f, g, o = (activations_BGH[:, k] for k in range(4))
    # A padding step passed the state through unchanged: its cotangent goes straight back.
    dnew_h = jnp.where(valid_B1, dh_BH + dout_BH, 0.0)
    dnew_c = jnp.where(valid_B1, dc_BH, 0.0) + dnew_h * o * (1.0 - tanh_c_BH**2)
    dactivations_BGH = jnp.stack(
        [dnew_c * g, dnew_c * c_BH, dnew_c * i, dnew_h * tanh_c_BH], axis=1
    )
    dgates_BGH = dactivations_BGH * _lstm_activations_grad(activations_BGH)
    dh_prev = dgates_BGH.reshape(dgates_BGH.shape[0], -1) @ recurrent_T_PH + jnp.where(
        valid_B1, 0.0, dh_BH
    )
    dc_prev = dnew_c * f + jnp.where(valid_B1, 0.0, dc_BH)
    return (dc_prev, dh_prev), dgates_BGH

  dcarry, dgates_TBGH = jax.lax.scan(
      step, (dc_final, dh_final), (saved, doutputs_TBH, valid_TB), reverse=True
  )
  # Steps and examples flattened into one contracting axis first: contracting (t, b) as two axes,
  # XLA transposed the whole [T, B, 4, H] gate gradient to (b, t) order before the matmul.
  h_prev_NH = saved[1].reshape(-1, hidden)
  drecurrent_HGH = (h_prev_NH.T @ dgates_TBGH.reshape(h_prev_NH.shape[0], -1)).reshape(
      recurrent_HGH.shape
  )
  drecurrent_HGH = drecurrent_HGH.astype(recurrent_HGH.dtype)
  return drecurrent_HGH, dcarry, dgates_TBGH, None


lstm_scan.defvjp(_lstm_scan_fwd, _lstm_scan_bwd)


class Recurrent(nn.Module):
  """One direction of one layer: runs a cell over [B, T, D] and returns ([B, T, H] outputs, final carry).

  With `lengths_B`, steps past a sequence's length leave its state unchanged and output zeros, so
  the final carry is the state at the true end; `reverse=True` runs each sequence from its true
  end back to its start (outputs stay aligned with the inputs).
  """

  cell: CellKind
  hidden_size: int
  forget_bias: float = (
      1.0  # initial forget-gate bias of the LSTM: remember by default (Jozefowicz et al. 2015)
  )
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BTD, lengths_B=None, initial_carry=None, *, reverse: bool = False):
    if self.cell not in NUM_GATES:
      raise UserError(f"unknown cell {self.cell!r}: use rnn, lstm or gru")
    batch, length, width = x_BTD.shape
    check_lengths(lengths_B, length)
    gates, hidden = NUM_GATES[self.cell], self.hidden_size
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
        nn.with_logical_partitioning(self._bias_init, (None, "mlp")),
        (gates, hidden),
        self.param_dtype,
    )
    recurrent_bias = None
    if self.cell == "gru":
      recurrent_bias = self.param(
          "recurrent_bias",
          nn.with_logical_partitioning(nn.initializers.zeros, (None, "mlp")),
          (gates, hidden),
          self.param_dtype,
      )
      recurrent_bias = recurrent_bias.astype(self.dtype)

    if lengths_B is None:
      lengths_B = jnp.full((batch,), length, jnp.int32)
    if reverse:
      x_BTD = reverse_within_lengths(x_BTD, lengths_B)
    xproj_BTGH = jnp.einsum(
        "btd,dgh->btgh", x_BTD.astype(self.dtype), input_kernel.astype(self.dtype)
    ) + bias.astype(self.dtype)
    valid_TB = jnp.arange(length)[:, None] < lengths_B[None, :]
    carry = (
        zero_carry(self.cell, batch, hidden, self.dtype) if initial_carry is None else initial_carry
    )
    recurrent_kernel = recurrent_kernel.astype(self.dtype)

    xproj_TBGH = xproj_BTGH.transpose(1, 0, 2, 3)
    if self.cell == "lstm":
      carry, outputs_TBH = lstm_scan(recurrent_kernel, tuple(carry), xproj_TBGH, valid_TB)
    else:
      carry, outputs_TBH = _masked_scan(
          self.cell, recurrent_kernel, recurrent_bias, carry, xproj_TBGH, valid_TB
      )
    outputs_BTH = outputs_TBH.transpose(1, 0, 2)
    if reverse:
      outputs_BTH = reverse_within_lengths(outputs_BTH, lengths_B)
    return outputs_BTH, carry

  def _bias_init(self, key, shape, dtype):
    bias = jnp.zeros(shape, dtype)
    if self.cell == "lstm":
      bias = bias.at[1].set(self.forget_bias)
    return bias


def _orthogonal_per_gate(key, shape, dtype):
  """An orthogonal [H, H] matrix for each gate: keeps the recurrence's gradient norm stable over time."""
  hidden, gates, _ = shape
  keys = jax.random.split(key, gates)
  return jnp.stack([nn.initializers.orthogonal()(k, (hidden, hidden), dtype) for k in keys], axis=1)


class RecurrentStack(nn.Module):
  """`num_layers` recurrent layers, optionally bidirectional (outputs concatenated), with dropout
  between layers. Returns ([B, T, H or 2H] outputs, final carries: one per layer and direction).

  `initial_carries`, if given, is a sequence like the returned carries (e.g. from a previous call,
  to continue decoding).
  """

  cell: CellKind
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

  cell: CellKind = "lstm"
  hidden_size: int
  num_layers: int = 1
  bidirectional: bool = False
  dropout_rate: float = 0.0
  forget_bias: float = 1.0
  max_len: int = 1024
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    checks.one_of(self, "cell", NUM_GATES)
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
      pooled = jnp.concatenate([carry_output(cfg.cell, c) for c in carries[-directions:]], axis=-1)
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
