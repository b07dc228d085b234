"""Optax optimizers and learning-rate schedules chosen by name, with parameters frozen or given
their own learning-rate and weight-decay factors by regular expressions over their paths."""

import dataclasses
import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bigjax import config_checks as checks
from bigjax import sharding
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
  # Regular expressions searched in parameter paths ("block_0/attn/query/kernel"; "blocks/..." under
  # scan_layers). Frozen parameters get no update and no optimizer state; for the factors, the first
  # pattern that matches a path gives its factor.
  freeze: tuple[str, ...] = ()
  lr_multipliers: tuple[tuple[str, float], ...] = ()
  wd_multipliers: tuple[tuple[str, float], ...] = ()
  # When set, parameters whose path none of these regular expressions matches are frozen (LoRA
  # trains only its adapters: lora.ADAPTER_PATTERN).
  trainable: tuple[str, ...] = ()
  # > 0: keep an exponential moving average of the parameters, updated after every step (ParamsEma).
  ema_decay: float = 0.0

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
    if not (checks.is_number(self.ema_decay) and 0 <= self.ema_decay < 1):
      checks.fail(self, f"ema_decay={self.ema_decay!r} must be in [0, 1) (0 keeps no average)")
    for name in ("freeze", "trainable", "lr_multipliers", "wd_multipliers"):
      entries = getattr(self, name)
      shape_ok = isinstance(entries, (tuple, list)) and all(
          isinstance(e, str)
          if name in ("freeze", "trainable")
          else isinstance(e, (tuple, list)) and len(e) == 2
          for e in entries
      )
      if not shape_ok:
        what = (
            "regular expressions"
            if name in ("freeze", "trainable")
            else "(regular expression, factor) pairs"
        )
        checks.fail(self, f"{name}={entries!r} must be a tuple of {what}")
      for entry in entries:
        pattern, factor = (entry, None) if name in ("freeze", "trainable") else entry
        try:
          re.compile(pattern)
        except (re.error, TypeError) as e:
          checks.fail(self, f"{name}: {pattern!r} is not a regular expression ({e})")
        # A learning rate of zero would still keep optimizer state: --freeze is the way not to train.
        low, bound = (
            (0, "> 0 (to stop training parameters, --freeze them)")
            if name == "lr_multipliers"
            else (-1, ">= 0")
        )
        if factor is not None and not (checks.is_number(factor) and factor > low and factor >= 0):
          checks.fail(
              self, f"{name}: the factor of {pattern!r} must be a number {bound}, got {factor!r}"
          )

  @property
  def groups_parameters(self) -> bool:
    return bool(self.freeze or self.lr_multipliers or self.wd_multipliers or self.trainable)


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per step. Warmup rises linearly from peak / warmup_steps (so the first step
  already learns) to the peak; cosine and linear then decay to zero at num_steps; inverse_sqrt has
  no end."""
  peak, warmup = cfg.learning_rate, min(cfg.warmup_steps, num_steps)
  start = peak / max(warmup, 1)
  if cfg.schedule == "constant":
    return optax.constant_schedule(peak)
  if cfg.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        start, peak, warmup, max(num_steps, warmup + 1), end_value=0.0
    )
  if cfg.schedule == "warmup_linear":
    return optax.join_schedules(
        [
            optax.linear_schedule(start, peak, warmup),
            optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1)),
        ],
        [warmup],
    )
  if cfg.schedule == "inverse_sqrt":
    # Linear warmup, then peak * sqrt(warmup / step) (Vaswani et al. 2017, normalised at the peak).
    warm = max(warmup, 1)
    return lambda step: peak * jax.numpy.minimum(
        (step + 1) / warm, jax.numpy.sqrt(warm / jax.numpy.maximum(step + 1, 1))
    )
  raise UserError(f"unknown schedule {cfg.schedule!r}; use one of {', '.join(SCHEDULES)}")


def _decay_mask(params):
  # Decay matrices only: biases, norm scales and other vectors are left alone (GPT-2, nanoGPT).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


FROZEN = "frozen"


def _first_match(patterns, path: str):
  return next((i for i, pattern in enumerate(patterns) if re.search(pattern, path)), None)


def parameter_groups(cfg: OptimConfig, params) -> dict:
  """A tree like `params` holding each parameter's group: FROZEN, or "lr{i}_wd{j}", the indices of
  the first --lr_multiplier and --wd_multiplier patterns its path matches ("-" for none). A pattern
  that matches no path is a one-line error listing some real ones."""
  paths = [sharding.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  lr_patterns = [pattern for pattern, _ in cfg.lr_multipliers]
  wd_patterns = [pattern for pattern, _ in cfg.wd_multipliers]
  for flag, patterns in (
      ("--freeze", cfg.freeze),
      ("--lr_multiplier", lr_patterns),
      ("--wd_multiplier", wd_patterns),
      ("trainable", cfg.trainable),
  ):
    for pattern in patterns:
      if not any(re.search(pattern, path) for path in paths):
        raise UserError(
            f"{flag} pattern {pattern!r} matches no parameter; paths look like "
            f"{', '.join(paths[:2] + paths[-2:])}"
        )

  def group(path, _):
    name = sharding.path_name(path)
    if _first_match(cfg.freeze, name) is not None or (
        cfg.trainable and _first_match(cfg.trainable, name) is None
    ):
      return FROZEN
    lr, wd = _first_match(lr_patterns, name), _first_match(wd_patterns, name)
    return f"lr{'-' if lr is None else lr}_wd{'-' if wd is None else wd}"

  return jax.tree_util.tree_map_with_path(group, params)


def _group_names(cfg: OptimConfig) -> dict[str, tuple[float, float]]:
  """Every group parameter_groups can give (but FROZEN) -> its (learning-rate, weight-decay) factors."""
  lr_factors = {"-": 1.0, **{str(i): factor for i, (_, factor) in enumerate(cfg.lr_multipliers)}}
  wd_factors = {"-": 1.0, **{str(i): factor for i, (_, factor) in enumerate(cfg.wd_multipliers)}}
  return {f"lr{i}_wd{j}": (lr, wd) for i, lr in lr_factors.items() for j, wd in wd_factors.items()}


class Optimizer(NamedTuple):
  """An optax GradientTransformation (init, update) that also says which parameters it trains, so
  that the train step differentiates those only: the gradients of frozen parameters (with LoRA,
  nearly all of them) are never computed, nor held in memory."""

  init: Callable
  update: Callable
  # params -> a tree like them of bools; None: every parameter trains
  trained: Callable | None = None


def trained_mask(tx, params):
  """The tree of bools, True where `tx` updates the parameter (every one for a plain optax tx)."""
  if isinstance(tx, Optimizer) and tx.trained is not None:
    return tx.trained(params)
  return jax.tree.map(lambda _: True, params)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> Optimizer:
  """Clipping (optional) followed by the chosen optimizer, driven by the schedule. With frozen
  parameters or per-parameter factors, each group of parameters gets the optimizer with its own
  peak learning rate and weight decay (schedules scale with their peak, so a factor scales every
  step's rate) and frozen ones optax.set_to_zero, which keeps no state; clipping then sees the
  trained parameters' gradients only."""
  if not cfg.groups_parameters:
    opt = _clipped(cfg, _optimizer(cfg, num_steps))
    return Optimizer(*(optax.chain(opt, params_ema(cfg.ema_decay)) if cfg.ema_decay else opt))
  opt = _grouped(cfg, num_steps)
  trained = lambda params: jax.tree.map(lambda frozen: not frozen, _frozen_mask(cfg, params))
  if cfg.ema_decay:
    # Frozen parameters need no average (it would equal them): with LoRA that is nearly every one.
    opt = optax.chain(opt, optax.masked(params_ema(cfg.ema_decay), trained))
  return Optimizer(opt.init, opt.update, trained)


class ParamsEma(NamedTuple):
  """The optimizer state of params_ema: steps taken, and the average (shaped, sharded and
  checkpointed like the parameters, as every optimizer state that mirrors them)."""

  count: jax.Array
  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Leaves the updates as they are and keeps ema <- decay * ema + (1 - decay) * new parameters.
  The average starts from the parameters of the first update (not those of init), so a run whose
  parameters are replaced after init (--init_from) averages the loaded ones: after N steps from
  p_0 it is decay^N p_0 + (1 - decay) sum_k decay^(N-k) p_k."""

  def init(params):
    return ParamsEma(jnp.zeros([], jnp.int32), jax.tree.map(jnp.array, params))

  def update(updates, state, params):
    if params is None:
      raise ValueError("params_ema needs the parameters in update()")
    first = state.count == 0
    ema = jax.tree.map(
        lambda e, p, u: decay * jnp.where(first, p, e) + (1 - decay) * (p + u).astype(e.dtype),
        state.ema,
        params,
        updates,
    )
    return updates, ParamsEma(state.count + 1, ema)

  return optax.GradientTransformation(init, update)


def ema_params(opt_state, params):
  """The parameter average in an optimizer state from make_optimizer with ema_decay > 0 (frozen
  parameters, which it does not hold, as `params` has them), else None."""
  found = [
      x
      for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamsEma))
      if isinstance(x, ParamsEma)
  ]
  if not found:
    return None
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(
      lambda e, p: p if is_masked(e) else e, found[0].ema, params, is_leaf=is_masked
  )


def _grouped(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  inner = {
      name: _optimizer(
          dataclasses.replace(
              cfg, learning_rate=cfg.learning_rate * lr, weight_decay=cfg.weight_decay * wd
          ),
          num_steps,
      )
      for name, (lr, wd) in _group_names(cfg).items()
  }
  groups = lambda params: parameter_groups(cfg, params)
  frozen = lambda params: _frozen_mask(cfg, params)
  return optax.chain(
      optax.masked(optax.set_to_zero(), frozen),
      _clipped(cfg, optax.multi_transform({**inner, FROZEN: optax.set_to_zero()}, groups)),
  )


def _frozen_mask(cfg: OptimConfig, params):
  return jax.tree.map(lambda group: group == FROZEN, parameter_groups(cfg, params))


def _clipped(cfg: OptimConfig, opt: optax.GradientTransformation) -> optax.GradientTransformation:
  if cfg.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt


def _optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """The chosen optimizer with its weight decay, driven by the schedule."""
  lr = make_schedule(cfg, num_steps)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(
        lr, b1=cfg.momentum, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
  elif cfg.optimizer == "sgd":
    opt = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, _decay_mask)
        if cfg.weight_decay
        else optax.identity(),
        optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )
  elif cfg.optimizer == "adafactor":
    opt = optax.adafactor(
        lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=_decay_mask
    )
  elif cfg.optimizer == "lion":
    opt = optax.lion(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay, mask=_decay_mask)
  else:
    raise UserError(f"unknown optimizer {cfg.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
  return opt
