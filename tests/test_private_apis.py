"""bigjax.private_apis: each private API it reaches is still where it reaches for it, so an upgrade
that moves one fails here, by name, instead of quietly turning a check off (the cluster detection
and the backend check swallow nothing but their own absence)."""

import subprocess
import sys

import jax
import tensorflow_datasets as tfds

from bigjax import private_apis


def test_jax_says_whether_its_backends_have_started():
  from jax._src import xla_bridge

  assert callable(xla_bridge.backends_are_initialized)
  assert jax.devices() and private_apis.jax_backends_started()
  fresh = subprocess.run(
      [
          sys.executable,
          "-c",
          "from bigjax import private_apis; " "print(private_apis.jax_backends_started())",
      ],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert fresh.stdout.strip() == "False", fresh.stderr


def test_jax_cluster_environments_are_listed_where_bigjax_reads_them():
  from jax._src import clusters

  environments = clusters.ClusterEnv._cluster_types  # noqa: SLF001
  assert environments and all(
      hasattr(env, "opt_in_only_method") and callable(env.is_env_present) for env in environments
  )
  # No SLURM, Cloud TPU or MPI on a test machine
  assert private_apis.jax_cluster_detected() is False


def test_tfds_builders_log_their_download_through_the_methods_bigjax_silences():
  for name in ("_log_download_bytes", "_log_download_done"):
    assert callable(getattr(tfds.core.DatasetBuilder, name, None)), name


def test_grain_reads_its_options_as_absl_flags():
  program = (
      "from absl import flags; import grain; from bigjax import private_apis; "
      "assert not flags.FLAGS.is_parsed(); assert 'grain_py_debug_mode' in flags.FLAGS; "
      "private_apis.let_grain_workers_read_flags(); assert flags.FLAGS.is_parsed()"
  )
  result = subprocess.run(
      [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr


def test_grain_unlinks_shared_memory_arrays_through_the_pool_bigjax_drains():
  from multiprocessing import shared_memory

  import numpy as np
  from grain._src.python.ipc import shared_memory_array

  arrays = shared_memory_array.SharedMemoryArray
  arrays.enable_async_del(1)
  assert arrays._del_thread_pool is not None  # noqa: SLF001
  batch = arrays((1024,), np.float32)
  batch.unlink_on_del()
  name = batch.shm.name
  del batch  # handed to the pool
  private_apis.finish_grain_shared_memory_deletes()
  assert arrays._del_thread_pool is None  # noqa: SLF001  (later deletes synchronous)
  try:
    shared_memory.SharedMemory(name=name).close()
    raise AssertionError(f"shared memory {name} is still there after the pool finished")
  except FileNotFoundError:
    pass  # unlinked
