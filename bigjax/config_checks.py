"""Field checks for the frozen config dataclasses, called from their `__post_init__`.

A bad value caught here is one line naming the config, the field, the value and what is allowed,
instead of a shape error or a ZeroDivisionError deep inside initialisation, or a run that trains
nonsense. Every config uses these helpers, so every message has the same form:

    TransformerConfig: num_layers=0 must be an integer >= 1
    TransformerConfig: unknown position 'learnt'; use one of learned, sinusoidal, rotary, none
    TransformerConfig: num_kv_heads=3 must divide num_heads=4

The errors are `UserError`: a `ValueError` to library code, and a one-line `error:` at the CLI.
Each helper returns nothing; the configs keep the values they were given (no coercion), so a
checked config computes exactly what an unchecked one did.
"""

import math
import numbers
from collections.abc import Iterable

import jax.numpy as jnp

from bigjax.errors import UserError


def fail(config, statement: str):
  """Raises the one-line error `<ConfigClass>: <statement>`."""
  raise UserError(f"{type(config).__name__}: {statement}")


def _field(config, name: str, requirement: str):
  fail(config, f"{name}={getattr(config, name)!r} {requirement}")


def is_int(value) -> bool:
  # bool is an int subclass, but True layers or a False width is a typo, not a size.
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
  """A finite real number (an int or a float, not a bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(config, name: str, low: int) -> None:
  value = getattr(config, name)
  if not (is_int(value) and value >= low):
    _field(config, name, f"must be an integer >= {low}")


def positive_int(config, name: str) -> None:
  int_at_least(config, name, 1)


def nonnegative_int(config, name: str) -> None:
  int_at_least(config, name, 0)


def optional_positive_int(config, name: str) -> None:
  value = getattr(config, name)
  if value is not None and not (is_int(value) and value >= 1):
    _field(config, name, "must be None or an integer >= 1")


def finite_number(config, name: str) -> None:
  if not is_number(getattr(config, name)):
    _field(config, name, "must be a finite number")


def positive_number(config, name: str) -> None:
  value = getattr(config, name)
  if not (is_number(value) and value > 0):
    _field(config, name, "must be a finite number > 0")


def nonnegative_number(config, name: str) -> None:
  value = getattr(config, name)
  if not (is_number(value) and value >= 0):
    _field(config, name, "must be a finite number >= 0")


def fraction(config, name: str) -> None:
  """A rate or decay in [0, 1): dropout of 1 drops everything, a decay of 1 never forgets."""
  value = getattr(config, name)
  if not (is_number(value) and 0 <= value < 1):
    _field(config, name, "must be a number in [0, 1)")


def boolean(config, name: str) -> None:
  if not isinstance(getattr(config, name), bool):
    _field(config, name, "must be True or False")


def one_of(config, name: str, choices: Iterable[str], what: str = "") -> None:
  """A string among `choices`; `what` words the field where its name alone says too little."""
  choices = tuple(choices)
  value = getattr(config, name)
  if not (isinstance(value, str) and value in choices):
    fail(config, f"unknown {what or name} {value!r}; use one of {', '.join(choices)}")


def positive_ints(
    config, name: str, *, length: int | None = None, nonempty: bool = False, meaning: str = ""
) -> None:
  """A shape or a list of widths: a tuple (or list) of integers >= 1; `length` fixes how many,
  `nonempty` asks for at least one; `meaning` names the entries in the message."""
  value = getattr(config, name)
  ok = (
      isinstance(value, (tuple, list))
      and all(is_int(v) and v >= 1 for v in value)
      and (length is None or len(value) == length)
      and (not nonempty or len(value) > 0)
  )
  if not ok:
    how_many = f"{length} " if length is not None else "one or more " if nonempty else ""
    entries = f" ({meaning})" if meaning else ""
    _field(config, name, f"must be a tuple of {how_many}integers >= 1{entries}")


def float_dtype(config, name: str) -> None:
  """A floating-point dtype, as a name ("bfloat16") or a dtype object."""
  value = getattr(config, name)
  try:
    # None and bools pass jnp.dtype (as float64 and bool): neither is meant as a compute dtype.
    ok = (
        value is not None
        and not isinstance(value, bool)
        and jnp.issubdtype(jnp.dtype(value), jnp.floating)
    )
  except (TypeError, ValueError):
    ok = False
  if not ok:
    _field(config, name, "must be a floating-point dtype such as float32, bfloat16 or float16")


def divides(config, divisor_name: str, multiple_name: str, hint: str = "") -> None:
  """Field `divisor_name` divides field `multiple_name` (both already checked as integers >= 1);
  `hint`, if any, follows in parentheses."""
  divisor, multiple = getattr(config, divisor_name), getattr(config, multiple_name)
  if multiple % divisor:
    hint = f" ({hint})" if hint else ""
    fail(config, f"{divisor_name}={divisor} must divide {multiple_name}={multiple}{hint}")
