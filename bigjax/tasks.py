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
  """Next-token prediction on {"tokens": [B, T+1]} with optional {"weights": [B, T]} (0 = padding).

  Attributes:
    bytes_per_token: when set, evaluation also reports bits per byte (1.0 for byte-level models).
  """
  bytes_per_token: float | None = 1.0
  unit: str = "tokens"

  def init(self, model, rng, batch):
    """Model variables, initialised on inputs shaped like the batch's."""
    return model.init({"params": rng, "dropout": rng}, batch["tokens"][:, :-1])

  def loss_sums(self, model, variables, batch, *, rngs=None, train: bool = False):
    tokens_BT = batch["tokens"]
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    weights_BT = batch.get("weights", jnp.ones(targets_BT.shape, jnp.float32))
    logits_BTV = model.apply(variables, inputs_BT, deterministic=not train, rngs=rngs)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    sums = {"loss": jnp.sum(losses_BT * weights_BT), "count": jnp.sum(weights_BT)}
    return sums, {}

  def metrics(self, sums) -> dict[str, float]:
    """Means from summed values: loss per token, and bits per byte for byte-level data."""
    loss = float(sums["loss"]) / max(float(sums["count"]), 1.0)
    out = {"loss": loss}
    if self.bytes_per_token:
      out["bits_per_byte"] = loss / math.log(2) / self.bytes_per_token
    return out
