"""Loading a Hugging Face checkpoint onto a mesh: the time, the peak host memory against the
checkpoint's size, and the bytes each device holds.

  python -m benchmarks.load                      # llama3.2-1b's shapes in bfloat16 onto fsdp:8
  python -m benchmarks.load --model=llama-tiny   # the same steps in seconds

The first run writes a checkpoint of the preset's shapes with random values (bigjax.models.save_hf,
into --checkpoint_dir) and keeps it for later runs. The load then runs in a fresh process with
--devices forced host devices, so the peak it reports is the loader's own. On a CPU the devices'
buffers are host memory too: a loader that keeps one copy of the model peaks at about one
checkpoint above the process's size before loading, plus the largest tensor in flight.
"""

import json
import os
import resource
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging

MODEL = flags.DEFINE_string(
    "model", "llama3.2-1b", "A Transformer preset with a Hugging Face counterpart."
)
DTYPE = flags.DEFINE_enum(
    "dtype", "bfloat16", ["bfloat16", "float32"], "The checkpoint's and the loaded dtype."
)
MESH = flags.DEFINE_string("mesh", "fsdp:8", "The mesh the parameters are placed on.")
DEVICES = flags.DEFINE_integer(
    "devices", 8, "Forced host devices in the loading process.", lower_bound=1
)
CHECKPOINT_DIR = flags.DEFINE_string(
    "checkpoint_dir",
    None,
    "Where the random checkpoint is written and kept " "(default /tmp/bigjax_load/MODEL-DTYPE).",
)
LOAD_ONLY = flags.DEFINE_bool("load_only", False, "Internal: this is the loading process.")


def write_random_checkpoint(name: str, dtype: str, directory: str) -> None:
  """A Hugging Face directory of preset `name`'s shapes, values ~N(0, 0.02), made one tensor at a
  time in numpy (initialising a billion parameters with JAX's RNG on a CPU takes minutes)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bigjax import models

  module = models.create(name, dtype=dtype, param_dtype=dtype)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))[
      "params"
  ]
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda leaf: (0.02 * rng.standard_normal(leaf.shape, np.float32)).astype(leaf.dtype),
      nn.unbox(abstract),
  )
  models.save_hf(directory, module, {"params": params})


def _memory_bytes() -> dict[str, int]:
  """This process's resident memory by kind (Linux): RssAnon is what it allocated, RssFile the
  pages of files it maps (safetensors is read through mmap), which the kernel can drop."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {kind: int(fields[kind].split()[0]) * 1024 for kind in ("VmRSS", "RssAnon", "RssFile")}


class _PeakMemory:
  """The largest of each _memory_bytes() kind, sampled every few milliseconds in a thread."""

  def __init__(self):
    self.peak = _memory_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self):
    while not self._stop.wait(0.005):
      self._sample_once()

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self._sample_once()

  def _sample_once(self):
    self.peak = {k: max(v, self.peak[k]) for k, v in _memory_bytes().items()}


def load_and_measure(directory: str, dtype: str, mesh_spec: str) -> dict:
  """Loads `directory` onto the mesh in this process and measures it."""
  import jax
  from bigjax import models
  from bigjax import sharding

  mesh = sharding.make_mesh(mesh_spec)
  before = _memory_bytes()
  start = time.perf_counter()
  with _PeakMemory() as memory:
    module, variables = models.load(directory, mesh=mesh, dtype=dtype, param_dtype=dtype)
    jax.block_until_ready(variables)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
  after = _memory_bytes()
  per_device = {d: 0 for d in mesh.devices.flat}
  leaves = jax.tree.leaves(variables)
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      per_device[shard.device] += shard.data.nbytes
  checkpoint_bytes = sum(
      os.path.getsize(os.path.join(directory, f))
      for f in os.listdir(directory)
      if f.endswith(".safetensors")
  )
  model_bytes = sum(leaf.nbytes for leaf in leaves)
  return {
      "benchmark": "load",
      "model": MODEL.value,
      "dtype": dtype,
      "mesh": sharding.describe(mesh),
      "parameters": sum(leaf.size for leaf in leaves),
      "checkpoint_bytes": checkpoint_bytes,
      "load_s": seconds,
      "rss_before_bytes": before["VmRSS"],
      "peak_rss_bytes": peak,
      # What the loader allocated at its peak and what it keeps (the model, in the devices' buffers),
      # both above the process before loading, over the checkpoint's size; mapped file pages apart.
      "peak_anon_above_before_over_checkpoint": (memory.peak["RssAnon"] - before["RssAnon"])
      / checkpoint_bytes,
      "kept_anon_above_before_over_checkpoint": (after["RssAnon"] - before["RssAnon"])
      / checkpoint_bytes,
      "peak_file_mapped_over_checkpoint": memory.peak["RssFile"] / checkpoint_bytes,
      "bytes_per_device_min": min(per_device.values()),
      "bytes_per_device_max": max(per_device.values()),
      "model_bytes_over_devices": model_bytes / len(per_device),
      "num_layers": module.config.num_layers,
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  directory = CHECKPOINT_DIR.value or f"/tmp/bigjax_load/{MODEL.value}-{DTYPE.value}"
  if LOAD_ONLY.value:
    print(json.dumps(load_and_measure(directory, DTYPE.value, MESH.value)), flush=True)
    return
  if not os.path.exists(os.path.join(directory, "config.json")):
    start = time.perf_counter()
    write_random_checkpoint(MODEL.value, DTYPE.value, directory)
    print(
        f"wrote a random {MODEL.value} checkpoint to {directory} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
        flush=True,
    )
  env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES.value}",
      JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
  )
  command = [
      sys.executable,
      "-m",
      "benchmarks.load",
      "--load_only",
      f"--model={MODEL.value}",
      f"--dtype={DTYPE.value}",
      f"--mesh={MESH.value}",
      f"--checkpoint_dir={directory}",
  ]
  sys.exit(subprocess.run(command, env=env, check=False).returncode)


if __name__ == "__main__":
  app.run(main)
