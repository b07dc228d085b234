"""Whether bigjax's glibc settings (bigjax/host_memory.py) pay on this machine: the same train step
timed in fresh processes with and without them, in alternating rounds, with the page faults each
step takes. Prints one JSON line per process and a summary line.

  python -m benchmarks.host_memory --rounds=3 -- --model=transformer-tiny \
      --model_override=num_layers=4 --batch_size=16 --seq_len=256 \
      --xla_option=xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE

Everything after `--` goes to `benchmarks.throughput`. The settings are process-wide and only
reach XLA's threads before its backend starts, so each variant is its own process
(BIGJAX_KEEP_HOST_MEMORY=1 or 0); the order turns around every round (ABBA) so that the machine's
drift falls on both. Whether glibc's defaults fault in XLA's buffer afresh each step is a property
of the machine (its glibc, its kernel's transparent huge pages), which is why this is a benchmark
and not a test.
"""

import json
import os
import statistics
import subprocess
import sys

VARIANTS = {"default glibc": "0", "one arena, no mmap, no trim": "1"}


def transparent_huge_pages() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return next(word.strip("[]") for word in f.read().split() if word.startswith("["))
  except (OSError, StopIteration):
    return "unknown"


def run_throughput(keep_host_memory: str, throughput_args: list[str]) -> dict:
  """One benchmarks.throughput process under the given BIGJAX_KEEP_HOST_MEMORY; its JSON record."""
  env = dict(os.environ, BIGJAX_KEEP_HOST_MEMORY=keep_host_memory, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one default device, as every benchmark here
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.throughput", *throughput_args],
      env=env,
      capture_output=True,
      text=True,
      check=False,
  )
  if result.returncode != 0:
    sys.exit(f"benchmarks.throughput failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
  args, _, throughput_args = " ".join(argv).partition(" -- ")
  rounds = int(next((a.split("=", 1)[1] for a in args.split() if a.startswith("--rounds=")), "3"))
  throughput_args = throughput_args.split() or [
      "--model=transformer-tiny",
      "--model_override=num_layers=4",
      "--batch_size=16",
      "--seq_len=256",
  ]
  records = {name: [] for name in VARIANTS}
  names = list(VARIANTS)
  for r in range(rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      record = run_throughput(VARIANTS[name], throughput_args)
      records[name].append(record)
      print(
          json.dumps(
              {
                  "variant": name,
                  "round": r,
                  "step_s": record["step_s"],
                  "minor_faults_per_step": record["minor_faults_per_step"],
              }
          ),
          flush=True,
      )
  medians = {name: statistics.median(r["step_s"] for r in rs) for name, rs in records.items()}
  default, kept = names
  print(
      json.dumps(
          {
              "transparent_huge_pages": transparent_huge_pages(),
              "step_s": {name: [round(r["step_s"], 4) for r in rs] for name, rs in records.items()},
              "faults_per_step": {
                  name: [round(r["minor_faults_per_step"]) for r in rs]
                  for name, rs in records.items()
              },
              "speed_up": medians[default] / medians[kept],
              "round_speed_ups": [
                  round(a["step_s"] / b["step_s"], 3)
                  for a, b in zip(records[default], records[kept])
              ],
              "throughput_args": throughput_args,
          }
      ),
      flush=True,
  )


if __name__ == "__main__":
  main(sys.argv[1:])
