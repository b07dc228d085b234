"""Every use bigjax makes of another library's private API or process-wide state, in one place.

Each has no public route in the installed versions (JAX 0.10, TFDS 4.9, grain 0.2); each is
held to the API it reaches by tests/test_private_apis.py, which fails, naming the attribute, as
soon as an upgrade moves it. Nothing here runs at import.
"""

from absl import flags


def jax_backends_started() -> bool:
  """Whether JAX has started a backend (then the threads of XLA's CPU client have their malloc
  arenas already, and bigjax.host_memory's settings would not reach them)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

  return xla_bridge.backends_are_initialized()


def jax_cluster_detected() -> bool:
  """Whether JAX's own cluster detection (SLURM, Cloud TPU, MPI, ...) finds an environment that
  jax.distributed.initialize() can start from without arguments. The list of environments is
  private to JAX; should it move, this says no and a launch needs explicit flags."""
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top

    environments = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False
  return any(not env.opt_in_only_method and env.is_env_present() for env in environments)


def silence_tfds_download_log(builder) -> None:
  """Drops the two lines a TFDS builder logs around download_and_prepare ("Downloading and
  preparing ..."), wrong for bigjax's local builders, which download nothing: on this builder only.
  """
  builder._log_download_bytes = builder._log_download_done = lambda: None  # noqa: SLF001


def let_grain_workers_read_flags() -> None:
  """grain's multiprocessing prefetch reads its options as absl flags, which raises outside an
  absl app (a notebook, a script, a test) until the flags count as parsed; their defaults are the
  right values there. Inside an app (the CLI) the flags are parsed already and nothing changes."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def cudnn_packed_attention(q_BTHK, k_BTGK, v_BTGK, lengths_BM, offsets_BM1, *, causal: bool):
  """cuDNN's fused attention over packed documents (its ragged "packed layout": each window holds
  up to M documents, given by their lengths and start offsets, -1 where a window has fewer).
  jax.nn.dot_product_attention takes only one length per example (padding), not documents; JAX's
  cuDNN module, which it calls, takes offsets too. Needs a Hopper GPU or newer."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top

  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  return cudnn.dot_product_attention(
      q_BTHK,
      k_BTGK,
      v_BTGK,
      q_seqlen=lengths_BM,
      kv_seqlen=lengths_BM,
      q_offsets=offsets_BM1,
      kv_offsets=offsets_BM1,
      scale=q_BTHK.shape[-1] ** -0.5,
      mask_type=mask_type,
      qkv_layout="BTNH",
  )


def finish_grain_shared_memory_deletes() -> None:
  """Waits for the shared-memory batches grain is unlinking in the background (SharedMemoryArray
  deletes through a thread pool once prefetch starts) and makes later deletes synchronous. A
  process about to stop on an error would otherwise exit before that pool ran, leaving segments
  for multiprocessing's resource tracker to warn about after bigjax's one-line error."""
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top

  arrays = shared_memory_array.SharedMemoryArray
  pool = arrays._del_thread_pool  # noqa: SLF001
  if pool is None:
    return
  # New deletes now run at once; the queued ones still release the semaphore, which stays.
  arrays._del_thread_pool = None  # noqa: SLF001
  pool.close()
  pool.join()
