"""JSON Lines and Parquet corpora (bigjax/data/formats.py): trained on through the CLI, read at
random equal to a plain sequential read, split by CRC32 or by the files' own names, indexes reused
until their file changes, Hugging Face image columns, and bad input as one-line errors."""

import gzip
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from PIL import Image

from bigjax import metrics
from bigjax.data import files
from bigjax.data import formats
from bigjax.data import images
from bigjax.data import lm
from bigjax.data import sources
from bigjax.errors import UserError
from tests.test_cli import REPO
from tests.test_cli import TINY_RUN
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run
from tests.test_cli import _run_experiment
from tests.test_damaged_inputs import _png


def _rows(count: int, start: int = 0) -> list[dict]:
  """Documents of varied length, each a few sentences, with an id and a nested field."""
  return [
      {"id": i, "text": f"Row {i}: " + "the quick brown fox jumps. " * (1 + i % 9), "meta": [i, 2]}
      for i in range(start, start + count)
  ]


def _compress(data: bytes, compression: str | None) -> bytes:
  if compression == "gzip":
    return gzip.compress(data)
  if compression == "zstd":
    # Two frames, as a file appended to or written by a parallel compressor has
    half = data.index(b"\n", len(data) // 2) + 1
    compressor = zstandard.ZstdCompressor()
    return compressor.compress(data[:half]) + compressor.compress(data[half:])
  return data


def _write_jsonl(path, rows: list[dict], compression: str | None = None) -> None:
  """One object per line, with a blank line, a CRLF ending and no newline at the end, which a
  reader must all take."""
  lines = [json.dumps(r).encode() for r in rows]
  data = b"\n".join(lines[:2]) + b"\n\n" + b"\r\n".join(lines[2:4]) + b"\n" + b"\n".join(lines[4:])
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(_compress(data, compression))


def _write_parquet(path, rows: list[dict], row_group_size: int = 16) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def _everything(spec: str, cache_dir=None):
  """The whole source under a spec, in file order (a split's Subset reorders train, validation)."""
  return formats.open_split(spec, "train+validation", cache_dir).source


def _as_read(row: dict) -> dict:
  """A row as the sources give it: strings as UTF-8 bytes."""
  return {k: v.encode() if isinstance(v, str) else v for k, v in row.items()}


def _one_line(excinfo) -> str:
  assert "\n" not in str(excinfo.value)
  return str(excinfo.value)


# ------------------------------------------------------------------------------------------------
# Through the CLI


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_corpus_made_here_trains_a_language_model_through_the_cli(tmp_path, data_dir, kind):
  corpus = tmp_path / "corpus"
  if kind == "jsonl":  # a plain and a zstd file in one pattern
    _write_jsonl(corpus / "a.jsonl", _rows(60))
    _write_jsonl(corpus / "b.jsonl.zst", _rows(60, start=60), "zstd")
    spec, text_key = f"jsonl:{corpus}/*", []
  else:  # the text in a column not named like text
    rows = [{"id": r["id"], "body": r["text"]} for r in _rows(120)]
    _write_parquet(corpus / "part-0.parquet", rows[:70])
    _write_parquet(corpus / "part-1.parquet", rows[70:])
    spec, text_key = f"parquet:{corpus}/*.parquet", ["--text_key=body"]
  result = _run(
      *TINY_RUN,
      *text_key,
      f"--dataset={spec}",
      f"--workdir={tmp_path / 'run'}",
      f"--data_dir={data_dir}",
      "--num_steps=2",
      "--eval_every=2",
      "--log_every=1",
  )
  assert result.returncode == 0, result.stderr
  train, validation = (len(sources.load_source(spec, s, data_dir)) for s in files.SPLITS)
  assert train + validation == 120 and validation > 0
  assert f"{spec}: " in result.stdout and " validation tokens (bytes)" in result.stdout
  rows = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert rows[-1]["step"] == 2 and 0 < rows[-1]["eval_loss"] < 10


def test_a_malformed_json_line_stops_the_cli_in_one_line_naming_file_and_line(tmp_path, data_dir):
  corpus = tmp_path / "corpus"
  _write_jsonl(corpus / "a.jsonl", _rows(30))
  (corpus / "b.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut sho\n')
  result = _run(
      *TINY_RUN,
      f"--dataset=jsonl:{corpus}/*.jsonl",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
  )
  _assert_one_line_error(result, 1, f"{corpus}/b.jsonl line 3 is not valid JSON (")
  assert result.stderr.rstrip().endswith("fix or remove that line")


def _image_rows(count: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [
      {"image": {"bytes": _png(i % 2, rng), "path": f"img{i}.png"}, "label": i % 2}
      for i in range(count)
  ]


def test_an_image_parquet_set_trains_the_cnn_with_its_files_naming_the_splits(tmp_path, data_dir):
  """Hugging Face's layout: data/SPLIT-00000-of-0000N.parquet, images as {bytes, path} structs."""
  root = tmp_path / "data"
  _write_parquet(root / "train-00000-of-00002.parquet", _image_rows(48, 0))
  _write_parquet(root / "train-00001-of-00002.parquet", _image_rows(48, 1))
  _write_parquet(root / "test-00000-of-00001.parquet", _image_rows(24, 2))
  spec = f"parquet:{root}/*.parquet"
  example = sources.load_source(spec, "test", data_dir)[0]
  assert example["image"].shape == (8, 8, 1) and example["image"].dtype == np.uint8
  assert example["label"] == 0 and sources.num_classes(spec, "label") == 2
  result = _run_experiment(
      "experiments.cnn",
      f"--flagfile={REPO}/experiments/configs/cnn_tiny.flags",
      f"--dataset={spec}",
      f"--workdir={tmp_path / 'run'}",
      f"--data_dir={data_dir}",
      "--num_steps=4",
      "--eval_every=4",
      "--log_every=2",
  )
  assert result.returncode == 0, result.stderr
  assert f"{spec}: 96 train / 24 eval images" in result.stdout  # test: there is no validation
  rows = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert rows[-1]["step"] == 4 and 0 <= rows[-1]["eval_accuracy"] <= 1


# ------------------------------------------------------------------------------------------------
# Random access


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_json_rows_read_at_random_are_those_of_a_sequential_read(tmp_path, compression):
  suffix = {None: "", "gzip": ".gz", "zstd": ".zst"}[compression]
  written = [_rows(40), _rows(1), _rows(75, start=41)]
  for i, rows in enumerate(written):
    _write_jsonl(tmp_path / f"{i}.jsonl{suffix}", rows, compression)
  sequential = []
  for i in range(len(written)):
    with open(tmp_path / f"{i}.jsonl{suffix}", "rb") as f:
      data = f.read()
    plain = {"gzip": gzip.decompress, "zstd": _zstd_decompress}.get(compression, bytes)(data)
    sequential += [_as_read(json.loads(line)) for line in plain.splitlines() if line.strip()]
  source = _everything(f"jsonl:{tmp_path}/*.jsonl{suffix}")
  assert len(source) == len(sequential) == 116
  order = np.random.default_rng(0).permutation(len(source))
  assert [source[int(i)] for i in order] == [sequential[i] for i in order]


def _zstd_decompress(data: bytes) -> bytes:
  reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
  return reader.readall()


def test_parquet_rows_read_at_random_are_those_of_a_sequential_read_a_row_group_at_a_time(
    tmp_path, monkeypatch
):
  _write_parquet(tmp_path / "a.parquet", _rows(100), row_group_size=16)  # 7 groups
  _write_parquet(tmp_path / "b.parquet", _rows(30, start=100), row_group_size=8)  # 4 groups
  sequential = [
      _as_read(row)
      for name in "ab"
      for row in pq.read_table(tmp_path / f"{name}.parquet").to_pylist()
  ]
  reads = []
  real_read = formats._read_row_group
  monkeypatch.setattr(
      formats,
      "_read_row_group",
      lambda parquet, path, group: reads.append(group) or real_read(parquet, path, group),
  )
  source = _everything(f"parquet:{tmp_path}/*.parquet")
  order = np.random.default_rng(0).permutation(len(source))
  assert [source[int(i)] for i in order] == [sequential[i] for i in order]
  reads.clear()
  fresh = _everything(f"parquet:{tmp_path}/*.parquet")  # no group cached yet
  assert [fresh[i] for i in range(len(fresh))] == sequential
  assert reads == [*range(7), *range(4)]  # in order, each row group decoded once
  reads.clear()
  assert _everything(f"parquet:{tmp_path}/*.parquet")[57] == sequential[57]
  assert reads == [57 // 16]  # one row: only its own group


# ------------------------------------------------------------------------------------------------
# Splits


def _texts(subset) -> list[bytes]:
  return [subset[i]["text"] for i in range(len(subset))]


def test_the_crc32_split_is_disjoint_stable_and_keeps_repeated_rows_together(tmp_path):
  rows = _rows(300)
  _write_jsonl(tmp_path / "a.jsonl", rows[:200] + rows[:20])  # 20 rows written twice
  spec = f"jsonl:{tmp_path}/*.jsonl"
  train, validation = (formats.open_split(spec, s, None) for s in files.SPLITS)
  assert not set(train.indices) & set(validation.indices)
  assert sorted([*train.indices, *validation.indices]) == list(range(220))
  lines = [json.dumps(r).encode() for r in rows[:200] + rows[:20]]
  assert [lines[i] for i in validation.indices] == [
      line for line in lines if files.is_validation(line)
  ]
  assert 2 <= len(validation) <= 30  # about 5%
  # Another file adds rows but moves none; reopened, the split is the same
  _write_jsonl(tmp_path / "b.jsonl", rows[200:])
  grown = formats.open_split(spec, "validation", None)
  assert set(_texts(validation)) <= set(_texts(grown))
  assert set(_texts(grown)) - set(_texts(validation)) <= {r["text"].encode() for r in rows[200:]}
  # Parquet rows are keyed by file and row number below the pattern's fixed directory
  _write_parquet(tmp_path / "p" / "x.parquet", rows)
  parquet = formats.open_split(f"parquet:{tmp_path}/p/*.parquet", "validation", None)
  assert list(parquet.indices) == [
      i for i in range(300) if files.is_validation(f"x.parquet:{i}".encode())
  ]


def test_files_named_by_split_give_the_splits_as_hugging_face_lays_them_out(tmp_path):
  _write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", _rows(30))
  _write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", _rows(30, start=30))
  _write_parquet(tmp_path / "data" / "validation-00000-of-00001.parquet", _rows(10, start=60))
  _write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", _rows(5, start=70))
  spec = f"parquet:{tmp_path}/data/*.parquet"
  assert sources.split_names(spec) == ["train", "validation", "test"]
  assert sources.default_eval_split(spec) == "validation"
  ids = lambda split: sorted(row["id"] for row in formats.open_split(spec, split, None))
  assert ids("train") == list(range(60)) and ids("validation") == list(range(60, 70))
  assert ids("test") == list(range(70, 75)) and ids("train[:50%]+test") == [
      *range(30),
      *range(70, 75),
  ]
  # Split folders, and names that only contain a split word: the last split word counts
  _write_jsonl(tmp_path / "j" / "en" / "train" / "shard0.jsonl", _rows(20))
  _write_jsonl(tmp_path / "j" / "en" / "dev" / "shard0.jsonl", _rows(4, start=20))
  assert sources.split_names(f"jsonl:{tmp_path}/j/**/*.jsonl") == ["train", "validation"]
  assert formats.split_named_by("c4-validation.00000-of-00008.json.gz") == "validation"
  assert formats.split_named_by("test/train/0000.parquet") == "train"
  assert formats.split_named_by("trainer_logs/interval.jsonl") is None
  # Files of one split alone: the CRC32 rule splits them
  only_train = f"parquet:{tmp_path}/data/train-*.parquet"
  assert sources.split_names(only_train) == ["train", "validation"]
  assert len(formats.open_split(only_train, "train+validation", None)) == 60
  # A file that names no split beside ones that do
  _write_parquet(tmp_path / "data" / "extra.parquet", _rows(3))
  with pytest.raises(UserError) as unnamed:
    sources.split_names(spec)
  assert f"{tmp_path}/data/extra.parquet names no split while other files do" in _one_line(unnamed)


# ------------------------------------------------------------------------------------------------
# The index


def _count_builds(monkeypatch) -> list[str]:
  built = []
  real_build = formats._build_index
  monkeypatch.setattr(
      formats,
      "_build_index",
      lambda path, *args: built.append(os.path.basename(path)) or real_build(path, *args),
  )
  return built


def test_the_index_is_kept_beside_the_data_reused_and_rebuilt_when_its_file_changes(
    tmp_path, monkeypatch
):
  _write_jsonl(tmp_path / "a.jsonl", _rows(50))
  _write_jsonl(tmp_path / "b.jsonl.gz", _rows(50, start=50), "gzip")
  spec = f"jsonl:{tmp_path}/*"
  built = _count_builds(monkeypatch)
  assert len(_everything(spec)) == 100 and sorted(built) == ["a.jsonl", "b.jsonl.gz"]
  assert sorted(os.listdir(tmp_path / formats.INDEX_FOLDER)) == [
      "a.jsonl.index.npz",
      "b.jsonl.gz.index.npz",
      "b.jsonl.gz.plain",  # the decompressed copy that rows are read from
  ]
  built.clear()
  assert len(_everything(spec)) == 100 and built == []  # reused, and never matched by the pattern
  with open(tmp_path / "a.jsonl", "ab") as f:  # appended to: another size
    f.write(b'\n{"text": "one more"}\n')
  source = _everything(spec)
  assert built == ["a.jsonl"] and len(source) == 101 and source[50] == {"text": b"one more"}
  stat = os.stat(tmp_path / "b.jsonl.gz")  # the same size, written again later
  os.utime(tmp_path / "b.jsonl.gz", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
  assert len(_everything(spec)) == 101 and built == ["a.jsonl", "b.jsonl.gz"]
  _write_jsonl(tmp_path / "b.jsonl.gz", _rows(50, start=150), "gzip")  # new rows, read anew
  assert [_everything(spec)[i]["id"] for i in (51, 100)] == [150, 199] and len(built) == 3
  (tmp_path / formats.INDEX_FOLDER / "a.jsonl.index.npz").write_bytes(b"cut")  # damaged: rebuilt
  assert len(_everything(spec)) == 101 and built[-1] == "a.jsonl"


def test_an_index_that_cannot_be_kept_beside_its_file_goes_to_the_cache(tmp_path, monkeypatch):
  data = tmp_path / "read_only"
  _write_jsonl(data / "a.jsonl", _rows(20))
  (data / formats.INDEX_FOLDER).write_bytes(b"")  # a file where the folder would go (works as root)
  spec, cache = f"jsonl:{data}/*.jsonl", str(tmp_path / "cache")
  built = _count_builds(monkeypatch)
  assert len(_everything(spec, cache)) == 20 and len(_everything(spec, cache)) == 20
  assert built == ["a.jsonl"]
  (folder,) = os.listdir(cache)
  assert os.listdir(os.path.join(cache, folder)) == ["a.jsonl.index.npz"]
  with pytest.raises(UserError) as nowhere:
    _everything(f"jsonl:{data}/*.jsonl", cache_dir=None)
  assert f"an index of {data}/a.jsonl can be written neither beside it" in _one_line(nowhere)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_a_missing_key_or_column_lists_the_ones_there_are(tmp_path, data_dir):
  _write_jsonl(tmp_path / "a.jsonl", _rows(30))
  _write_parquet(tmp_path / "a.parquet", _rows(30))
  for spec in (f"jsonl:{tmp_path}/*.jsonl", f"parquet:{tmp_path}/*.parquet"):
    with pytest.raises(UserError) as opened:
      lm.open_windows(spec, "train", 8, data_dir, text_key="body")
    assert "has no feature 'body' (--text_key); its features are ['id', 'meta', 'text']" in (
        _one_line(opened)
    )
    with pytest.raises(UserError) as read:
      _everything(spec)[3]["body"]
    where = (
        f"{tmp_path}/a.jsonl line 5" if spec.startswith("jsonl") else f"{tmp_path}/a.parquet row 3"
    )
    assert _one_line(read).startswith(
        f"{where} has no key 'body'; its keys are ['id', 'meta', 'text']"
    )
    with pytest.raises(UserError, match=r"has no feature\(s\) \['image', 'label'\]; its features"):
      images.open_split(spec, "train", data_dir)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_malformed_or_non_object_json_line_names_its_file_and_line(tmp_path, compression):
  suffix = ".zst" if compression else ""
  good = json.dumps({"text": "fine"})
  content = f'{good}\n\n  \n{good}\n{{"text": "a" "b"}}\n[1, 2]\n{good}'.encode()
  (tmp_path / f"a.jsonl{suffix}").write_bytes(_compress(content, compression))
  source = _everything(f"jsonl:{tmp_path}/*")
  assert len(source) == 5 and source[0] == source[1] == source[4] == {"text": b"fine"}
  with pytest.raises(UserError) as malformed:
    source[2]
  assert _one_line(malformed).startswith(f"{tmp_path}/a.jsonl{suffix} line 5 is not valid JSON (")
  with pytest.raises(UserError) as not_object:
    source[3]
  assert _one_line(not_object).startswith(
      f"{tmp_path}/a.jsonl{suffix} line 6 is a JSON list, not an object"
  )


def test_an_empty_pattern_a_file_that_is_not_parquet_and_damaged_streams_are_one_line(tmp_path):
  with pytest.raises(UserError) as empty:
    formats.open_split(f"jsonl:{tmp_path}/*.jsonl", "train", None)
  assert f"the pattern '{tmp_path}/*.jsonl' matches no files" in _one_line(empty)
  (tmp_path / "notes.parquet").write_text("not columns at all\n")
  with pytest.raises(UserError) as not_parquet:
    sources.load_source(f"parquet:{tmp_path}/*.parquet", "train", str(tmp_path))
  assert _one_line(not_parquet).startswith(f"{tmp_path}/notes.parquet is not a Parquet file (")
  data = json.dumps({"text": "x" * 5000}).encode()
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(data)[:-20])
  (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data)[:-20])
  for name, kind in (("cut.jsonl.gz", "gzip"), ("cut.jsonl.zst", "zstd")):
    with pytest.raises(UserError) as cut:
      formats.open_split(f"jsonl:{tmp_path}/{name}", "train", None)
    assert _one_line(cut).startswith(f"{tmp_path}/{name} is not a readable {kind} file (")
  assert not os.listdir(tmp_path / formats.INDEX_FOLDER)  # nothing half-written left


def test_parquet_images_damaged_of_another_shape_or_not_embedded_are_one_line(tmp_path):
  rows = _image_rows(6, 0)
  rows[2]["image"]["bytes"] = rows[2]["image"]["bytes"][:40]
  rows[3]["image"] = {"bytes": None, "path": "elsewhere.png"}
  wide = io.BytesIO()
  Image.fromarray(np.zeros((8, 9), np.uint8), mode="L").save(wide, format="PNG")
  rows[5]["image"]["bytes"] = wide.getvalue()
  _write_parquet(tmp_path / "a.parquet", rows)
  source = _everything(f"parquet:{tmp_path}/*.parquet")
  assert source[1]["image"].shape == (8, 8, 1) and source[4]["label"] == 0
  path = f"{tmp_path}/a.parquet"
  for row, message in (
      (2, f"{path} row 2 column 'image' is not a readable image ("),
      (3, f"{path} row 3 column 'image' holds no image bytes (only the path 'elsewhere.png')"),
      (5, f"{path} row 5 column 'image' is (8, 9) with 1 channel(s) but {path} row 0 is (8, 8)"),
  ):
    with pytest.raises(UserError) as error:
      source[row]
    assert _one_line(error).startswith(message)


def test_the_memory_benchmark_writes_both_corpora_and_reads_every_row(tmp_path):
  result = _run_experiment(
      "benchmarks.data_memory", "--corpus_gb=0.001", f"--corpus_dir={tmp_path}", "--random_rows=50"
  )
  assert result.returncode == 0, result.stderr
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r["kind"] for r in record["results"]] == ["jsonl", "parquet"]
  for r in record["results"]:
    # Whole blocks of 10,000 rows: one here
    assert r["rows"] == 10_000 and r["text_bytes"] == r["rows"] * 1000
    assert r["rss_peak_mb"] >= r["rss_open_mb"] > 0
