"""Every test sees 8 CPU devices, so each sharding path runs on a laptop."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bigjax  # noqa: E402,F401  (before jax starts its CPU backend, as a user's import is: bigjax/host_memory.py)
import jax  # noqa: E402
import pytest  # noqa: E402

assert jax.device_count() == 8, "tests need 8 forced host devices; is jax imported before conftest?"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data directory per test session; local builders prepare into it on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))
