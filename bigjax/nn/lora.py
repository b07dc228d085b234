"""Low-rank adaptation (Hu et al. 2021) of any model's dense and attention projections.

`Lora(base, config)` computes what `base` computes, with every projection whose kernel path
matches `config.targets` adapted: y = x @ W + (alpha / r) * dropout(x) @ A @ B. A and B live beside
W in the parameter tree (`block_0/attn/query/{kernel,lora_a,lora_b}`), so they stack with it under
scan_layers and shard along its axes: A along W's input axes, B along its output axes, the rank
dimension replicated. B starts at zero, so before the first step the adapted model is the base model.

The wrapper shares the base's scope: the base's own parameters keep their paths, and a checkpoint
or Hugging Face model of the base loads into it (the adapters come from init). `merged` folds the
adapters back into the kernels for a model that needs neither bigjax's LoRA nor its adapters.
"""

import dataclasses
import functools
import re
import string

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.errors import UserError

# The attention and MLP projections of bigjax's Transformer blocks (TransformerLM, the encoder, ViT),
# as their kernel paths read with and without scan_layers.
DEFAULT_TARGETS = r"(^|/)(attn/(query|key|value|out)|mlp/(wi|wi_gate|wi_up|wo))/kernel$"
ADAPTERS = ("lora_a", "lora_b")
# What --freeze-like code matches to find the adapters among the parameters.
ADAPTER_PATTERN = r"/lora_[ab]$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  # The update is scaled by alpha / rank; None means alpha = rank (scale 1)
  alpha: float | None = None
  targets: str = DEFAULT_TARGETS  # regular expression searched in kernel paths
  dropout: float = 0.0  # on the adapter's input only, while training

  def __post_init__(self):
    checks.positive_int(self, "rank")
    if self.alpha is not None:
      checks.positive_number(self, "alpha")
    checks.fraction(self, "dropout")
    try:
      re.compile(self.targets)
    except (re.error, TypeError) as e:
      checks.fail(self, f"targets={self.targets!r} is not a regular expression ({e})")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank


class Lora(nn.Module):
  """`base` with low-rank adapters on the projections `config.targets` names; called as `base` is
  (a `train=True` keyword turns the adapter dropout on)."""

  base: nn.Module
  config: LoraConfig

  def setup(self):
    nn.share_scope(self, self.base)

  def __call__(self, *args, **kwargs):
    seen, adapted = [], []
    adapt = functools.partial(_adapt, self.config, bool(kwargs.get("train", False)), seen, adapted)
    with nn.intercept_methods(adapt):
      out = self.base(*args, **kwargs)
    if not adapted:
      raise UserError(
          f"--lora_targets={self.config.targets!r} matches no kernel of a dense or attention "
          f"projection of {type(self.base).__name__}; "
          + (f"its kernels look like {', '.join(_few(seen))}" if seen else "it has no kernels")
      )
    return out


def base_of(model: nn.Module) -> nn.Module:
  """The model a Lora wraps, or the model itself."""
  return model.base if isinstance(model, Lora) else model


def _few(paths: list[str]) -> list[str]:
  unique = list(dict.fromkeys(paths))
  return unique[:2] + unique[-2:] if len(unique) > 4 else unique


def _equation(module: nn.Module, path: str) -> str:
  """The einsum that the projection computes from its input and kernel."""
  if type(module) is nn.Dense:
    return "...i,io->...o"
  equation = getattr(module, "equation", None)  # bigjax.nn.attention's projections
  if not isinstance(equation, str):
    raise UserError(
        f"--lora_targets matches {path}, the kernel of a {type(module).__name__}: LoRA adapts "
        "nn.Dense layers and attention projections only; narrow the pattern"
    )
  return equation.replace(" ", "")


def _adapt(
    cfg: LoraConfig, train: bool, seen: list, adapted: list, next_fun, args, kwargs, context
):
  """Method interceptor: a targeted projection's output plus its low-rank update."""
  y = next_fun(*args, **kwargs)
  module = context.module
  if context.method_name != "__call__" or not module.has_variable("params", "kernel"):
    return y
  path = "/".join(module.path + ("kernel",))
  seen.append(path)
  if not re.search(cfg.targets, path):
    return y
  adapted.append(path)
  inputs, kernel_letters, outputs = _split_equation(_equation(module, path), path)
  contracted = "".join(c for c in kernel_letters if c in inputs)
  free = kernel_letters[len(contracted) :]
  if kernel_letters != contracted + free:
    raise UserError(
        f"cannot adapt {path}: its kernel does not hold its input axes before its output axes"
    )
  kernel = module.get_variable("params", "kernel")
  names = getattr(kernel, "names", None)  # logical axes, where the kernel was created with them
  value = nn.unbox(kernel)
  split = len(contracted)
  a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(split)))
  a = module.param(
      "lora_a",
      _partitioned(a_init, names and tuple(names[:split]) + (None,)),
      value.shape[:split] + (cfg.rank,),
      value.dtype,
  )
  b = module.param(
      "lora_b",
      _partitioned(nn.initializers.zeros, names and (None,) + tuple(names[split:])),
      (cfg.rank,) + value.shape[split:],
      value.dtype,
  )
  x = args[0]
  if train and cfg.dropout > 0:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - cfg.dropout, x.shape)
    x = jnp.where(keep, x / (1 - cfg.dropout), 0)
  x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=getattr(module, "dtype", None))
  r = _unused_letter(inputs + kernel_letters + outputs)
  low_rank = "".join(c for c in inputs if c not in contracted) + r
  h = jnp.einsum(f"{inputs},{contracted}{r}->{low_rank}", x, a)
  return y + cfg.scale * jnp.einsum(f"{low_rank},{r}{free}->{outputs}", h, b).astype(y.dtype)


def _split_equation(equation: str, path: str) -> tuple[str, str, str]:
  operands, arrow, outputs = equation.partition("->")
  parts = operands.split(",")
  if not arrow or len(parts) != 2:
    raise UserError(f"cannot adapt {path}: its einsum {equation!r} is not 'input,kernel->output'")
  return parts[0], parts[1], outputs


def _unused_letter(used: str) -> str:
  return next(c for c in string.ascii_letters if c not in used)


def _partitioned(init, names):
  return init if names is None else nn.with_logical_partitioning(init, names)


def merged(params, config: LoraConfig):
  """`params` with each adapted kernel replaced by W + scale * A @ B (in float32, then the kernel's
  dtype) and the adapters dropped: the base model's parameters, adaptation included."""
  if not isinstance(params, dict):
    return params
  out = {name: merged(value, config) for name, value in params.items() if name not in ADAPTERS}
  if "lora_a" in params and "lora_b" in params:
    out["kernel"] = _merged_kernel(
        params["kernel"], params["lora_a"], params["lora_b"], config.scale
    )
  return out


def _merged_kernel(kernel, a, b, scale: float):
  # A is [*stacked, *input axes, r] and B [*stacked, r, *output axes], with the stacked (scan)
  # axes in both and in the kernel: the kernel's rank says how many there are.
  stacked = a.ndim + b.ndim - 2 - kernel.ndim
  letters = iter(string.ascii_letters)
  lead = "".join(next(letters) for _ in range(stacked))
  ins = "".join(next(letters) for _ in range(a.ndim - 1 - stacked))
  outs = "".join(next(letters) for _ in range(b.ndim - 1 - stacked))
  r = next(letters)
  update = jnp.einsum(
      f"{lead}{ins}{r},{lead}{r}{outs}->{lead}{ins}{outs}",
      a.astype(jnp.float32),
      b.astype(jnp.float32),
  )
  return (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)


def split_adapters(params):
  """(base parameters, adapters): two trees that together are `params` (see join)."""
  if not isinstance(params, dict):
    return params, None
  base, adapters = {}, {}
  for name, value in params.items():
    if name in ADAPTERS:
      adapters[name] = value
      continue
    base[name], sub = split_adapters(value)
    if sub:
      adapters[name] = sub
  return base, adapters


def join(base, adapters):
  """The parameters split_adapters split."""
  if not adapters:
    return base
  out = dict(base)
  for name, value in adapters.items():
    out[name] = value if name in ADAPTERS else join(base[name], value)
  return out
