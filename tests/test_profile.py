"""--profile_steps: a jax.profiler trace of steps of the real run, read back with the converter that
TensorBoard's profile plugin and `xprof --logdir` serve the trace viewer from (xprof's own)."""

import collections
import glob
import json

import jax
import jax.numpy as jnp
import pytest
from xprof.convert import raw_to_tool_data

from bigjax import train
from bigjax.errors import UserError
from tests.test_cli import TINY_RUN
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run


def _train_step_runs(xplane: str) -> collections.Counter:
  """Trace-viewer events per execution (run id) of the jitted train step in the trace."""
  data, _ = raw_to_tool_data.xspace_to_tool_data([xplane], "trace_viewer", {})
  assert data, f"xprof could not convert {xplane}"
  return collections.Counter(
      event["args"]["run_id"]
      for event in json.loads(data)["traceEvents"]
      if event.get("args", {}).get("hlo_module") == "jit_train_step"
  )


def test_the_trace_holds_the_device_work_of_exactly_those_steps(tmp_path, data_dir):
  tiny = [*TINY_RUN, f"--workdir={tmp_path}", f"--data_dir={data_dir}", "--log_every=1"]
  result = _run(*tiny, "--num_steps=5", "--profile_steps=2:4")
  assert result.returncode == 0, result.stderr
  directory = tmp_path / "profile" / "process_0"
  assert f"profile of steps 2-3 written to {directory}" in result.stdout
  (xplane,) = glob.glob(str(directory / "plugins" / "profile" / "*" / "*.xplane.pb"))
  runs = _train_step_runs(xplane)
  # Steps 2 and 3, each with its device ops: not step 1 still running when the trace started,
  # nor step 4, and not only their dispatch.
  assert len(runs) == 2 and min(runs.values()) > 10, runs


def test_a_run_that_stops_inside_the_window_still_writes_its_trace(tmp_path):
  step = jax.jit(lambda x: x * 2)
  with pytest.raises(RuntimeError, match="failed at step 2"):
    with train._ProfileTrace(range(1, 4), str(tmp_path)) as profile:
      for number in (1, 2):
        profile.before(number, None)
        profile.after(number, step(jnp.ones(4)))
      raise RuntimeError("failed at step 2")
  assert not profile.tracing
  assert glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))


def test_a_resumed_run_traces_only_the_steps_it_trains():
  assert train.traced_steps((2, 4), 0, 5) == range(2, 4)
  assert train.traced_steps((2, 9), 0, 5) == range(2, 6)  # a window past the end ends with the run
  assert train.traced_steps((2, 6), 3, 8) == range(4, 6)  # resumed inside the window
  assert not train.traced_steps((2, 4), 3, 8)  # resumed after it
  assert not train.traced_steps(None, 0, 5)


@pytest.mark.parametrize(
    "value,message",
    [
        ("5", "--profile_steps='5' must look like START:END, e.g. --profile_steps=10:13"),
        ("4:2", "TrainConfig: profile_steps=(4, 2) must be (START, END) with 1 <= START < END"),
    ],
)
def test_cli_bad_profile_steps(tmp_path, data_dir, value, message):
  tiny = [*TINY_RUN, f"--workdir={tmp_path}", f"--data_dir={data_dir}", "--num_steps=5"]
  _assert_one_line_error(_run(*tiny, f"--profile_steps={value}"), 1, message)


@pytest.mark.parametrize(
    "window,message",
    [
        ((3, 3), "profile_steps=(3, 3) must be (START, END) with 1 <= START < END"),
        ((-2, 3), "profile_steps=(-2, 3) must be (START, END) with 1 <= START < END"),
        ((0, 3), "profile_steps=(0, 3) must be (START, END) with 1 <= START < END"),
        ((1.5, 3), "profile_steps=(1.5, 3) must be (START, END)"),
        ((6, 8), "profile_steps=(6, 8) starts after the last step (num_steps=5)"),
    ],
)
def test_bad_windows_are_one_line(window, message):
  with pytest.raises(UserError) as error:
    train.TrainConfig(workdir="/unused", num_steps=5, batch_size=8, profile_steps=window)
  assert str(error.value).startswith(f"TrainConfig: {message}") and "\n" not in str(error.value)
