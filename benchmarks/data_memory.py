"""Resident memory while every row of a JSON Lines and a Parquet corpus is read through bigjax's
sources (bigjax/data/formats.py): it stays flat, whatever the corpus's size.

  python -m benchmarks.data_memory                          # 2 GB of each in /tmp/bigjax_data_memory
  python -m benchmarks.data_memory --corpus_gb=0.05 --kinds=jsonl
  python -m benchmarks.data_memory --kinds=jsonl.zst    # the JSON Lines compressed with zstd

The first run writes the corpus (kept for later runs; another --corpus_gb writes it anew): rows
{"id": N, "text": ~1 KB of random lowercase words}, as `corpus.jsonl` and as `corpus.parquet` in
row groups of --row_group_rows (and, for --kinds=jsonl.zst, `corpus.jsonl.zst` compressed from the
first, whose first open writes the decompressed copy its rows are read from). For each kind it
then opens `train+validation` with bigjax.data.sources.load_source twice (the first open of a JSON
Lines file builds its index; the second reuses it), reads every row in that order, and reads
--random_rows rows at random. The process's resident memory (VmRSS, /proc/self/status) is sampled
every 1,000 rows and printed every --report_seconds. One JSON line at the end holds every figure.
"""

import json
import os
import time

import numpy as np
from absl import app
from absl import flags

CORPUS_GB = flags.DEFINE_float("corpus_gb", 2.0, "Size of each corpus, in GB (1e9 bytes).")
CORPUS_DIR = flags.DEFINE_string(
    "corpus_dir", "/tmp/bigjax_data_memory", "Where the corpora (and their indexes) are kept."
)
KINDS = flags.DEFINE_list(
    "kinds", ["jsonl", "parquet"], "The files to read: jsonl, parquet, jsonl.zst."
)
ROW_GROUP_ROWS = flags.DEFINE_integer(
    "row_group_rows", 1000, "Rows per Parquet row group (about 1 MB).", lower_bound=1
)
RANDOM_ROWS = flags.DEFINE_integer("random_rows", 2000, "Rows read at random after the pass.")
REPORT_SECONDS = flags.DEFINE_float("report_seconds", 10.0, "Seconds between progress lines.")

ROW_CHARS = 1000
BLOCK_ROWS = 10_000
_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)  # words of ~5 letters


def _rss_mb() -> float:
  """This process's resident memory (Linux): pages of files read with pread are not in it."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 / 1e6 for line in f if line.startswith("VmRSS:"))


def _row_blocks(total_bytes: int):
  """Blocks of rows {"id", "text"} that together make about `total_bytes` of JSON Lines."""
  rng, row_id, written = np.random.default_rng(0), 0, 0
  while written < total_bytes:
    text = _LETTERS[rng.integers(0, len(_LETTERS), BLOCK_ROWS * ROW_CHARS)].tobytes().decode()
    rows = [
        {"id": row_id + i, "text": text[i * ROW_CHARS : (i + 1) * ROW_CHARS]}
        for i in range(BLOCK_ROWS)
    ]
    row_id, written = row_id + BLOCK_ROWS, written + BLOCK_ROWS * (ROW_CHARS + 25)
    yield rows


def write_corpora(directory: str, total_bytes: int, row_group_rows: int) -> dict[str, str]:
  """corpus.jsonl and corpus.parquet of the same rows, unless a finished pair of this size is
  there (`corpus.json` records what was written)."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  paths = {k: os.path.join(directory, f"corpus.{k}") for k in ("jsonl", "parquet")}
  record = os.path.join(directory, "corpus.json")
  wanted = {"bytes": total_bytes, "row_group_rows": row_group_rows}
  if os.path.exists(record) and json.load(open(record)) == wanted:
    print(f"reusing the corpora in {directory}", flush=True)
    return paths
  os.makedirs(directory, exist_ok=True)
  start = time.perf_counter()
  schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
  with (
      open(paths["jsonl"], "w") as jsonl,
      pq.ParquetWriter(paths["parquet"], schema) as parquet,
  ):
    for rows in _row_blocks(total_bytes):
      jsonl.write("".join(json.dumps(row) + "\n" for row in rows))
      parquet.write_table(pa.Table.from_pylist(rows, schema), row_group_size=row_group_rows)
  with open(record, "w") as f:
    json.dump(wanted, f)
  sizes = ", ".join(f"{os.path.getsize(p) / 1e9:.2f} GB {k}" for k, p in paths.items())
  print(f"wrote {sizes} in {time.perf_counter() - start:.0f} s", flush=True)
  return paths


def compressed_copy(path: str) -> str:
  """PATH.zst (zstd level 3), written once."""
  import zstandard

  target = f"{path}.zst"
  if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(path):
    start = time.perf_counter()
    with open(path, "rb") as source, open(f"{target}.partial", "wb") as out:
      zstandard.ZstdCompressor(level=3).copy_stream(source, out)
    os.replace(f"{target}.partial", target)
    print(
        f"compressed to {os.path.getsize(target) / 1e9:.2f} GB in "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )
  return target


def read_every_row(kind: str, path: str, data_dir: str) -> dict:
  """Opens the corpus twice, reads every row and then random ones; times and memory."""
  from bigjax.data import sources

  spec = f"{kind.partition('.')[0]}:{path}"
  before = _rss_mb()
  start = time.perf_counter()
  sources.load_source(spec, "train+validation", data_dir)
  first_open = time.perf_counter() - start
  start = time.perf_counter()
  rows = sources.load_source(spec, "train+validation", data_dir)
  reopen = time.perf_counter() - start
  opened = peak = _rss_mb()
  print(
      f"{kind}: {len(rows):,} rows; opened in {first_open:.1f} s, again in {reopen:.2f} s; "
      f"{before:,.0f} MB resident before, {opened:,.0f} MB once open",
      flush=True,
  )
  text_bytes, start = 0, time.perf_counter()
  last_report = start
  for i in range(len(rows)):
    text_bytes += len(rows[i]["text"])
    if i % 1000 == 0:
      peak = max(peak, _rss_mb())
      if time.perf_counter() - last_report > REPORT_SECONDS.value:
        last_report = time.perf_counter()
        print(
            f"{kind}: {i:,} rows, {_rss_mb():,.0f} MB resident, "
            f"{i / (last_report - start):,.0f} rows/s",
            flush=True,
        )
  sequential = time.perf_counter() - start
  end = _rss_mb()
  order = np.random.default_rng(0).integers(0, len(rows), RANDOM_ROWS.value)
  start = time.perf_counter()
  for i in order:
    rows[int(i)]
  random = time.perf_counter() - start
  result = {
      "kind": kind,
      "file_bytes": os.path.getsize(path),
      "rows": len(rows),
      "text_bytes": text_bytes,
      "first_open_s": first_open,
      "reopen_s": reopen,
      "rss_before_open_mb": before,
      "rss_open_mb": opened,
      "rss_peak_mb": max(peak, end),
      "rss_end_mb": end,
      "sequential_rows_per_s": len(rows) / sequential,
      "sequential_mb_per_s": text_bytes / sequential / 1e6,
      "random_rows_per_s": len(order) / random if len(order) else None,
  }
  print(
      f"{kind}: read in {sequential:.0f} s ({result['sequential_rows_per_s']:,.0f} rows/s); "
      f"resident {opened:,.0f} MB open, {result['rss_peak_mb']:,.0f} peak, {end:,.0f} end; "
      f"{result['random_rows_per_s'] or 0:,.0f} rows/s at random",
      flush=True,
  )
  return result


def main(argv):
  del argv
  paths = write_corpora(CORPUS_DIR.value, int(CORPUS_GB.value * 1e9), ROW_GROUP_ROWS.value)
  data_dir = os.path.join(CORPUS_DIR.value, "tensorflow_datasets")
  if "jsonl.zst" in KINDS.value:
    paths["jsonl.zst"] = compressed_copy(paths["jsonl"])
  results = [read_every_row(kind, paths[kind], data_dir) for kind in KINDS.value]
  print(json.dumps({"corpus_gb": CORPUS_GB.value, "cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
  app.run(main)
