"""bigjax.host_memory: the glibc settings are applied when they should be and left alone otherwise,
and with them XLA's CPU buffers are reused from one execution to the next (few page faults per
call). Whether glibc's *defaults* fault the buffer in afresh depends on the machine (seen: 150-740
faults per call on one, 16,000+ on another), so that is measured by benchmarks/host_memory.py, not
asserted here. Run in fresh processes: the settings only reach XLA's threads when they are applied
before the CPU backend starts, and conftest has started it in this one."""

import json
import subprocess
import sys

import jax
import pytest

from bigjax import host_memory
from tests.cpu_env import cpu_env

# Reports whether the settings were applied, and the page faults of one execution of a program whose
# temporary buffer (a 64 MiB matmul output, [16384, 1024] float32, and more) is larger than glibc's
# 64 MiB secondary-arena heaps. With THP_DISABLE set, the process gets no transparent huge pages
# (prctl PR_SET_THP_DISABLE), as on a machine whose setting is `never`: every fresh 4 KiB page faults.
PROGRAM = """
import ctypes, json, os, resource
if os.environ.get("THP_DISABLE") == "1":
  assert ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0) == 0  # PR_SET_THP_DISABLE
from bigjax import host_memory
import jax, jax.numpy as jnp
applied = host_memory.keep_freed_host_memory()  # before the CPU backend starts, as a user's script calls it
x = jnp.ones((16384, 256), jnp.float32)
w = jnp.full((256, 1024), 0.01, jnp.float32)
step = jax.jit(lambda x, w: jnp.sum(jnp.tanh(x @ w) @ jnp.tanh(w.T)))
for _ in range(2):
  step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"applied": applied, "faults_per_call": faults}))
"""
# With the settings a call reuses the heap it used before: 0-24 faults per GPT step were seen,
# against 150-140,000 under glibc's defaults on different machines (64 MiB afresh would be 16,384).
FEW_FAULTS = 100


def _run_program(**env_vars) -> dict:
  env = cpu_env(**env_vars)
  out = subprocess.run(
      [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


# How each transparent-huge-page setting is reached from one machine: its own, `never` by the prctl
# above, and `always` for malloc's memory by glibc's tunable that madvises every heap it maps.
HUGE_PAGES = {
    "as this machine has them": {"THP_DISABLE": "0"},
    "off for the process (as never)": {"THP_DISABLE": "1"},
    "on for every allocation (as always)": {
        "THP_DISABLE": "0",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    },
}


@pytest.mark.parametrize("huge_pages", HUGE_PAGES)
def test_with_the_settings_xla_cpu_buffers_are_reused(huge_pages):
  result = _run_program(**HUGE_PAGES[huge_pages])
  assert result["applied"]
  # A reused buffer takes (almost) no faults, whatever the kernel's huge-page setting.
  assert result["faults_per_call"] < FEW_FAULTS, result


def test_turned_off_by_the_environment_variable():
  assert not _run_program(BIGJAX_KEEP_HOST_MEMORY="0")["applied"]


def test_nothing_is_changed_once_the_backend_has_started():
  assert jax.devices()  # conftest started the CPU backend: its threads already have their arenas
  assert not host_memory.keep_freed_host_memory()


def test_only_cpu_platforms_get_the_settings():
  assert host_memory.runs_on_cpu_only("cpu")
  assert not host_memory.runs_on_cpu_only("cuda,cpu")
  assert not host_memory.runs_on_cpu_only("tpu")


def _applied_after(program: str) -> str:
  env = cpu_env()
  out = subprocess.run(
      [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-1]


def test_importing_bigjax_changes_nothing_and_the_cli_entry_point_applies_the_settings():
  imports = "import bigjax, bigjax.flags, bigjax.train, bigjax.models, bigjax.data.lm, experiments.transformer"
  assert (
      _applied_after(f"{imports}; from bigjax import host_memory; print(host_memory.applied())")
      == "False"
  )
  cli = (
      f"{imports}, sys; from bigjax import host_memory; sys.argv = ['x']; "
      "bigjax.flags.run(lambda argv: print(host_memory.applied()))"
  )
  assert _applied_after(cli) == "True"
