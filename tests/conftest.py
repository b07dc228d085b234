"""Every test sees 8 CPU devices, so each sharding path runs on a laptop."""

import os
import shutil
import tempfile

from tests.cpu_env import xla_flags  # noqa: E402

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for the whole session, every program stored: the suite compiles the same
# tiny steps again and again (in-process, and in each CLI subprocess, which inherit these through
# --compilation_cache_dir's default). The xdist workers inherit the controller's directory.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigjax-test-xla-cache-")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import bigjax  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# As the CLI entry point does, before jax starts its CPU backend (bigjax/host_memory.py).
bigjax.keep_freed_host_memory()

assert jax.device_count() == 8, "tests need 8 forced host devices; is jax imported before conftest?"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data directory per test session; local builders prepare into it on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(
      config, "workerinput"
  ):  # the process that made it, not an xdist worker
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
