"""Where the time of one bigjax train step goes: a jax.profiler trace of a few steps, each XLA
operation's time attributed to the forward or the backward pass and to a kind of work.

  python -m benchmarks.profile_step --model=transformer-tiny --model_override=num_layers=4 \
      --batch_size=16 --seq_len=256

Takes the same flags as benchmarks/throughput.py. The trace (Perfetto JSON, openable at
ui.perfetto.dev, and the XPlane file TensorBoard's profile plugin reads) and the optimised HLO
(train_step.hlo.txt) stay in --profile_dir.
Each compiled HLO instruction carries the JAX name stack it came from in its metadata: names
under `transpose(...)` are the backward pass, other names under `jvp(...)` the forward, the rest
the optimizer update and bookkeeping. Prints one JSON line per (pass, kind), slowest first, then
the top operations. `kind` is the JAX primitive an operation (or a fusion's root) came from.
"""

import collections
import glob
import gzip
import json
import os
import re

import jax
from absl import flags

from benchmarks import throughput
from bigjax import flags as bigjax_flags
from bigjax import optim
from bigjax import sharding

PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "/tmp/bigjax_profile", "Where the trace is written."
)
TOP = flags.DEFINE_integer("top", 25, "How many of the slowest operations to list.", lower_bound=0)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?(?: ([a-z\-]+)\()(.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KIND = re.compile(r"kind=(k\w+)")


def hlo_instructions(hlo_text: str) -> dict[str, dict]:
  """name -> {opcode, pass, what}: the pass from the metadata's name stack, `what` the last JAX
  primitive name there (dot_general, exp, ...), or the fusion kind."""
  table = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    op_name = (_OP_NAME.search(rest) or [None, ""])[1]
    kind = _KIND.search(rest)
    table[name] = {
        "opcode": opcode + (f":{kind.group(1)}" if kind else ""),
        "pass": pass_of(op_name),
        "what": op_name.rsplit("/", 1)[-1] if op_name else opcode,
    }
  return table


def pass_of(op_name: str) -> str:
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "update/other" if op_name else "unattributed"


def trace_durations(profile_dir: str) -> collections.Counter:
  """Total microseconds per event name over the newest Perfetto trace in profile_dir."""
  paths = sorted(
      glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True),
      key=os.path.getmtime,
  )
  with gzip.open(paths[-1]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      totals[event["name"]] += event.get("dur", 0)
  return totals


def attribute(durations: collections.Counter, table: dict[str, dict], steps: int):
  """(per (pass, kind) ms per step, top ops) from event durations matched to HLO instructions."""
  by_group, ops = collections.Counter(), []
  for name, micros in durations.items():
    info = table.get(name)
    if info is None:
      continue
    ms = micros / 1e3 / steps
    by_group[(info["pass"], info["what"])] += ms
    ops.append((ms, name, info))
  return by_group, sorted(ops, key=lambda x: x[0], reverse=True)


def main(argv):
  del argv
  workload = throughput.workload_from_flags()
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  runner = throughput.BigjaxRunner(
      workload,
      mesh,
      optim.make_optimizer(bigjax_flags.optim_config(), 1000),
      bigjax_flags.SEED.value,
      bigjax_flags.xla_options(),
  )
  hlo_text = runner.compiled_text()
  os.makedirs(PROFILE_DIR.value, exist_ok=True)
  with open(os.path.join(PROFILE_DIR.value, "train_step.hlo.txt"), "w") as f:
    f.write(hlo_text)
  table = hlo_instructions(hlo_text)
  throughput.time_calls(runner.step, max(throughput.BENCH_WARMUP.value, 1))
  steps = throughput.BENCH_STEPS.value
  with jax.profiler.trace(PROFILE_DIR.value, create_perfetto_trace=True):
    step_times = throughput.time_calls(runner.step, steps)
  by_group, ops = attribute(trace_durations(PROFILE_DIR.value), table, steps)
  total = sum(by_group.values())
  print(
      json.dumps(
          {
              "step_s": sum(step_times) / steps,
              "attributed_ms_per_step": total,
              "by_pass": {
                  p: sum(v for (q, _), v in by_group.items() if q == p)
                  for p in sorted({p for p, _ in by_group})
              },
          }
      )
  )
  for (pass_, kind), ms in by_group.most_common():
    print(
        json.dumps(
            {
                "pass": pass_,
                "kind": kind,
                "ms_per_step": round(ms, 2),
                "share": round(ms / total, 3),
            }
        )
    )
  for ms, name, info in ops[: TOP.value]:
    print(json.dumps({"op": name, "ms_per_step": round(ms, 2), **info}))


if __name__ == "__main__":
  bigjax_flags.run(main)
