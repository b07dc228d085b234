"""Host-side metrics: sums accumulated between log steps, written to metrics.jsonl and the console."""

import json
import math
import os
import sys
import time

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


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


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
  """Appends one JSON object per logged step to `workdir/metrics.jsonl` and prints a console line.

  Only process 0 writes. On resume, records after the restored step (written by a run that died
  before its next checkpoint) are dropped, so each step appears exactly once.
  """

  def __init__(self, workdir: str, *, unit: str, num_steps: int, resumed_step: int = 0, stream=None):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.unit, self.num_steps = unit, num_steps
    self.stream = stream or sys.stdout
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._truncate_after(resumed_step)

  def _truncate_after(self, step: int) -> None:
    if not os.path.exists(self.path):
      return
    kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, self.path)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    self.stream.write(format_record(record, self.num_steps, self.unit) + "\n")
    self.stream.flush()


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
    elif isinstance(value, float) and (abs(value) < 1e-3 or abs(value) >= 1e4) and value != 0 and math.isfinite(value):
      parts.append(f"{key} {value:.3e}")
    elif isinstance(value, float):
      parts.append(f"{key} {value:.4f}")
    else:
      parts.append(f"{key} {value}")
  return " | ".join(parts)


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
