"""bigjax.host_memory: XLA's CPU buffers are reused from one execution to the next instead of being
page-faulted in afresh. Run in fresh processes: the settings only reach XLA's threads when they
are applied before the CPU backend starts, and conftest has started it in this one."""

import json
import os
import subprocess
import sys

import jax
import pytest

from bigjax import host_memory

# Counts the page faults of one execution of a program whose temporary buffer (a 64 MiB matmul
# output, [16384, 1024] float32, and more) is larger than glibc's 64 MiB secondary-arena heaps.
PROGRAM = """
import json, resource
import bigjax  # applies the settings: the CPU backend has not started yet
import jax, jax.numpy as jnp
x = jnp.ones((16384, 256), jnp.float32)
w = jnp.full((256, 1024), 0.01, jnp.float32)
step = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ jnp.tanh(w.T)))
for _ in range(2):
  step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"faults_per_call": faults}))
"""


def _faults_per_call(keep_host_memory: str) -> float:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             BIGJAX_KEEP_HOST_MEMORY=keep_host_memory)
  out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])["faults_per_call"]


def _transparent_huge_pages_always() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[always]" in f.read()
  except OSError:
    return False


@pytest.mark.skipif(_transparent_huge_pages_always(),
                    reason="with transparent huge pages always on, a fresh mapping faults once per 2 MB, not per 4 KB")
def test_xla_cpu_buffers_are_reused_instead_of_faulted_in_every_execution():
  faulted = _faults_per_call("0")
  reused = _faults_per_call("1")
  assert faulted > 16_000, faulted  # 64 MB or more in 4 KB pages: the buffer comes back fresh each time
  assert reused < faulted / 20, (reused, faulted)


def test_nothing_is_changed_once_the_backend_has_started():
  assert jax.devices()  # conftest started the CPU backend: its threads already have their arenas
  assert not host_memory.keep_freed_host_memory()


def test_only_cpu_platforms_get_the_settings():
  assert host_memory.runs_on_cpu_only("cpu")
  assert not host_memory.runs_on_cpu_only("cuda,cpu")
  assert not host_memory.runs_on_cpu_only("tpu")
