"""What a model is trained to do: its loss on a batch, as additive sums, and the metrics they give.

A task's `loss_sums` returns sums that add up over batches, steps and devices (loss summed over
targets, target count, ...), so the train loop can average them over any interval and evaluation
over any number of batches without a task-specific branch. `Task` writes the interface down; a
fork's task is any class that has its members (no base class to inherit).
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import optax

from bigjax import config_checks as checks
from bigjax.errors import UserError

# What every task's sums hold: "loss" (the plain loss, which is reported), "objective" (what training
# differentiates: the loss with label smoothing and the z-loss term when they are on) and "count"
# (what both are summed over: gradients and reported means divide by it).
REQUIRED_SUMS = ("loss", "objective", "count")


class Task(Protocol):
  """The interface the train loop, evaluation and checkpointing use.

  Attributes:
    unit: what the speed counts, per second ("tokens", "images").
    higher_is_better: the names of the metrics (as `metrics` returns them) that are better when
      higher, such as "accuracy"; every other metric is better lower. --keep_best_metric reads it.
  """

  unit: str
  higher_is_better: ClassVar[frozenset[str]]

  def init(self, model, rng, batch) -> Mapping[str, Any]:
    """The model's variables, initialised on inputs shaped like `batch`'s."""
    ...

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    """(sums, updated model state): sums over the batch's examples, holding REQUIRED_SUMS and any
    others `metrics` needs, each additive over batches and devices."""
    ...

  def metrics(self, sums) -> dict[str, float]:
    """The reported metrics (means) from sums added over any number of batches."""
    ...


# name -> a callable taking the experiment's own task (LanguageModelling for experiments.transformer,
# Classification for experiments.cnn) and returning the task to train with (--task=NAME).
_TASKS: dict[str, Callable[[Any], Task]] = {}


def register(name: str):
  """Decorator adding a task under `name` for `--task=NAME`: a class (or function) called with the
  experiment's own task, which it may keep to reuse (its init, its metrics, its token bytes)."""

  def add(make: Callable[[Any], Task]):
    if name in _TASKS:
      raise ValueError(f"task {name!r} is already registered (by {_TASKS[name].__qualname__})")
    _TASKS[name] = make
    return make

  return add


def names() -> list[str]:
  return sorted(_TASKS)


def check_registered(name: str) -> None:
  if name not in _TASKS:
    known = f"registered tasks: {', '.join(names())}" if _TASKS else "no task is registered"
    raise UserError(
        f"unknown task {name!r}; {known} (a task registered in a module of your own needs that "
        f"module imported first: --import_modules=MODULE)"
    )


def create(name: str, default) -> Task:
  """The task registered under `name`, made from the experiment's own task `default`."""
  check_registered(name)
  return _TASKS[name](default)


def checked_sums(task, sums) -> dict:
  """`sums` when it holds REQUIRED_SUMS, else a one-line error naming the task and what is missing."""
  missing = [name for name in REQUIRED_SUMS if name not in sums]
  if missing:
    raise UserError(
        f"{type(task).__name__}.loss_sums returned sums without {', '.join(missing)}; every task's "
        f"sums hold {', '.join(REQUIRED_SUMS)} (bigjax.tasks.Task)"
    )
  return sums


def higher_is_better(task, metric: str) -> bool:
  """Whether `metric` ("eval_accuracy", "train_loss", "accuracy") is better higher for `task`."""
  name = metric.removeprefix("eval_").removeprefix("train_")
  better = getattr(task, "higher_is_better", frozenset())
  # A mixture source's own metric (accuracy_0_digits) goes the way of the metric it is one of
  return name in better or any(name.startswith(f"{m}_") for m in better)


@dataclasses.dataclass(frozen=True)
class Losses:
  """What training minimises beside the plain cross-entropy (reported either way).

  Attributes:
    label_smoothing: the target distribution puts 1 - e on the label and e spread evenly over all
      classes (Szegedy et al. 2016), so the trained loss is (1 - e) CE + e mean_v(-log p_v).
    z_loss: weight of log(Z)^2, Z the softmax normaliser, added per target (PaLM; MaxText's
      z_loss_multiplier): it keeps the logits from drifting, 1e-4 in PaLM.
  """

  label_smoothing: float = 0.0
  z_loss: float = 0.0

  def __post_init__(self):
    checks.fraction(self, "label_smoothing")
    checks.nonnegative_number(self, "z_loss")


def _cross_entropy_sums(logits_NV, labels_N, weights_N, losses: Losses) -> dict:
  """ "loss" and "objective" summed over N predictions with their weights, and the log(Z)^2 sum when
  the z-loss is on (reported as its mean)."""
  logits_NV = logits_NV.astype(jnp.float32)
  plain_N = optax.softmax_cross_entropy_with_integer_labels(logits_NV, labels_N)
  sums = {"loss": jnp.sum(plain_N * weights_N)}
  if not (losses.label_smoothing or losses.z_loss):
    return {**sums, "objective": sums["loss"]}
  log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
  objective_N = plain_N
  if losses.label_smoothing:
    uniform_N = log_z_N - jnp.mean(logits_NV, axis=-1)  # mean over classes of -log p_v
    objective_N = (1 - losses.label_smoothing) * plain_N + losses.label_smoothing * uniform_N
  if losses.z_loss:
    sums["log_z_squared"] = jnp.sum(jnp.square(log_z_N) * weights_N)
    objective_N = objective_N + losses.z_loss * jnp.square(log_z_N)
  return {**sums, "objective": jnp.sum(objective_N * weights_N)}


def _source_sums(names: tuple[str, ...], source_B, logits_BxV, labels_Bx, weights_Bx, correct_Bx):
  """Loss, correct predictions and count summed over each mixture source's examples, as
  VALUE@NAME: sums that add up over batches and devices like the others. x: any further axes."""
  # The loss's own cross-entropy, computed again in the same program: XLA computes it once.
  plain_Bx = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxV.astype(jnp.float32), labels_Bx
  )
  one_hot_BS = jax.nn.one_hot(source_B, len(names), dtype=jnp.float32)
  by_source = lambda x: jnp.reshape(x, (x.shape[0], -1)).sum(axis=1) @ one_hot_BS
  totals_S = {
      "loss": by_source(plain_Bx * weights_Bx),
      "correct": by_source(correct_Bx * weights_Bx),
      "count": by_source(weights_Bx),
  }
  return {f"{key}@{name}": totals_S[key][s] for key in totals_S for s, name in enumerate(names)}


def _source_metrics(names: tuple[str, ...], sums) -> dict[str, float]:
  """Loss and accuracy of each source that the sums hold examples of (a source can miss a short
  interval)."""
  out = {}
  for name in names:
    count = float(sums[f"count@{name}"])
    if count > 0:
      out[f"loss_{name}"] = float(sums[f"loss@{name}"]) / count
      out[f"accuracy_{name}"] = float(sums[f"correct@{name}"]) / count
  return out


def _exact_match_sums(correct_BT, loss_mask_BT, weights_B) -> dict:
  """Examples whose every target token (where the loss mask is 1) is the argmax given the true
  prefix, which is exactly when greedy decoding produces the targets; and the examples counted."""
  all_right_B = jnp.all((correct_BT > 0) | (loss_mask_BT == 0), axis=1).astype(jnp.float32)
  return {"exact": jnp.sum(all_right_B * weights_B), "examples": jnp.sum(weights_B)}


def _loss_metrics(sums, count: float) -> dict[str, float]:
  out = {"loss": float(sums["loss"]) / count}
  if "log_z_squared" in sums:
    out["log_z_squared"] = float(sums["log_z_squared"]) / count
  return out


@dataclasses.dataclass(frozen=True)
class LanguageModelling:
  """Next-token prediction on {"tokens": [B, T+1]}, with optional per-example {"weights": [B]}
  (0 for the padding examples that fill the last eval batch).

  Attributes:
    bytes_per_token: when set, evaluation also reports bits per byte (1.0 for byte-level models).
    token_bytes: bytes of text each token id stands for (a tokenizer's `token_bytes`); when set,
      bits per byte divide by the bytes the evaluated targets actually hold, exact for any tokenizer.
    sources: the names of a mixture's sources (bigjax.data.mixture), whose batches carry
      {"source_id": [B]}: loss and accuracy are also reported per source, as loss_NAME.
  """

  bytes_per_token: float | None = 1.0
  token_bytes: tuple[int, ...] | None = None
  sources: tuple[str, ...] = ()
  unit: str = "tokens"
  losses: Losses = Losses()
  higher_is_better: ClassVar[frozenset[str]] = frozenset({"accuracy", "exact_match"})

  def init(self, model, rng, batch):
    """Model variables, initialised on inputs shaped like the batch's."""
    return model.init({"params": rng, "dropout": rng}, batch["tokens"][:, :-1])

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    tokens_BT = batch["tokens"]
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    weights_B = batch.get("weights", jnp.ones(targets_BT.shape[:1])).astype(jnp.float32)
    loss_mask_BT = batch.get("loss_mask", jnp.ones(targets_BT.shape)).astype(jnp.float32)
    weights_BT = weights_B[:, None] * loss_mask_BT
    packed = {}
    if "segment_ids" in batch:  # packed documents: attention stays inside each one
      packed = {
          "segment_ids_BT": batch["segment_ids"][:, :-1],
          "positions_BT": batch["positions"][:, :-1],
      }
    logits_BTV = model.apply(variables, inputs_BT, train=train, rngs=rngs, **packed)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    sums = {
        **_cross_entropy_sums(logits_BTV, targets_BT, weights_BT, self.losses),
        "correct": jnp.sum(correct_BT * weights_BT),
        "count": jnp.sum(weights_BT),
    }
    if self.token_bytes is not None:
      sums["bytes"] = jnp.sum(jnp.asarray(self.token_bytes, jnp.float32)[targets_BT] * weights_BT)
    if "loss_mask" in batch:
      sums.update(_exact_match_sums(correct_BT, loss_mask_BT, weights_B))
    if self.sources:
      sums.update(
          _source_sums(
              self.sources, batch["source_id"], logits_BTV, targets_BT, weights_BT, correct_BT
          )
      )
    return sums, {}

  def metrics(self, sums) -> dict[str, float]:
    """Means from summed values: loss and accuracy per target token, bits per byte for byte-level
    data, and the fraction of examples whose targets are all right when the batch has a loss mask.
    """
    count = max(float(sums["count"]), 1.0)
    out = {**_loss_metrics(sums, count), "accuracy": float(sums["correct"]) / count}
    loss = out["loss"]
    if "bytes" in sums:
      out["bits_per_byte"] = float(sums["loss"]) / math.log(2) / max(float(sums["bytes"]), 1.0)
    elif self.bytes_per_token:
      out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token
    if "exact" in sums:
      out["exact_match"] = float(sums["exact"]) / max(float(sums["examples"]), 1.0)
    return {**out, **_source_metrics(self.sources, sums)}


@dataclasses.dataclass(frozen=True)
class Classification:
  """Softmax cross-entropy on {"image": [B, ...], "label": [B]}, optional {"weights": [B]}.

  Models with batch normalisation update their `batch_stats` in training and use the running
  averages in evaluation. `sources`: as LanguageModelling's.
  """

  unit: str = "images"
  losses: Losses = Losses()
  sources: tuple[str, ...] = ()
  higher_is_better: ClassVar[frozenset[str]] = frozenset({"accuracy"})

  def init(self, model, rng, batch):
    return model.init({"params": rng, "dropout": rng}, batch["image"], train=False)

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    outputs = model.apply(variables, batch["image"], train=train, rngs=rngs, mutable=mutable)
    logits_BC, new_model_state = outputs if mutable else (outputs, {})
    labels_B = batch["label"]
    weights_B = batch.get("weights", jnp.ones(labels_B.shape, jnp.float32)).astype(jnp.float32)
    correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
    sums = {
        **_cross_entropy_sums(logits_BC, labels_B, weights_B, self.losses),
        "correct": jnp.sum(correct_B * weights_B),
        "count": jnp.sum(weights_B),
    }
    if self.sources:
      sums.update(
          _source_sums(self.sources, batch["source_id"], logits_BC, labels_B, weights_B, correct_B)
      )
    return sums, dict(new_model_state)

  def metrics(self, sums) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {
        **_loss_metrics(sums, count),
        "accuracy": float(sums["correct"]) / count,
        **_source_metrics(self.sources, sums),
    }


@dataclasses.dataclass(frozen=True)
class SequenceToSequence:
  """Targets given sources, for encoder-decoders (bigjax.nn.seq2seq, recurrent.RNNSeq2Seq) on
  {"inputs": [B, S], "input_lengths": [B], "targets": [B, T+1], "loss_mask": [B, T]} and optional
  {"weights": [B]}: the decoder reads targets[:, :-1] and predicts targets[:, 1:] where the loss
  mask is 1 (the target tokens and the end token).

  Exact match is the fraction of examples whose every target token and end token is the argmax
  given the true prefix, which is exactly when greedy decoding reproduces the target.
  """

  unit: str = "tokens"
  losses: Losses = Losses()
  higher_is_better: ClassVar[frozenset[str]] = frozenset({"accuracy", "exact_match"})

  def init(self, model, rng, batch):
    return model.init(
        {"params": rng, "dropout": rng},
        batch["inputs"],
        batch["input_lengths"],
        batch["targets"][:, :-1],
    )

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    decoder_inputs_BT, targets_BT = batch["targets"][:, :-1], batch["targets"][:, 1:]
    weights_B = batch.get("weights", jnp.ones(targets_BT.shape[:1])).astype(jnp.float32)
    loss_mask_BT = batch["loss_mask"].astype(jnp.float32)
    weights_BT = weights_B[:, None] * loss_mask_BT
    logits_BTV = model.apply(
        variables,
        batch["inputs"],
        batch["input_lengths"],
        decoder_inputs_BT,
        train=train,
        rngs=rngs,
    )
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    sums = {
        **_cross_entropy_sums(logits_BTV, targets_BT, weights_BT, self.losses),
        "correct": jnp.sum(correct_BT * weights_BT),
        "count": jnp.sum(weights_BT),
        **_exact_match_sums(correct_BT, loss_mask_BT, weights_B),
    }
    return sums, {}

  def metrics(self, sums) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {
        **_loss_metrics(sums, count),
        "accuracy": float(sums["correct"]) / count,
        "exact_match": float(sums["exact"]) / max(float(sums["examples"]), 1.0),
    }
