"""Faults that lose or mix work, each reproduced through the CLI: a second run on a busy workdir,
damaged checkpoints, a full disk, read-only directories, a torn metrics line, a diverged loss, a
damaged export. Each ends in a one-line error or a recovery, with nothing lost and no traceback."""

import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bigjax import checkpoint
from bigjax import metrics
from bigjax import models
from bigjax import workdir
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "experiments.transformer",
    "--flagfile=experiments/configs/transformer_tiny.flags",
    "--seq_len=32",
    "--batch_size=8",
    "--model_override=num_layers=1",
    "--model_override=embed_dim=32",
    "--model_override=mlp_dim=64",
    "--eval_batches=2",
    "--log_every=1",
    "--checkpoint_every=2",
    "--eval_every=2",
]


def _command(workdir_path, data_dir, *extra):
  module, *flags = TINY
  return [
      sys.executable,
      "-m",
      module,
      *flags,
      f"--workdir={workdir_path}",
      f"--data_dir={data_dir}",
      *extra,
  ]


def _env():
  return cpu_env()


def _run(workdir_path, data_dir, *extra, ok=True):
  result = subprocess.run(
      _command(workdir_path, data_dir, *extra),
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  if ok:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
  return result


def _assert_one_line_error(result, message):
  """Exit code 1, no traceback, and the message as the last line (TFDS may warn above it while it
  prepares a data set for the first time)."""
  assert result.returncode == 1, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, result.stderr


def _steps(path):
  return [r["step"] for r in metrics.read_jsonl(os.path.join(path, metrics.METRICS_FILE))]


def _losses(path):
  return {
      r["step"]: r["train_loss"]
      for r in metrics.read_jsonl(os.path.join(path, metrics.METRICS_FILE))
  }


def _damage(step_dir):
  """Overwrites 8 bytes in the middle of the step's largest array file: still readable, wrong values."""
  path = max(
      glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize
  )
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 8)


def _listing(path):
  return sorted(
      os.path.relpath(os.path.join(root, name), path)
      for root, dirs, files in os.walk(path)
      for name in dirs + files
  )


# ---- one run per workdir -----------------------------------------------------------------------------


def test_a_second_run_is_refused_while_the_first_trains_and_the_first_loses_nothing(
    tmp_path, data_dir
):
  first = subprocess.Popen(
      _command(tmp_path, data_dir, "--num_steps=100000", "--checkpoint_every=1000"),
      cwd=REPO,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  try:
    deadline = time.time() + 300
    while not (os.path.exists(tmp_path / metrics.METRICS_FILE) and _steps(tmp_path)):
      assert first.poll() is None and time.time() < deadline, first.communicate()
      time.sleep(0.1)
    second = _run(tmp_path, data_dir, "--num_steps=4", ok=False)
    _assert_one_line_error(
        second, f"is in use by another run (host {socket.gethostname()}, pid {first.pid}"
    )
  finally:
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
  assert first.returncode == 0, stderr
  saved = _steps(tmp_path)[-1]
  assert _steps(tmp_path) == list(range(1, saved + 1))  # the first run's steps only, each once
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)  # released on exit

  # A crash mid-write cut the last metrics record short: the resumed run repairs it.
  with open(tmp_path / metrics.METRICS_FILE, "a") as f:
    f.write('{"step": 99, "train_lo')
  resumed = _run(tmp_path, data_dir, f"--num_steps={saved + 1}")
  assert f"resumed from step {saved}" in resumed.stdout
  assert _steps(tmp_path) == list(range(1, saved + 2))


def _lock_file(path, **holder):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, workdir.LOCK_FILE), "w") as f:
    json.dump(
        {
            "host": socket.gethostname(),
            "boot_id": workdir._boot_id(),
            "pid": os.getpid(),
            "started": "2026-12-01T00:00:00+00:00",
            "token": "other",
            **holder,
        },
        f,
    )


def test_a_lock_held_by_a_live_process_here_refuses_and_a_dead_ones_is_taken_over(tmp_path):
  # This (live) process holds it
  _lock_file(tmp_path, pid_start=workdir._process_start(os.getpid()))
  with pytest.raises(
      UserError, match=f"in use by another run .host {socket.gethostname()}, pid {os.getpid()}"
  ):
    workdir.WorkdirLock(tmp_path).acquire()
  finished = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  _lock_file(tmp_path, pid=int(finished.stdout))  # a process that has exited
  lock = workdir.WorkdirLock(tmp_path)
  lock.acquire()
  try:
    with open(tmp_path / workdir.LOCK_FILE) as f:
      assert json.load(f)["token"] == lock.me["token"]
  finally:
    lock.release()
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)


def test_a_lock_from_another_host_is_judged_by_its_heartbeat(tmp_path):
  _lock_file(tmp_path, host="node-7", pid=1)
  with pytest.raises(UserError, match="host node-7, pid 1"):
    workdir.WorkdirLock(tmp_path).acquire()
  stale = time.time() - 2 * workdir.STALE_S
  os.utime(tmp_path / workdir.LOCK_FILE, (stale, stale))  # node-7 stopped refreshing it
  lock = workdir.WorkdirLock(tmp_path)
  lock.acquire()
  lock.release()


def test_claims_nest_within_one_process(tmp_path):
  with workdir.claim(tmp_path) as outer, workdir.claim(tmp_path) as inner:
    assert inner is outer
    assert os.path.exists(tmp_path / workdir.LOCK_FILE)
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)


# ---- damaged checkpoints ------------------------------------------------------------------------------


def test_damaged_checkpoints_are_never_trained_on(tmp_path, data_dir):
  _run(tmp_path, data_dir, "--num_steps=4")
  fresh_losses = _losses(tmp_path)
  _damage(tmp_path / "checkpoints" / "4")  # readable, but its values are no longer what was saved
  resumed = _run(tmp_path, data_dir, "--num_steps=4")
  assert "checkpoint step 4" in resumed.stderr and "differ from what was saved" in resumed.stderr
  assert "resumed from step 2" in resumed.stdout
  assert _losses(tmp_path) == fresh_losses  # steps 3-4 again, exactly as the first time

  # Every step damaged: refused, and nothing in the workdir changes.
  for step in ("2", "4"):
    _damage(tmp_path / "checkpoints" / step)
  before = (_listing(tmp_path), (tmp_path / metrics.METRICS_FILE).read_text())
  refused = _run(tmp_path, data_dir, "--num_steps=4", ok=False)
  _assert_one_line_error(refused, "every checkpoint in")
  assert "--allow_restart" in refused.stderr
  assert (_listing(tmp_path), (tmp_path / metrics.METRICS_FILE).read_text()) == before

  # With --allow_restart: said in one line, the old metrics kept, the same batches as a fresh run.
  restarted = _run(tmp_path, data_dir, "--num_steps=4", "--allow_restart")
  assert "starting again from step 0" in restarted.stdout
  kept = glob.glob(str(tmp_path / f"{metrics.METRICS_FILE}.before-restart-*"))
  assert len(kept) == 1 and open(kept[0]).read() == before[1]
  assert _losses(tmp_path) == fresh_losses


def test_a_resume_on_other_data_is_refused_unless_allowed(tmp_path, data_dir):
  """A resumed run continues its checkpoint's batch position: on another data set that would mix
  two runs' data under one step count."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(
      "\n".join(f"line {i} of a corpus made here, unlike the first" for i in range(400))
  )
  workdir = tmp_path / "run"
  _run(workdir, data_dir, "--num_steps=2")
  other = (f"--dataset=textlines:{corpus}", "--num_steps=4")
  refused = _run(workdir, data_dir, *other, ok=False)
  _assert_one_line_error(refused, "checkpoint step 2 in")
  assert "was trained on other data than these flags read (its first training examples differ" in (
      refused.stderr
  )
  assert "--allow_new_data" in refused.stderr
  assert _steps(workdir) == [1, 2] and checkpoint.saved_steps(str(workdir)) == [2]  # unchanged
  allowed = _run(workdir, data_dir, *other, "--allow_new_data")
  assert "step 2 was trained on other data (its first training examples differ" in allowed.stdout
  assert _steps(workdir) == [1, 2, 3, 4]
  # A one-run override: the run's flagfile does not carry it on.
  assert "allow_new_data" not in (workdir / "flags.txt").read_text()
  # The checkpoints written since hold the new data's identity: the new flags resume as they are.
  resumed = _run(workdir, data_dir, f"--dataset=textlines:{corpus}", "--num_steps=6")
  assert "resumed from step 4" in resumed.stdout and "other data" not in resumed.stdout
  # Steps 4 and 6 damaged: the fall-back to step 2 (the first data's) is refused before either
  # damaged step is set aside.
  for step in ("4", "6"):
    _damage(workdir / "checkpoints" / step)
  before = _listing(workdir)
  refused = _run(workdir, data_dir, f"--dataset=textlines:{corpus}", "--num_steps=8", ok=False)
  _assert_one_line_error(refused, "checkpoint step 2 in")
  assert _listing(workdir) == before


def test_a_damaged_export_given_to_init_from_is_one_line(tmp_path, data_dir):
  model = models.create("transformer-tiny", num_layers=1, embed_dim=32, mlp_dim=64)
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  export = checkpoint.export(
      str(tmp_path / "export"),
      variables,
      "transformer-tiny",
      {"num_layers": 1, "embed_dim": 32, "mlp_dim": 64},
  )
  path = max(
      glob.glob(os.path.join(export, "variables", "ocdbt.process_0", "d", "*")), key=os.path.getsize
  )
  os.truncate(path, os.path.getsize(path) // 3)  # a copy cut short
  result = _run(tmp_path / "run", data_dir, "--num_steps=2", f"--init_from={export}", ok=False)
  _assert_one_line_error(result, f"{export} is damaged or incomplete")


def test_orbax_read_coroutines_left_failing_print_nothing_and_others_still_do():
  """The failed reads behind that one line would print a traceback each as the process exits."""
  from bigjax import flags as bigjax_flags  # pylint: disable=g-import-not-at-top

  def coroutine_from(filename):
    namespace = {}
    exec(compile("async def read(): pass", filename, "exec"), namespace)  # pylint: disable=exec-used
    return namespace["read"]()

  seen = []
  hook = bigjax_flags._drop_orbax_coroutine_errors(seen.append)  # pylint: disable=protected-access
  orbax_read, own = coroutine_from(
      f"{os.sep}site{os.sep}orbax{os.sep}serialization.py"
  ), coroutine_from("mine.py")
  for obj in (orbax_read, own, None):
    hook(
        types.SimpleNamespace(
            exc_type=Exception, exc_value=Exception("read failed"), exc_traceback=None, object=obj
        )
    )
  assert [u.object for u in seen] == [own, None]
  orbax_read.close(), own.close()


def test_orbax_tasks_failed_and_never_retrieved_log_nothing_and_others_still_do(caplog):
  """The reads failing beside the one Orbax raised are tasks whose exception nobody retrieves:
  asyncio logs each with its traceback when it is collected, after bigjax's one line."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top

  from bigjax import flags as bigjax_flags  # pylint: disable=g-import-not-at-top

  def failing_read_from(filename):
    namespace = {}
    exec(compile("async def read(): raise ValueError('read failed')", filename, "exec"), namespace)  # pylint: disable=exec-used
    return namespace["read"]

  asyncio_logger = logging.getLogger("asyncio")
  asyncio_logger.addFilter(bigjax_flags._without_orbax_errors)  # pylint: disable=protected-access
  loop = asyncio.new_event_loop()
  try:
    for filename in (f"{os.sep}site{os.sep}orbax{os.sep}serialization.py", "mine.py"):
      task = loop.create_task(failing_read_from(filename)())
      loop.run_until_complete(asyncio.sleep(0.01))
      assert task.done()
      del task
      gc.collect()
  finally:
    loop.close()
    asyncio_logger.removeFilter(bigjax_flags._without_orbax_errors)  # pylint: disable=protected-access
  logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "mine.py" in logged[0], logged
  assert logged[0].startswith("Task exception was never retrieved")


def test_tensorstore_waking_a_closed_event_loop_prints_nothing_and_other_errors_still_do(
    monkeypatch,
):
  """A TensorStore read that finishes after Orbax's failed restore closed the event loop awaiting
  it: TensorStore's wake-up is refused and reported as unraisable (the CI failure of stop 35)."""
  import asyncio  # pylint: disable=g-import-not-at-top

  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  from bigjax import flags as bigjax_flags  # pylint: disable=g-import-not-at-top

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", bigjax_flags._drop_orbax_coroutine_errors(seen.append))  # pylint: disable=protected-access
  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()

  async def read():
    await future

  pending = loop.create_task(read())
  loop.run_until_complete(asyncio.sleep(0))  # the read now awaits the TensorStore future
  loop.close()
  promise.set_result(1)  # its wake-up meets the closed loop
  try:
    raise RuntimeError("Event loop is closed")  # the same error raised elsewhere still prints
  except RuntimeError as e:
    sys.unraisablehook(
        types.SimpleNamespace(
            exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__, object=None
        )
    )
  assert [str(u.exc_value) for u in seen] == ["Event loop is closed"]
  assert seen[0].exc_traceback.tb_frame.f_code.co_name != "call_soon_threadsafe"
  pending._log_destroy_pending = False  # pylint: disable=protected-access  # it can never finish


# ---- full disk, read-only directories -------------------------------------------------------------------


@contextlib.contextmanager
def _tmpfs(path, size_kib, read_only=False):
  """A small file system of its own at `path`, for a full disk or a read-only directory; needs the
  right to mount (root with CAP_SYS_ADMIN, as on CI's machines)."""
  os.makedirs(path, exist_ok=True)
  options = f"size={size_kib}k" + (",ro" if read_only else "")
  mounted = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=True)


def test_a_full_disk_is_one_line_naming_the_last_good_step_and_leaves_nothing_partial(
    tmp_path, data_dir
):
  with _tmpfs(tmp_path / "disk", 4096) as disk:
    run = disk / "run"
    _run(run, data_dir, "--num_steps=2")
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:  # leave less than one checkpoint free
      f.write(b"\0" * (free - 64 * 1024))
    full = _run(run, data_dir, "--num_steps=4", ok=False)
    _assert_one_line_error(full, "could not save checkpoint step 4")
    assert (
        "no space left on the device" in full.stderr
        and "the last good checkpoint is step 2" in full.stderr
    )
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]
    assert not [p for p in _listing(run) if p.endswith(".tmp") or "orbax-checkpoint-tmp" in p]
    os.remove(disk / "filler")
    resumed = _run(run, data_dir, "--num_steps=4")
    assert "resumed from step 2" in resumed.stdout and _steps(run) == [1, 2, 3, 4]


def test_read_only_directories_are_refused_before_training(tmp_path, data_dir):
  with _tmpfs(tmp_path / "run" / "checkpoints", 64, read_only=True):
    result = _run(tmp_path / "run", data_dir, "--num_steps=2", ok=False)
  _assert_one_line_error(
      result, f"cannot write to {tmp_path / 'run' / 'checkpoints'} (the file system is read-only)"
  )
  with _tmpfs(tmp_path / "ro", 64, read_only=True):
    result = _run(tmp_path / "ro", data_dir, "--num_steps=2", ok=False)
  _assert_one_line_error(
      result, f"cannot write to {tmp_path / 'ro'} (the file system is read-only)"
  )


def test_storage_errors_are_recognised_through_wrapping():
  import errno

  wrapped = ValueError(
      "RESOURCE_EXHAUSTED: Error writing local file: No space left on device [os_error_code='28']"
  )
  assert checkpoint.storage_errno(wrapped) == errno.ENOSPC
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert checkpoint.storage_errno(outer) == errno.EROFS
  assert checkpoint.storage_errno(ValueError("shape mismatch")) is None


# ---- losses that cannot go on, and a best metric that never comes ----------------------------------------


def test_a_diverged_loss_stops_the_run_with_advice_about_the_learning_rate(tmp_path, data_dir):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "experiments.cnn",
          "--flagfile=experiments/configs/cnn_tiny.flags",
          f"--workdir={tmp_path}",
          f"--data_dir={data_dir}",
          "--learning_rate=1e6",
          "--warmup_steps=0",
          "--num_steps=20",
          "--log_every=1",
      ],
      cwd=REPO,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  _assert_one_line_error(result, "training diverged: the loss rose from")
  assert "lower --learning_rate" in result.stderr and not os.path.exists(
      tmp_path / "checkpoints" / "20"
  )


@pytest.mark.parametrize(
    "step, start, loss, update, expected",
    [
        (3, 0, 2.0, 1.0, None),
        (3, 0, 4e23, 1.0, "training diverged"),
        (1, 0, float("nan"), 1.0, "the learning rate is not the cause"),  # before any update
        (5, 4, float("nan"), 1.0, "after resuming from step 4"),
        (7, 0, 2.0, float("nan"), "lower --learning_rate"),  # a NaN update with a finite loss
    ],
)
def test_instability_advice_fits_the_cause(step, start, loss, update, expected):
  from bigjax import train

  message = train.instability(step, start, loss, update, first=(start + 1, 2.3))
  assert (message is None) if expected is None else (expected in message), message


def test_a_best_metric_that_the_evaluation_never_reports_is_refused_before_training(
    tmp_path, data_dir
):
  result = _run(tmp_path, data_dir, "--num_steps=2", "--keep_best_metric=eval_bleu", ok=False)
  _assert_one_line_error(
      result, "--keep_best_metric=eval_bleu is not a metric this run's evaluation reports"
  )
  assert "eval_loss" in result.stderr and not os.path.exists(tmp_path / "checkpoints" / "2")


def test_a_checkpoint_directory_that_turns_read_only_mid_run_fails_the_next_save_at_once(tmp_path):
  state = {"w": jnp.arange(1000, dtype=jnp.float32), "step": jnp.int32(1)}
  with _tmpfs(tmp_path / "ckpt", 4096) as directory:
    ckpt = checkpoint.Checkpointer(str(directory), every=1)
    ckpt.save(1, state)
    ckpt.wait()
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)
    start = time.perf_counter()
    with pytest.raises(UserError, match="read-only; the last good checkpoint is step 1"):
      ckpt.save(2, state)
    # A tester saw Orbax wait 5 minutes on a read-only directory
    assert time.perf_counter() - start < 30
    assert sorted(os.listdir(directory)) == ["1"]
