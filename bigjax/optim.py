"""Optax optimizers and learning-rate schedules chosen by name."""

import dataclasses

import jax
import optax

from bigjax import config_checks as checks
from bigjax.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "inverse_sqrt")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  optimizer: str = "adamw"
  learning_rate: float = 1e-3
  schedule: str = "warmup_cosine"
  warmup_steps: int = 100
  weight_decay: float = 0.0
  grad_clip: float = 0.0  # global-norm clipping; 0 disables
  momentum: float = 0.9  # sgd momentum, adamw/lion b1
  nesterov: bool = False
  b2: float = 0.999  # adamw second moment (lion uses 0.99 whatever this says)
  eps: float = 1e-8

  def __post_init__(self):
    # Built from the flags with no bounds of their own (--learning_rate, --weight_decay, ...): a
    # negative rate or decay trains, silently, in the wrong direction.
    checks.one_of(self, "optimizer", OPTIMIZERS)
    checks.positive_number(self, "learning_rate")
    checks.one_of(self, "schedule", SCHEDULES)
    checks.nonnegative_int(self, "warmup_steps")
    checks.nonnegative_number(self, "weight_decay")
    checks.nonnegative_number(self, "grad_clip")
    checks.fraction(self, "momentum")
    checks.boolean(self, "nesterov")
    checks.fraction(self, "b2")
    checks.positive_number(self, "eps")


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per step. Warmup rises linearly from peak / warmup_steps (so the first step
  already learns) to the peak; cosine and linear then decay to zero at num_steps; inverse_sqrt has
  no end."""
  peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, num_steps)
  start = peak / max(warmup, 1)
  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(start, peak, warmup, max(num_steps, warmup + 1), end_value=0.0)
  if cfg.schedule == "warmup_linear":
    return optax.join_schedules(
        [optax.linear_schedule(start, peak, warmup),
         optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1))], [warmup])
  if cfg.schedule == "inverse_sqrt":
    # Linear warmup, then peak * sqrt(warmup / step) (Vaswani et al. 2017, normalised at the peak).
    warm = max(warmup, 1)
    return lambda step: peak * jax.numpy.minimum(
        (step + 1) / warm, jax.numpy.sqrt(warm / jax.numpy.maximum(step + 1, 1)))
  raise UserError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")


def _decay_mask(params):
  # Decay matrices only: biases, norm scales and other vectors are left alone (GPT-2, nanoGPT).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """Clipping (optional) followed by the chosen optimizer, driven by the schedule."""
  lr = make_schedule(cfg, num_steps)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(lr, b1=cfg.momentum, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=_decay_mask)
  elif cfg.optimizer == "sgd":
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask) if cfg.weight_decay else
                      optax.identity(),
                      optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  elif cfg.optimizer == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask)
  elif cfg.optimizer == "lion":
    opt = optax.lion(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
  if cfg.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt
