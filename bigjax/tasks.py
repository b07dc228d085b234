"""What a model is trained to do: its loss on a batch, as additive sums, and the metrics they give.

A task's `loss_sums` returns sums that add up over batches, steps and devices (loss summed over
targets, target count, ...), so the train loop can average them over any interval and evaluation
over any number of batches without a task-specific branch.
"""

import dataclasses
import math

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LanguageModelling:
  """Next-token prediction on {"tokens": [B, T+1]}, with optional per-example {"weights": [B]}
  (0 for the padding examples that fill the last eval batch).

  Attributes:
    bytes_per_token: when set, evaluation also reports bits per byte (1.0 for byte-level models).
    token_bytes: bytes of text each token id stands for (a tokenizer's `token_bytes`); when set,
      bits per byte divide by the bytes the evaluated targets actually hold, exact for any tokenizer.
  """
  bytes_per_token: float | None = 1.0
  token_bytes: tuple[int, ...] | None = None
  unit: str = "tokens"

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
      packed = {"segment_ids_BT": batch["segment_ids"][:, :-1], "positions_BT": batch["positions"][:, :-1]}
    logits_BTV = model.apply(variables, inputs_BT, train=train, rngs=rngs, **packed)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses_BT * weights_BT), "correct": jnp.sum(correct_BT * weights_BT),
            "count": jnp.sum(weights_BT)}
    if self.token_bytes is not None:
      sums["bytes"] = jnp.sum(jnp.asarray(self.token_bytes, jnp.float32)[targets_BT] * weights_BT)
    if "loss_mask" in batch:
      # Exact match: every target token right, which is also what greedy decoding would produce.
      all_right_B = jnp.all((correct_BT > 0) | (loss_mask_BT == 0), axis=1).astype(jnp.float32)
      sums.update(exact=jnp.sum(all_right_B * weights_B), examples=jnp.sum(weights_B))
    return sums, {}

  def metrics(self, sums) -> dict[str, float]:
    """Means from summed values: loss and accuracy per target token, bits per byte for byte-level
    data, and the fraction of examples whose targets are all right when the batch has a loss mask."""
    count = max(float(sums["count"]), 1.0)
    loss = float(sums["loss"]) / count
    out = {"loss": loss, "accuracy": float(sums["correct"]) / count}
    if "bytes" in sums:
      out["bits_per_byte"] = float(sums["loss"]) / math.log(2) / max(float(sums["bytes"]), 1.0)
    elif self.bytes_per_token:
      out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token
    if "exact" in sums:
      out["exact_match"] = float(sums["exact"]) / max(float(sums["examples"]), 1.0)
    return out


@dataclasses.dataclass(frozen=True)
class Classification:
  """Softmax cross-entropy on {"image": [B, ...], "label": [B]}, optional {"weights": [B]}.

  Models with batch normalisation update their `batch_stats` in training and use the running
  averages in evaluation.
  """
  unit: str = "images"

  def init(self, model, rng, batch):
    return model.init({"params": rng, "dropout": rng}, batch["image"], train=False)

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    outputs = model.apply(variables, batch["image"], train=train, rngs=rngs, mutable=mutable)
    logits_BC, new_model_state = outputs if mutable else (outputs, {})
    labels_B = batch["label"]
    weights_B = batch.get("weights", jnp.ones(labels_B.shape, jnp.float32)).astype(jnp.float32)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC.astype(jnp.float32), labels_B)
    correct_B = (jnp.argmax(logits_BC, axis=-1) == labels_B).astype(jnp.float32)
    sums = {"loss": jnp.sum(losses_B * weights_B), "correct": jnp.sum(correct_B * weights_B),
            "count": jnp.sum(weights_B)}
    return sums, dict(new_model_state)

  def metrics(self, sums) -> dict[str, float]:
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}
