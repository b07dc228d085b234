"""glibc malloc settings that let XLA's CPU runtime reuse its buffers instead of faulting them in
afresh at every step.

XLA's CPU client allocates each execution's temporary buffer (537 MiB for the 4-layer d_model 256
GPT of benchmarks/README.md) with posix_memalign from one of its worker threads. glibc serves a
worker thread from a secondary arena, and a secondary arena hands out any block larger than its
64 MB heaps as a fresh mmap that free() unmaps again. So every step page-faulted and zeroed the
whole buffer again: ~140,000 page faults and a third of a core in the kernel per step on the
2-core benchmark machine. With a single arena that never mmaps and never trims, the freed buffer
stays in the heap and the next step gets the same pages back.

The settings are process-wide, and a thread picks its arena when it starts, so they only reach
XLA's threads if applied before the CPU backend starts. Importing bigjax does not apply them: the
CLI entry point (bigjax.flags.run) does, first thing, and a script or notebook calls
`bigjax.keep_freed_host_memory()` before its first JAX computation. They are left out where an
accelerator plugin is installed (the host then does little array work, and its input pipeline may
want several arenas) and when BIGJAX_KEEP_HOST_MEMORY=0.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

import jax

from bigjax import private_apis

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt(3): a trim threshold of -1 disables trimming, so no freed memory goes back to the OS.
_NEVER = -1


def accelerator_plugin_installed() -> bool:
  """Whether a GPU or TPU backend could start: a PJRT plugin (CUDA, ROCm), found where JAX looks
  for them (modules under the jax_plugins namespace, entry points of the jax_plugins group), or
  libtpu."""
  plugins = importlib.util.find_spec("jax_plugins")
  if plugins is not None and any(pkgutil.iter_modules(plugins.submodule_search_locations)):
    return True
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return importlib.util.find_spec("libtpu") is not None


def runs_on_cpu_only(platforms: str | None) -> bool:
  """Whether JAX, given `platforms` (JAX_PLATFORMS, e.g. "cuda,cpu"), will compute on the CPU."""
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not accelerator_plugin_installed()


def keep_freed_host_memory() -> bool:
  """Makes glibc keep and reuse freed blocks (one arena, no mmap, no trimming) when this process
  will run XLA on the CPU and its backend has not started yet; returns whether it did."""
  if os.environ.get("BIGJAX_KEEP_HOST_MEMORY", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  # The plugin check first: on GPU/TPU hosts nothing below (a private JAX call among it) runs.
  if not runs_on_cpu_only(jax.config.jax_platforms) or private_apis.jax_backends_started():
    return False
  global _applied
  libc = ctypes.CDLL("libc.so.6")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  _applied = _applied or all(libc.mallopt(option, value) == 1 for option, value in settings)
  return _applied


_applied = False


def applied() -> bool:
  """Whether keep_freed_host_memory changed this process's malloc settings."""
  return _applied
