"""The environment of every JAX process the tests run: the CPU, a number of forced host devices,
and XLA's fast compilation."""

import os

# The suite compiles thousands of small programs and runs each a few times, so XLA's compile time is
# most of its time. Its CPU backend at optimization level 0 emits the same computation with less
# optimized kernels and compiles in about two thirds of the time (test_seq2seq.py and test_conv.py:
# 144 s at the default, 93 s at 0). Runs outside the tests keep XLA's default.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def cpu_env(devices: int = 1, **extra: str) -> dict:
  """os.environ for a subprocess that sees `devices` CPU devices, with `extra` variables set."""
  return dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **extra)
