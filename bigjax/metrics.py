"""Host-side metrics: sums accumulated between log steps, written to metrics.jsonl and the console."""

import dataclasses
import io
import json
import math
import os
import socket
import sys
import time
import zlib

import jax
import numpy as np
from etils import epath
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from bigjax import config_checks as checks
from bigjax import storage
from bigjax import workdir
from bigjax.errors import UserError

METRICS_FILE = "metrics.jsonl"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"  # the W&B run that a resumed run continues


def console(message: str) -> None:
  """A line on stdout from process 0 only (in a multi-process run every process would repeat it)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def add_sums(total: dict | None, sums: dict) -> dict:
  """Adds two dicts of additive values (numpy scalars or floats) key by key."""
  sums = {k: float(np.asarray(v)) for k, v in sums.items()}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in total}


def fingerprint(batch: dict) -> str:
  """The CRC32 of a host batch's arrays in key order, as 8 hex digits: equal batches, equal
  fingerprints (and a string, which TensorBoard leaves out)."""
  crc = 0
  for key in sorted(batch):
    crc = zlib.crc32(np.ascontiguousarray(batch[key]), zlib.crc32(key.encode(), crc))
  return f"{crc:08x}"


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSON-lines file. A last line cut short (a crash mid-write) is left out: the
  run that resumes rewrites the file without it."""
  lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines, 1):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise UserError(
            f"{path}: line {number} is not JSON ({line.strip()[:60]!r}); only a last line cut short "
            "by a crash is repaired: fix or remove that line"
        ) from None
  return records


def set_aside_previous_run(workdir: str) -> list[str]:
  """Renames an earlier run's metrics.jsonl, TensorBoard directory and W&B run id (a restart from
  step 0 keeps them, never overwrites them, and starts a W&B run of its own); the new names."""
  suffix = f".before-restart-{int(time.time())}"
  moved = []
  for name in (METRICS_FILE, "tensorboard", WANDB_RUN_ID_FILE):
    path = os.path.join(workdir, name)
    if jax.process_index() == 0 and storage.exists(path):
      storage.rename(path, path + suffix)
      moved.append(path + suffix)
  return moved


class RewrittenEventFile:
  """An event file on an object store, which cannot append: the events so far are kept and the
  whole file is written again on each flush (a run's scalars are small). EventFileWriter's
  appends there would leave only the last event."""

  def __init__(self, directory: str):
    name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(directory, name)
    self._buffer = io.BytesIO()
    self._records = record_writer.RecordWriter(self._buffer)
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def add_event(self, event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    epath.Path(self.path).write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class TensorBoard:
  """Scalars as TensorBoard event files in `directory`, written with TensorBoard's own writer (no
  TensorFlow needed), or rewritten whole on an object store."""

  def __init__(self, directory: str):
    if storage.is_remote(directory):
      self._writer = RewrittenEventFile(directory)
    else:
      self._writer = EventFileWriter(directory)

  def write(self, record: dict) -> None:
    values = [
        summary_pb2.Summary.Value(tag=key, simple_value=float(value))
        for key, value in record.items()
        if key != "step" and isinstance(value, (int, float))
    ]
    self._writer.add_event(
        event_pb2.Event(
            wall_time=time.time(),
            step=int(record["step"]),
            summary=summary_pb2.Summary(value=values),
        )
    )
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """A Weights & Biases run in `project` that receives every record, with `config` (the CLI: its
  flags) as the run's config. wandb's own environment variables apply (WANDB_MODE=offline,
  WANDB_ENTITY, WANDB_API_KEY; WANDB_DIR, else the workdir, holds its local files)."""

  project: str
  config: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not (isinstance(self.project, str) and self.project):
      checks.fail(self, f"project={self.project!r} must be the name of a W&B project")
    import_wandb()  # a missing package fails where the run is configured, not after compiling


def import_wandb():
  """The wandb module, an optional dependency; a one-line error naming the extra without it."""
  try:
    import wandb  # here, not at the top: only a run that asks for W&B needs it installed
  except ImportError:
    raise UserError('--wandb_project needs the wandb package: pip install -e ".[wandb]"') from None
  return wandb


class Wandb:
  """Scalars as a W&B run, at the run's own step numbers. The run's id is kept in
  `directory`/wandb_run_id.txt, so a resumed run continues the same W&B run."""

  def __init__(self, cfg: WandbConfig, directory: str):
    wandb = import_wandb()
    id_path = os.path.join(directory, WANDB_RUN_ID_FILE)
    run_id = storage.read_text(id_path).strip() if storage.exists(id_path) else None
    # wandb keeps its files on the local disk: a remote workdir leaves them to wandb's default.
    local_dir = None if storage.is_remote(directory) else directory
    try:
      self._run = wandb.init(
          project=cfg.project,
          id=run_id,
          resume="allow",
          config=cfg.config,
          dir=os.environ.get("WANDB_DIR", local_dir),
      )
    except wandb.errors.Error as e:  # no API key, no network, a project that is not yours
      raise UserError(
          f"cannot start the W&B run: {str(e).splitlines()[0]} (WANDB_MODE=offline writes it "
          "locally, for `wandb sync` later)"
      ) from None
    if run_id is None:
      workdir.replace_file(id_path, self._run.id + "\n")

  def write(self, record: dict) -> None:
    self._run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

  def close(self) -> None:
    self._run.finish()


class MetricsLog:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl`, the same scalars to
  TensorBoard event files in `workdir/tensorboard` (and to a W&B run, given `wandb`), and prints a
  console line.

  Only process 0 writes. On resume, records after the restored step (written by a run that died
  before its next checkpoint) are dropped, so each step appears exactly once.
  """

  def __init__(
      self,
      workdir: str,
      *,
      unit: str,
      num_steps: int,
      resumed_step: int = 0,
      stream=None,
      wandb: WandbConfig | None = None,
  ):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.unit, self.num_steps = unit, num_steps
    self.stream = stream or sys.stdout
    self.enabled = jax.process_index() == 0
    self.writers = []  # where each record goes besides metrics.jsonl and the console
    self._remote_text = None  # on an object store: the file's contents so far
    if self.enabled:
      if not storage.is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
      self._truncate_after(resumed_step)
      if storage.is_remote(workdir):
        self._remote_text = storage.read_text(self.path) if storage.exists(self.path) else ""
      self.writers.append(TensorBoard(os.path.join(workdir, "tensorboard")))
      if wandb is not None:
        self.writers.append(Wandb(wandb, workdir))
    self.progress = Progress(num_steps, unit, self.stream) if self.enabled else None

  def _truncate_after(self, step: int) -> None:
    """Drops records after `step` and a torn last line; rewrites the file only when that changes it."""
    if not storage.exists(self.path):
      return
    before = storage.read_text(self.path)
    kept = "".join(json.dumps(r) + "\n" for r in read_jsonl(self.path) if r.get("step", 0) <= step)
    if kept != before:
      workdir.replace_file(self.path, kept)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    try:
      if self._remote_text is not None:  # an object store cannot append: rewritten whole
        self._remote_text += line
        storage.write_whole(self.path, self._remote_text)
      else:
        with open(self.path, "a") as f:
          f.write(line)
    except OSError as e:
      raise UserError(
          f"cannot append to {self.path} ({e.strerror or e}); free space or fix the directory, then "
          "rerun to resume from the last checkpoint"
      ) from None
    for writer in self.writers:
      writer.write(record)
    self.progress.clear()
    self.stream.write(format_record(record, self.num_steps, self.unit) + "\n")
    self.stream.flush()

  def step(self, step: int, loss: float, units: float) -> None:
    """Per-step progress (a live line on a terminal; nothing otherwise)."""
    if self.enabled:
      self.progress.update(step, loss, units)

  def close(self) -> None:
    if self.enabled:
      self.progress.clear()
      for writer in self.writers:
        writer.close()


def format_record(record: dict, num_steps: int, unit: str) -> str:
  """One console line: step, losses, speed."""
  parts = [f"step {record['step']:>{len(str(num_steps))}}/{num_steps}"]
  for key, value in record.items():
    if key == "step":
      continue
    if key == f"{unit}_per_sec":
      parts.append(f"{value:,.0f} {unit}/s")
    elif key == "steps_per_sec":
      parts.append(f"{value:.2f} steps/s")
    elif (
        isinstance(value, float)
        and (abs(value) < 1e-3 or abs(value) >= 1e4)
        and value != 0
        and math.isfinite(value)
    ):
      parts.append(f"{key} {value:.3e}")
    elif isinstance(value, float):
      parts.append(f"{key} {value:.4f}")
    else:
      parts.append(f"{key} {value}")
  return " | ".join(parts)


class Progress:
  """A single self-rewriting line on a terminal: step/total, loss, steps/s, units/s, ETA.

  Silent when the stream is not a terminal (logs and CI keep only the per-log-step lines).
  """

  def __init__(self, num_steps: int, unit: str, stream):
    self.num_steps, self.unit, self.stream = num_steps, unit, stream
    self.live = hasattr(stream, "isatty") and stream.isatty()
    self._last = None  # (time, step)
    self._steps_per_sec = self._units_per_sec = None
    self._shown = False

  def update(self, step: int, loss: float, units: float) -> None:
    now = time.perf_counter()
    if self._last is not None and step > self._last[1]:
      dt = (now - self._last[0]) / (step - self._last[1])
      rate, unit_rate = 1.0 / max(dt, 1e-9), units / max(dt, 1e-9)
      smooth = lambda old, new: new if old is None else 0.9 * old + 0.1 * new
      self._steps_per_sec, self._units_per_sec = smooth(self._steps_per_sec, rate), smooth(
          self._units_per_sec, unit_rate
      )
    self._last = (now, step)
    if not self.live or self._steps_per_sec is None:
      return
    eta = (self.num_steps - step) / self._steps_per_sec
    done = int(20 * step / self.num_steps)
    line = (
        f"[{'=' * done}{'.' * (20 - done)}] {step}/{self.num_steps} | loss {loss:.4f} | "
        f"{self._steps_per_sec:.2f} steps/s | {self._units_per_sec:,.0f} {self.unit}/s | ETA {format_seconds(eta)}"
    )
    self.stream.write("\r" + line + "\x1b[K")
    self.stream.flush()
    self._shown = True

  def clear(self) -> None:
    if self._shown:
      self.stream.write("\r\x1b[K")
      self.stream.flush()
      self._shown = False


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Throughput:
  """Steps and units (tokens, images) per second between two calls of `rate`."""

  def __init__(self):
    self._time, self._steps, self._units = time.perf_counter(), 0, 0.0

  def add(self, steps: int, units: float) -> None:
    self._steps += steps
    self._units += units

  def rate(self) -> tuple[float, float] | None:
    """(steps/s, units/s) since the last call; None when no step was counted."""
    if not self._steps:
      return None
    now = time.perf_counter()
    elapsed = max(now - self._time, 1e-9)
    rates = (self._steps / elapsed, self._units / elapsed)
    self._time, self._steps, self._units = now, 0, 0.0
    return rates

  def pause(self):
    """Excludes what follows (eval, checkpointing) until the next `resume` from the measured time."""
    self._paused_at = time.perf_counter()

  def resume(self):
    self._time += time.perf_counter() - self._paused_at
