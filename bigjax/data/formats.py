"""JSON Lines and Parquet files as random-access sources (len, getitem -> dict), never read whole:

  jsonl:GLOB    one row per non-blank line, each a JSON object; gzip and zstd files too
                (`.jsonl.gz`, `.jsonl.zst`: told apart by their first bytes, not their names)
  parquet:GLOB  one row per Parquet row; a column of Hugging Face's image type (a struct of
                `bytes` and `path`) reads as a decoded [H, W, C] uint8 image, as imagefolder's do

A row is a dict of its keys (columns), strings as UTF-8 bytes like TFDS's Text features; a key it
lacks is a one-line error naming its file, its line (JSON, counted from 1) or row (Parquet, from 0)
and the keys it has.

Random access. A JSON Lines file is read at row byte offsets found by one pass and kept in an index
(`NAME.index.npz`: 12 bytes a row, the offsets and each row's CRC32) in a `.bigjax_index` folder
beside the file where that can be written, else in `cache_dir/HASH/` (HASH: of the file's real
path). Hidden, the folder never matches the user's own patterns. An index is used while the file's
size and modification time (in nanoseconds) are the ones it records, and built again when either
differs. A compressed stream cannot be read at an offset, so the same pass also writes a
decompressed copy (`NAME.plain`) into the index folder, which rows are read from: the disk space of
the uncompressed file, once. A Parquet file is read by row group, its footer giving the groups' row
counts (nothing to build): a row costs decoding its row group, and the last CACHED_ROW_GROUPS of
them are kept (and the last OPEN_FILES files open), so a sequential read decodes each group once;
a shuffled read decodes about one group per row, so image sets read at random want small groups.

Splits. Where the files' paths below the pattern's fixed directory name two or more splits, as
Hugging Face hub data sets do (`train-00000-of-00004.parquet`, `data/validation.jsonl`,
`en/test/0.parquet`), each file's rows are the split it names: the last split word in its path
(split into words at every character that is not a letter; see SPLIT_WORDS), and a file that names
none is an error. Otherwise `validation` holds the ~5% of rows whose key has CRC32 = 0 mod 20 and
`train` the rest, as for the other own files: a JSON row's key is its line (whitespace around it
stripped), so a row written twice never sits on both sides; a Parquet row, which has no text of its
own, is keyed by its file's path below the fixed directory and its row number (`a/b.parquet:17`),
so a file keeps its rows' splits as others come and go. TFDS's split syntax works on top.
"""

import collections
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import zipfile
import zlib

import numpy as np

from bigjax.data import files
from bigjax.errors import UserError

KINDS = ("jsonl", "parquet")
INDEX_FOLDER = ".bigjax_index"
INDEX_VERSION = 1
CACHED_ROW_GROUPS = 2  # two, for reader threads that read across a group's end
OPEN_FILES = 8
# Words in a file's path that name its split (Hugging Face's names for them, less eval/evaluation,
# which mean validation in some sets and test in others).
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
_SPLIT_ORDER = ("train", "validation", "test")
_CHUNK_BYTES = 1 << 24
_NEWLINE = ord("\n")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # neither can start a JSON text


def is_format_spec(name: str) -> bool:
  return name.partition(":")[0] in KINDS


def open_split(spec: str, split: str, cache_dir: str | None) -> files.Subset:
  """`split` (TFDS syntax) of `jsonl:GLOB` or `parquet:GLOB`; `cache_dir` keeps the JSON Lines
  indexes that cannot be written beside their files."""
  kind, paths, root = _match(spec)
  if kind == "jsonl":
    indexed = [index_rows(path, cache_dir) for path in paths]
    source = JsonLines(tuple(f for f, _ in indexed))
    crc32s = lambda: np.concatenate([crcs for _, crcs in indexed])
  else:
    source = ParquetRows(tuple(parquet_part(path) for path in paths))
    crc32s = lambda: _position_crc32s(source.parts, root)
  named = named_splits(spec, paths, root)
  if named is None:
    return files.select_split(spec, source, files.hash_splits(crc32s()), split)
  rows = _rows_by_split(named, source.file_starts)
  return files.select_split(spec, source, rows, split, rule="the files' names give the splits")


def split_names(spec: str) -> list[str]:
  _, paths, root = _match(spec)
  named = named_splits(spec, paths, root)
  return list(files.SPLITS) if named is None else [s for s in _SPLIT_ORDER if s in named.values()]


def feature_names(spec: str, cache_dir: str | None) -> set[str]:
  """The keys of the first JSON row, or the first Parquet file's columns."""
  kind, paths, _ = _match(spec)
  if kind == "parquet":
    return set(parquet_part(paths[0]).columns)
  for path in paths:
    indexed, _ = index_rows(path, cache_dir)
    if len(indexed):
      return set(indexed.row(0))
  raise UserError(f"--dataset={spec}: the {len(paths)} file(s) it matches hold no JSON line")


def num_classes(spec: str, label_key: str) -> int | None:
  """One more than the largest label of a Parquet set's integer `label_key` column (read alone);
  None for JSON Lines, whose labels cannot be known without parsing every row."""
  kind, paths, _ = _match(spec)
  if kind != "parquet":
    return None
  import pyarrow as pa  # only Parquet sets need pyarrow
  import pyarrow.compute as pc
  import pyarrow.parquet as pq

  largest = -1
  for path in paths:
    if label_key not in parquet_part(path).columns:
      return None
    column = pq.read_table(path, columns=[label_key]).column(label_key)
    if not pa.types.is_integer(column.type):
      return None
    top = pc.max(column).as_py()  # None: no rows, or only nulls
    largest = max(largest, -1 if top is None else top)
  return largest + 1 if largest >= 0 else None


def _match(spec: str) -> tuple[str, list[str], str]:
  kind, _, pattern = spec.partition(":")
  paths, root = files.glob_files(spec, os.path.expanduser(pattern))
  return kind, paths, root


# ------------------------------------------------------------------------------------------------
# Rows


class Row(dict):
  """One row's values; a key it lacks is a one-line error naming the row and the keys it has."""

  __slots__ = ("where",)

  def __init__(self, values: dict, where):
    super().__init__((k, v.encode("utf-8") if isinstance(v, str) else v) for k, v in values.items())
    self.where = where  # a string, or a callable for JSON lines (their line number takes a count)

  def __missing__(self, key):
    where = self.where() if callable(self.where) else self.where
    raise UserError(
        f"{where} has no key {key!r}; its keys are {sorted(self)}: name the one to read with "
        "--text_key, --image_key or --label_key"
    )


def _locate(starts: np.ndarray, index: int) -> tuple[int, int]:
  """(part, position in it) of `index` over parts that begin at `starts` (ascending, then total)."""
  if not 0 <= index < starts[-1]:
    raise IndexError(f"row {index} of {starts[-1]}")
  part = int(np.searchsorted(starts, index, side="right")) - 1
  return part, index - int(starts[part])


# ------------------------------------------------------------------------------------------------
# JSON Lines


@dataclasses.dataclass(frozen=True)
class IndexedFile:
  """One JSON Lines file's rows: row i is `plain[starts[i] : starts[i + 1]]`, whitespace around it
  (its line end, blank lines after it) stripped."""

  path: str  # the file matched
  plain: str  # the file read: `path`, or its decompressed copy
  starts: np.ndarray  # int64 [rows + 1], the last one the end of the plain file

  def __len__(self) -> int:
    return len(self.starts) - 1

  def row(self, row: int) -> Row:
    start, stop = int(self.starts[row]), int(self.starts[row + 1])
    fd = os.open(self.plain, os.O_RDONLY)
    try:
      line = os.pread(fd, stop - start, start)  # no shared file position: reader threads are safe
    finally:
      os.close(fd)
    where = functools.partial(_line_of, self.path, self.plain, start)
    try:
      value = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
      reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
      raise UserError(f"{where()} is not valid JSON ({reason}); fix or remove that line") from None
    if not isinstance(value, dict):
      raise UserError(
          f"{where()} is a JSON {type(value).__name__}, not an object; each line must be one "
          'object such as {"text": "..."}'
      )
    return Row(value, where)


def _line_of(path: str, plain: str, offset: int) -> str:
  """'PATH line N' for the line at byte `offset` of `plain` (counted on demand: errors only)."""
  newlines, done = 0, 0
  with open(plain, "rb") as f:
    while done < offset:
      chunk = f.read(min(_CHUNK_BYTES, offset - done))
      if not chunk:
        break
      newlines, done = newlines + chunk.count(b"\n"), done + len(chunk)
  return f"{path} line {newlines + 1}"


@dataclasses.dataclass(frozen=True)
class JsonLines:
  """The rows of several JSON Lines files, in order."""

  files: tuple[IndexedFile, ...]

  @functools.cached_property
  def file_starts(self) -> np.ndarray:
    return np.cumsum([0, *(len(f) for f in self.files)])

  def __len__(self) -> int:
    return int(self.file_starts[-1])

  def __getitem__(self, index: int) -> Row:
    part, row = _locate(self.file_starts, int(index))
    return self.files[part].row(row)


def index_rows(path: str, cache_dir: str | None) -> tuple[IndexedFile, np.ndarray]:
  """The file's rows and the CRC32 of each row's line: from its index, or indexed now."""
  stat = os.stat(path)
  stamp = (stat.st_size, stat.st_mtime_ns)  # taken first: a file changed while indexed is redone
  folders = _index_folders(path, cache_dir)
  for folder in folders:
    found = _load_index(path, folder, stamp)
    if found is not None:
      return found
  for folder in folders:
    if _can_write(folder):
      return _build_index(path, folder, stamp)
  raise UserError(
      f"an index of {path} can be written neither beside it ({folders[0]}) nor in "
      f"{' or '.join(folders[1:]) or 'a cache folder'}; make one of them writable (--data_dir "
      "chooses the second)"
  )


def _index_folders(path: str, cache_dir: str | None) -> list[str]:
  beside = os.path.join(os.path.dirname(path) or os.curdir, INDEX_FOLDER)
  if cache_dir is None:
    return [beside]
  real = os.path.realpath(path).encode()
  return [beside, os.path.join(cache_dir, hashlib.sha256(real).hexdigest()[:16])]


def _index_path(folder: str, path: str) -> str:
  return os.path.join(folder, os.path.basename(path) + ".index.npz")


def _plain_copy(folder: str, path: str) -> str:
  return os.path.join(folder, os.path.basename(path) + ".plain")


def _load_index(path: str, folder: str, stamp: tuple[int, int]):
  try:
    with np.load(_index_path(folder, path)) as saved:
      header, starts, crc32s = saved["header"], saved["starts"], saved["crc32"]
    version, size, mtime_ns, plain_size, compressed = header.tolist()
    plain = _plain_copy(folder, path) if compressed else path
    if (version, size, mtime_ns) != (INDEX_VERSION, *stamp) or os.path.getsize(plain) != plain_size:
      return None
  # Not there, cut short or of an older format: built again, which replaces it whole.
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  return IndexedFile(path, plain, starts), crc32s


def _can_write(folder: str) -> bool:
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      return True
  except OSError:  # read-only, no permission, or its name taken by a file
    return False


def _build_index(path: str, folder: str, stamp: tuple[int, int]):
  compression = _compression(path)
  plain = path if compression is None else _plain_copy(folder, path)
  try:
    with contextlib.ExitStack() as stack:
      copy = None if compression is None else stack.enter_context(_replaced_whole(plain)).write
      starts, crc32s = _scan_rows(_chunks(path, compression), copy)
    header = np.array([INDEX_VERSION, *stamp, int(starts[-1]), compression is not None], np.int64)
    with _replaced_whole(_index_path(folder, path)) as f:
      np.savez(f, header=header, starts=starts, crc32=crc32s)
  except OSError as e:
    raise UserError(
        f"indexing {path} into {folder} failed ({e.strerror or e}); free space there or make the "
        "file readable"
    ) from None
  return IndexedFile(path, plain, starts), crc32s


@contextlib.contextmanager
def _replaced_whole(target: str):
  """A binary file that becomes `target` only once written: an index or copy cut short by a kill
  (or written by two processes at once) never stands as `target`."""
  tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}"
  try:
    with open(tmp, "wb") as f:
      yield f
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _compression(path: str) -> str | None:
  with open(path, "rb") as f:
    head = f.read(4)
  return "gzip" if head[:2] == _GZIP_MAGIC else "zstd" if head == _ZSTD_MAGIC else None


def _chunks(path: str, compression: str | None):
  """The file's (decompressed) bytes in chunks; a damaged stream is a one-line error."""
  readers = {None: _plain_chunks, "gzip": _gzip_chunks, "zstd": _zstd_chunks}
  try:
    yield from readers[compression](path)
  except (EOFError, zlib.error, gzip.BadGzipFile, _ZstdError) as e:
    raise UserError(
        f"{path} is not a readable {compression} file ({' '.join(str(e).split()) or 'cut short'}); "
        "replace it"
    ) from None


def _plain_chunks(path: str):
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      yield chunk


def _gzip_chunks(path: str):
  with gzip.open(path, "rb") as f:
    while chunk := f.read(_CHUNK_BYTES):
      yield chunk


class _ZstdError(Exception):
  """zstandard's errors, or a file that ends inside a frame."""


def _zstd_chunks(path: str):
  """Every frame in turn (zstd's streaming reader would take a file cut inside a frame as whole)."""
  import zstandard  # only zstd files need it

  frame, started = zstandard.ZstdDecompressor().decompressobj(), False
  with open(path, "rb") as f:
    while data := f.read(_CHUNK_BYTES // 4):  # text compresses ~4x: outputs about a chunk
      while data:
        try:
          out = frame.decompress(data)
        except zstandard.ZstdError as e:
          raise _ZstdError(str(e)) from None
        started = True
        if out:
          yield out
        data = b""
        if frame.eof:  # the rest of this read belongs to the next frame
          data, frame, started = (
              frame.unused_data,
              zstandard.ZstdDecompressor().decompressobj(),
              False,
          )
  if started:
    raise _ZstdError("the file ends inside a frame")


def _scan_rows(chunks, copy=None) -> tuple[np.ndarray, np.ndarray]:
  """Where each non-blank line starts (and, last, where the stream ends) and the CRC32 of each;
  `copy` is given every chunk."""
  starts, crc32s, rest, offset = [], [], b"", 0  # offset: where `rest` starts in the stream
  for chunk in chunks:
    if copy is not None:
      copy(chunk)
    data = rest + chunk
    lines = [0, *(np.flatnonzero(np.frombuffer(data, np.uint8) == _NEWLINE) + 1).tolist()]
    _rows_between(data, lines, offset, starts, crc32s)
    rest, offset = data[lines[-1] :], offset + lines[-1]
  _rows_between(rest, [0, len(rest)], offset, starts, crc32s)
  starts.append(offset + len(rest))
  return np.array(starts, np.int64), np.array(crc32s, np.uint32)


def _rows_between(data: bytes, bounds: list[int], offset: int, starts: list, crc32s: list) -> None:
  """Appends the non-blank lines among data[bounds[i] : bounds[i + 1]]."""
  for start, stop in zip(bounds, bounds[1:]):
    line = data[start:stop].strip()
    if line:
      starts.append(offset + start)
      crc32s.append(zlib.crc32(line))


# ------------------------------------------------------------------------------------------------
# Parquet


@dataclasses.dataclass(frozen=True)
class ParquetPart:
  """One Parquet file, from its footer."""

  path: str
  group_starts: np.ndarray  # int64 [row groups + 1]: the first row of each, then the row count
  columns: tuple[str, ...]
  image_columns: tuple[str, ...]  # Hugging Face's Image type: struct<bytes: binary, path: string>

  @property
  def num_rows(self) -> int:
    return int(self.group_starts[-1])


def parquet_part(path: str) -> ParquetPart:
  with contextlib.closing(_open_parquet(path)) as parquet:
    metadata, schema = parquet.metadata, parquet.schema_arrow
  counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
  images = tuple(field.name for field in schema if _is_hf_image(field.type))
  return ParquetPart(path, np.cumsum([0, *counts]), tuple(schema.names), images)


def _is_hf_image(arrow_type) -> bool:
  import pyarrow as pa

  return pa.types.is_struct(arrow_type) and {f.name for f in arrow_type} == {"bytes", "path"}


class ParquetRows:
  """The rows of several Parquet files, in order, read a row group at a time. Every image of a
  column must have the shape of that column's first image."""

  def __init__(self, parts: tuple[ParquetPart, ...]):
    self.parts = parts
    self.file_starts = np.cumsum([0, *(p.num_rows for p in parts)])
    self.shapes = {}  # image column -> (shape, the image that has it)
    self._start_reading()
    first_part = next((p for p in parts if p.num_rows), None)
    if first_part is not None and first_part.image_columns:  # its first images set the shapes
      first, where = self[0], f"{first_part.path} row 0"
      self.shapes = {c: (first[c].shape, where) for c in first_part.image_columns}

  def _start_reading(self) -> None:
    self._lock = threading.Lock()  # grain's reader threads share the cache
    self._groups = collections.OrderedDict()  # (part, group) -> pyarrow Table, newest last
    # Opened once: a ParquetFile parses the whole footer, which names every row group (milliseconds
    # for a file of thousands of groups, more than decoding a small group).
    self._files = collections.OrderedDict()  # part -> pyarrow ParquetFile

  def __getstate__(self) -> dict:  # for grain's worker processes: no lock, no cached groups
    return {"parts": self.parts, "file_starts": self.file_starts, "shapes": self.shapes}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._start_reading()

  def __len__(self) -> int:
    return int(self.file_starts[-1])

  def __getitem__(self, index: int) -> Row:
    part_index, row = _locate(self.file_starts, int(index))
    part = self.parts[part_index]
    group, position = _locate(part.group_starts, row)
    table = self._row_group(part_index, group)
    values = {
        name: column[position].as_py() for name, column in zip(table.column_names, table.columns)
    }
    where = f"{part.path} row {row}"
    for column in part.image_columns:
      values[column] = self._image(values[column], f"{where} column {column!r}", column)
    return Row(values, where)

  def _row_group(self, part_index: int, group: int):
    path = self.parts[part_index].path
    with self._lock:
      return _kept(
          self._groups,
          (part_index, group),
          CACHED_ROW_GROUPS,
          lambda: _read_row_group(
              _kept(self._files, part_index, OPEN_FILES, lambda: _open_parquet(path)), path, group
          ),
      )

  def _image(self, value: dict | None, where: str, column: str) -> np.ndarray:
    if not value or value.get("bytes") is None:
      path = (value or {}).get("path")
      raise UserError(
          f"{where} holds no image bytes{f' (only the path {path!r})' if path else ''}; "
          "write the images into the file (Hugging Face's datasets does with embed_external_files)"
      )
    image = files.decode_image(io.BytesIO(value["bytes"]), where)
    if column in self.shapes:
      shape, first = self.shapes[column]
      files.check_image_shape(image, shape, where, first)
    return image


def _kept(cache: collections.OrderedDict, key, size: int, make):
  """cache[key], made if missing; the least recently used go once there are more than `size`."""
  if key in cache:
    cache.move_to_end(key)
    return cache[key]
  cache[key] = value = make()
  if len(cache) > size:
    cache.popitem(last=False)
  return value


def _open_parquet(path: str):
  import pyarrow as pa  # only Parquet sets need pyarrow
  import pyarrow.parquet as pq

  try:
    return pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    raise UserError(
        f"{path} is not a Parquet file ({' '.join(str(e).split())}); remove it or narrow the "
        "pattern"
    ) from None


def _read_row_group(parquet, path: str, group: int):
  import pyarrow as pa

  try:
    return parquet.read_row_group(group)
  except (pa.ArrowException, OSError) as e:
    raise UserError(
        f"{path} row group {group} cannot be read ({' '.join(str(e).split())}); replace the file"
    ) from None


def _position_crc32s(parts: tuple[ParquetPart, ...], root: str) -> np.ndarray:
  """The CRC32 of each row's key, `PATH:ROW` (PATH below the pattern's fixed directory)."""
  crc32s = []
  for part in parts:
    prefix = zlib.crc32(f"{os.path.relpath(part.path, root or os.curdir)}:".encode())
    crc32s += [zlib.crc32(b"%d" % row, prefix) for row in range(part.num_rows)]
  return np.array(crc32s, np.uint32)


# ------------------------------------------------------------------------------------------------
# Splits named by the files


def split_named_by(relative_path: str) -> str | None:
  """The split a path names: its last word in SPLIT_WORDS, words being runs of letters."""
  named = [SPLIT_WORDS[w] for w in re.split(r"[^a-z]+", relative_path.lower()) if w in SPLIT_WORDS]
  return named[-1] if named else None


def named_splits(spec: str, paths: list[str], root: str) -> dict[str, str] | None:
  """Each file's split where the files name two or more (None: the CRC32 rule applies)."""
  named = {p: split_named_by(os.path.relpath(p, root or os.curdir)) for p in paths}
  if len(set(named.values()) - {None}) < 2:
    return None
  unnamed = [p for p, split in named.items() if split is None]
  if unnamed:
    example = next(p for p, split in named.items() if split is not None)
    raise UserError(
        f"--dataset={spec}: {unnamed[0]} names no split while other files do ({example} is "
        f"{named[example]}); narrow the pattern to the split files, or put train, validation or "
        "test in each file's name"
    )
  return named


def _rows_by_split(named: dict[str, str], file_starts: np.ndarray) -> dict[str, np.ndarray]:
  rows = {split: [] for split in _SPLIT_ORDER if split in named.values()}
  for i, split in enumerate(named.values()):
    rows[split].append(np.arange(file_starts[i], file_starts[i + 1]))
  return {split: np.concatenate(parts) for split, parts in rows.items()}
