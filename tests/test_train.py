import json
import os

import jax
import numpy as np

from bigjax import metrics
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm
from bigjax.data import pipeline
from tests.cpu_env import cpu_env


def _fit(
    workdir,
    data_dir,
    num_steps,
    *,
    mesh_spec="data:-1,fsdp:2,tensor:2",
    schedule="constant",
    eval_every=4,
    checkpoint_every=3,
):
  model = models.create(
      "transformer-tiny", num_layers=1, embed_dim=32, num_heads=4, mlp_dim=64, max_len=32
  )
  cfg = train.TrainConfig(
      workdir=str(workdir),
      num_steps=num_steps,
      batch_size=8,
      seed=3,
      log_every=1,
      eval_every=eval_every,
      checkpoint_every=checkpoint_every,
  )
  optim_cfg = optim.OptimConfig(learning_rate=3e-3, schedule=schedule, warmup_steps=0)
  train_windows = lm.open_windows("python_stdlib_text", "train", 32, data_dir)
  eval_windows = lm.open_windows("python_stdlib_text", "validation", 32, data_dir)
  mesh = sharding.make_mesh(mesh_spec)
  record = train.fit(
      model=model,
      task=tasks.LanguageModelling(),
      tx=optim.make_optimizer(optim_cfg, num_steps),
      learning_rate=optim.make_schedule(optim_cfg, num_steps),
      train_data=pipeline.train_batches(train_windows, 8, seed=3),
      eval_data=pipeline.eval_batches(eval_windows, 8, max_batches=3),
      config=cfg,
      mesh=mesh,
  )
  return record


def _final_params(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(path)["params"]


def test_fit_trains_logs_and_checkpoints(tmp_path, data_dir):
  record = _fit(tmp_path, data_dir, num_steps=8)
  rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert rows[-1]["train_loss"] < rows[0]["train_loss"]
  assert rows[0]["train_loss"] > 5.0  # near ln(256) = 5.55 at the start
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [4, 8]
  np.testing.assert_allclose(evals[-1]["eval_bits_per_byte"], evals[-1]["eval_loss"] / np.log(2))
  assert record == rows[-1]
  assert {"grad_norm", "learning_rate", "steps_per_sec", "tokens_per_sec"} <= set(rows[-1])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]


def test_rerun_resumes_at_the_next_step_and_matches_an_unbroken_run(tmp_path, data_dir):
  _fit(tmp_path / "unbroken", data_dir, num_steps=7)
  _fit(tmp_path / "broken", data_dir, num_steps=3)  # stops right after its step-3 checkpoint
  _fit(tmp_path / "broken", data_dir, num_steps=7)
  rows = metrics.read_jsonl(tmp_path / "broken" / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 8))
  unbroken_rows = metrics.read_jsonl(tmp_path / "unbroken" / "metrics.jsonl")
  assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in unbroken_rows]
  for a, b in zip(
      jax.tree.leaves(_final_params(tmp_path / "broken", 7)),
      jax.tree.leaves(_final_params(tmp_path / "unbroken", 7)),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def test_metrics_after_the_restored_step_are_dropped(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  path.write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n" for s in range(1, 6)))
  metrics.MetricsLog(str(tmp_path), unit="tokens", num_steps=10, resumed_step=3)
  assert [r["step"] for r in metrics.read_jsonl(path)] == [1, 2, 3]


_CACHE_PROBE = """
import sys
import jax
import jax.numpy as jnp
from jax._src import monitoring
from bigjax import train
events = []
monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
train.enable_compilation_cache(sys.argv[1], min_compile_secs=0.0)
jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
print(events.count("/jax/compilation_cache/cache_hits"))
"""


def test_compilation_cache_lets_a_second_process_skip_compiling(tmp_path):
  import subprocess
  import sys

  cache = tmp_path / "not" / "yet" / "there"
  env = cpu_env()
  hits = [
      subprocess.run(
          [sys.executable, "-c", _CACHE_PROBE, str(cache)],
          env=env,
          capture_output=True,
          text=True,
          check=True,
          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      ).stdout.split()[-1]
      for _ in range(2)
  ]
  # Every program the second process compiles is a hit
  assert int(hits[0]) == 0 and int(hits[1]) >= 1
  assert any(cache.iterdir())
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  assert not train.enable_compilation_cache(str(blocker / "cache"))  # warns, and the run goes on


def _mlp_steps(xla_options):
  model = models.create("mlp", hidden=(64,))
  batch = {"image": np.zeros((16, 8, 8, 1), np.float32), "label": np.zeros((16,), np.int32)}
  mesh = sharding.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
  rng = jax.random.PRNGKey(0)
  with train.mesh_context(mesh):
    steps = train.compile_steps(
        model=model,
        tx=optim.make_optimizer(optim.OptimConfig(), 10),
        task=tasks.Classification(),
        example_batch=batch,
        mesh=mesh,
        rng=rng,
        xla_options=xla_options,
    )
    state = steps.init(rng)
    return steps, state, sharding.host_to_global(batch, mesh)


def test_xla_options_reach_the_compiled_steps_and_a_bad_one_is_a_one_line_error():
  import pytest

  from bigjax.errors import UserError

  def compiled_text(xla_options):
    steps, state, batch = _mlp_steps(xla_options)
    return steps.train_step.lower(state, batch).compile().as_text()

  # XLA's CPU backend runs matmuls through YNNPACK unless this option takes them back.
  assert "ynn_fusion" in compiled_text(None)
  assert "ynn_fusion" not in compiled_text({"xla_cpu_experimental_ynn_fusion_type": ""})
  with pytest.raises(
      UserError,
      match=r"^bad XLA compiler option \(--xla_option\): No such compile option: "
      r"'xla_cpu_no_such_option'$",
  ):
    _mlp_steps({"xla_cpu_no_such_option": 1})


def test_xla_option_values_of_every_type_are_accepted_by_xla():
  import types

  from bigjax import flags as bigjax_flags

  holder = types.SimpleNamespace(
      name="xla_option",
      value=[
          "xla_cpu_enable_fast_math=False",  # bool
          "xla_cpu_parallel_codegen_split_count=2",  # int
          "xla_gpu_auto_spmd_partitioning_memory_budget_ratio=1",  # float, written as a whole number
          "xla_dump_hlo_pass_re=1",  # string that looks like a number
          " xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE ",
          "xla_cpu_experimental_ynn_fusion_type=",  # empty: the last value of a name wins
      ],
  )
  options = bigjax_flags.xla_options(holder)
  assert (
      options["xla_cpu_enable_fast_math"] is False
      and options["xla_cpu_experimental_ynn_fusion_type"] == ""
  )
  train.check_xla_options(options)  # XLA takes each one (raises UserError otherwise)


def test_platform_specific_xla_options_apply_only_on_their_platform():
  options = {"xla_cpu_a": 1, "xla_gpu_b": True, "xla_tpu_c": "x", "xla_d": 0.5}
  assert train.platform_xla_options(options, "cpu") == {"xla_cpu_a": 1, "xla_d": 0.5}
  assert train.platform_xla_options(options, "gpu") == {"xla_gpu_b": True, "xla_d": 0.5}
  assert train.platform_xla_options(options, "tpu") == {"xla_tpu_c": "x", "xla_d": 0.5}


def test_the_compilation_cache_follows_jaxs_own_environment_variables(tmp_path, monkeypatch):
  import subprocess
  import sys

  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "from-env"))
  default = subprocess.run(
      [
          sys.executable,
          "-c",
          "from bigjax import flags; print(flags.COMPILATION_CACHE_DIR.default)",
      ],
      env=env,
      capture_output=True,
      text=True,
      check=True,
  ).stdout.strip()
  assert default == str(tmp_path / "from-env")
  saved = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  try:
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")
    assert train.enable_compilation_cache(str(tmp_path / "cache"))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.25
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    assert train.enable_compilation_cache(str(tmp_path / "cache"))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
  finally:  # the session's own cache (tests/conftest.py)
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
