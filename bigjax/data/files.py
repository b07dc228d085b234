"""The user's own files as TFDS-style random-access sources (len, getitem -> dict of numpy), with no
builder to write and nothing to prepare:

  textfiles:GLOB    one document per file:           {"text": bytes, "name": bytes}
  textlines:GLOB    one document per non-empty line: {"text": bytes (no newline), "name": bytes}
  textpairs:GLOB    one (source, target) pair per non-empty line, split at its first tab:
                    {"inputs": bytes, "targets": bytes, "name": bytes}
  imagefolder:DIR   DIR/CLASS/IMAGE, one sub-folder per class (sorted names are labels 0, 1, ...):
                    {"image": uint8 [H, W, C], "label": int64, "name": bytes}

GLOB is a shell pattern (`**` recurses; quote it). Splits are `train` and `validation`: a document
goes to validation when the CRC32 of its key is 0 mod 20 (about 5%). The key of a file is its path
below the pattern's fixed directory, so a file keeps its split as others come and go; the key of a
line (or pair) is the line itself, so a repeated line never sits on both sides. TFDS's split syntax works on
top (`train[:50%]`, `train+validation`).

Links are followed, but never into a folder that holds them (a link loop adds nothing), and each
real file counts once, under the first of its paths in sorted order (its key), so no file weighs
double or sits in both splits. A file that two class folders reach (a link from one into another,
or a hard link) has no one label: that is an error naming both paths. A damaged image is an error
naming it when it is read; headers are not checked when the folder is opened, since that costs a
file open per image (minutes for a large folder on network storage) and finds only some damage.
"""

import dataclasses
import fnmatch
import os
import re
import types
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from bigjax.errors import UserError

SPLITS = ("train", "validation")
VALIDATION_BUCKETS = 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GLOB_CHARS = "*?["


def is_files_spec(name: str) -> bool:
  return name.partition(":")[0] in _OPENERS


def feature_names(spec: str) -> set[str]:
  if spec.startswith("imagefolder:"):
    return {"image", "label", "name"}
  return {"inputs", "targets", "name"} if spec.startswith("textpairs:") else {"text", "name"}


def num_classes(spec: str) -> int | None:
  kind, _, directory = spec.partition(":")
  if kind != "imagefolder":
    return None
  return len(_OPENERS[kind](spec, os.path.expanduser(directory))[0].classes)


def is_validation(key: bytes) -> bool:
  return zlib.crc32(key) % VALIDATION_BUCKETS == 0


@dataclasses.dataclass(frozen=True)
class TextFiles:
  """One document per file, read when asked for."""

  paths: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    with open(self.paths[index], "rb") as f:
      return {"text": f.read(), "name": self.paths[index].encode()}


@dataclasses.dataclass(frozen=True)
class TextLines:
  """One document per line, held as one buffer and [start, stop) offsets into it."""

  buffer: bytes
  starts: np.ndarray
  stops: np.ndarray
  names: tuple[bytes, ...]  # the file of each line
  line_numbers: np.ndarray  # each line's number in its file, from 1

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> dict:
    return {"text": self.buffer[self.starts[index] : self.stops[index]], "name": self.names[index]}


@dataclasses.dataclass(frozen=True)
class TextPairs:
  """One (source, target) pair per line of `lines`, split at the line's first tab."""

  lines: TextLines

  def __len__(self) -> int:
    return len(self.lines)

  def __getitem__(self, index: int) -> dict:
    line = self.lines[index]
    inputs, _, targets = line["text"].partition(b"\t")
    return {"inputs": inputs, "targets": targets.rstrip(b"\r\n"), "name": line["name"]}


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """Images decoded with Pillow when asked for; every image must have the first one's shape."""

  paths: tuple[str, ...]
  labels: np.ndarray
  classes: tuple[str, ...]
  shape: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    image = check_image_shape(
        decode_image(self.paths[index]), self.shape, f"image {self.paths[index]}", self.paths[0]
    )
    return {
        "image": image,
        "label": np.int64(self.labels[index]),
        "name": self.paths[index].encode(),
    }


@dataclasses.dataclass(frozen=True)
class Subset:
  """The examples of `source` at `indices`, in that order."""

  source: object
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


def decode_image(path, name: str | None = None) -> np.ndarray:
  """[H, W, C] uint8 from an image file's path or an open binary file (`name` says where its
  bytes come from in the error): grey images keep one channel, anything else becomes RGB."""
  from PIL import Image  # only image data sets need Pillow

  name = name or path
  try:
    with Image.open(path) as image:
      image = image if image.mode in ("L", "RGB") else image.convert("RGB")
      array = np.asarray(image, dtype=np.uint8)
  # Pillow's decoders report damaged bytes as any of OSError, SyntaxError, ValueError, EOFError,
  # zlib.error, struct.error...: whatever decoding one file raises is that file's fault.
  except Exception as e:  # noqa: BLE001
    reason = " ".join(str(e).replace(repr(name), "").replace(name, "").split()) or "no detail"
    raise UserError(
        f"{name} is not a readable image ({type(e).__name__}: {reason}); remove or replace it"
    ) from None
  return array[..., None] if array.ndim == 2 else array


def check_image_shape(image: np.ndarray, shape: tuple[int, ...], name: str, first: str):
  """`image`, when it has the first image's `shape`: a batch stacks images of one shape."""
  if image.shape != shape:
    raise UserError(
        f"{name} is {image.shape[:2]} with {image.shape[2]} channel(s) but {first} is "
        f"{shape[:2]} with {shape[2]}; resize the images to one size"
    )
  return image


def open_split(spec: str, split: str):
  """`split` (TFDS syntax) of `textfiles:GLOB`, `textlines:GLOB` or `imagefolder:DIR`."""
  kind, _, where = spec.partition(":")
  source, keys = _OPENERS[kind](spec, os.path.expanduser(where))
  return select_split(spec, source, hash_splits([zlib.crc32(k) for k in keys]), split)


def hash_splits(crc32s) -> dict[str, np.ndarray]:
  """The examples of each split by the CRC32 of their keys: validation where it is 0 mod 20."""
  in_validation = np.asarray(crc32s, np.int64) % VALIDATION_BUCKETS == 0
  return {"train": np.flatnonzero(~in_validation), "validation": np.flatnonzero(in_validation)}


HASH_RULE = "validation takes the ~5% whose key hashes to it"


def select_split(
    spec: str, source, indices: dict[str, np.ndarray], split: str, rule: str = HASH_RULE
) -> "Subset":
  """The examples of `split`, in TFDS's syntax over `indices` (each split's examples of `source`);
  `rule` says in errors how examples were given their split."""
  sizes = {name: types.SimpleNamespace(num_examples=len(ix)) for name, ix in indices.items()}
  counts = [f"{name} ({len(ix):,})" for name, ix in indices.items()]
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  except ValueError as e:
    raise UserError(
        f"--dataset={spec}: bad split {split!r} ({' '.join(str(e).split())}); its splits are "
        f"{', '.join(counts[:-1])}{' and ' if len(counts) > 1 else ''}{counts[-1]}"
    ) from None
  chosen = np.concatenate([indices[i.splitname][i.from_ : i.to] for i in instructions])
  if not len(chosen):
    raise UserError(
        f"--dataset={spec}: split {split!r} is empty "
        f"({', '.join(f'{len(ix):,} {name}' for name, ix in indices.items())} examples; {rule}); "
        "add files, or split train yourself: --train_split=train[:90%] --eval_split=train[90%:]"
    )
  return Subset(source, chosen)


def glob_files(spec: str, pattern: str) -> tuple[list[str], str]:
  """The files matching `pattern`, sorted, each real file once, and the directory their keys are
  relative to."""
  root, segments = _split_pattern(pattern)
  paths = _first_of_each_file(sorted(set(_find(root, segments, frozenset([_folder_id(root)])))))
  if not paths:
    raise UserError(
        f"--dataset={spec}: the pattern {pattern!r} matches no files (relative to {os.getcwd()})"
    )
  return paths, root


def _split_pattern(pattern: str) -> tuple[str, tuple[str, ...]]:
  """The folder before the first wildcard, and the path below it as segments (`**` alone at the
  end means every file below, as `**/*`)."""
  parts = pattern.split(os.sep)
  fixed = next(
      (i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS)), len(parts) - 1
  )
  root = os.sep.join(parts[:fixed]) or (os.sep if pattern.startswith(os.sep) else "")
  segments = tuple(part for part in parts[fixed:] if part)
  return root, segments + ("*",) if segments[-1:] == ("**",) else segments


def _find(folder: str, segments: tuple[str, ...], ancestors: frozenset) -> Iterator[str]:
  """The files below `folder` whose path from it matches `segments`, by glob's rules (`**` is any
  number of folders; a name starting with "." only matches a pattern that does too).

  Unlike glob, a link to a folder is never followed into a folder it sits in (`ancestors`, as
  (st_dev, st_ino)): a link loop adds nothing, instead of every file again at each depth the OS
  allows (exponentially many with two loops).
  """
  if segments:
    yield from _match(folder, _entries(folder), segments, ancestors)


def _match(
    folder: str, entries: list[os.DirEntry], segments: tuple[str, ...], ancestors: frozenset
):
  head, rest = segments[0], segments[1:]
  if head == "**":
    yield from _match(folder, entries, rest, ancestors)  # `**` as no folder at all
  for entry in entries:
    path = os.path.join(folder, entry.name)
    if head == "**" or (rest and _name_matches(entry.name, head)):
      child = _child_folder(entry, ancestors, hidden_ok=head != "**")
      if child is not None:
        yield from _find(path, segments if head == "**" else rest, ancestors | {child})
    elif not rest and _name_matches(entry.name, head) and _is_file(entry):
      yield path


def _entries(folder: str) -> list[os.DirEntry]:
  try:
    with os.scandir(folder or os.curdir) as entries:
      return sorted(entries, key=lambda e: e.name)
  except OSError:  # unreadable, or gone since it was listed: skipped, as glob does
    return []


def _child_folder(entry: os.DirEntry, ancestors: frozenset, hidden_ok: bool):
  """The (st_dev, st_ino) of the folder `entry` is or links to, or None when it is none, hidden
  (for `**`), or one of `ancestors`."""
  if entry.name.startswith(".") and not hidden_ok:
    return None
  try:
    if not entry.is_dir():
      return None
    stat = entry.stat()
  except OSError:  # a link to itself (ELOOP), or unreadable: no folder, as for glob
    return None
  identity = (stat.st_dev, stat.st_ino)
  return None if identity in ancestors else identity


def _is_file(entry: os.DirEntry) -> bool:
  try:
    return entry.is_file()
  except OSError:
    return False


def _folder_id(folder: str) -> tuple[int, int] | None:
  try:
    stat = os.stat(folder or os.curdir)
  except OSError:
    return None
  return stat.st_dev, stat.st_ino


def _name_matches(name: str, pattern: str) -> bool:
  return fnmatch.fnmatch(name, pattern) and (not name.startswith(".") or pattern.startswith("."))


def _file_id(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_dev, stat.st_ino


def _first_of_each_file(paths: list[str]) -> list[str]:
  """`paths` less those that are the same file as an earlier one (through a link, or a folder
  reached twice): one file read twice would weigh double, and could sit in both splits."""
  seen, kept = set(), []
  for path in paths:
    identity = _file_id(path)
    if identity not in seen:
      seen.add(identity)
      kept.append(path)
  return kept


def _open_text_files(spec: str, pattern: str):
  paths, root = glob_files(spec, pattern)
  return TextFiles(tuple(paths)), [os.path.relpath(p, root or os.curdir).encode() for p in paths]


def _open_text_lines(spec: str, pattern: str):
  paths, _ = glob_files(spec, pattern)
  chunks, starts, stops, names, numbers, offset = [], [], [], [], [], 0
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    number, end = 1, 0  # \n, \r\n and \r all end a line; blank lines are no document
    for line in _LINE.finditer(data):
      number += _line_breaks(data[end : line.start()])
      end = line.end()
      if line.group().strip():
        starts.append(offset + line.start())
        stops.append(offset + line.end())
        names.append(path.encode())
        numbers.append(number)
    chunks.append(data)
    offset += len(data)
  if not starts:
    raise UserError(
        f"--dataset={spec}: the {len(paths)} file(s) matching {pattern!r} hold no non-blank line"
    )
  source = TextLines(
      b"".join(chunks),
      np.array(starts, np.int64),
      np.array(stops, np.int64),
      tuple(names),
      np.array(numbers, np.int64),
  )
  return source, [source[i]["text"] for i in range(len(source))]


def _line_breaks(text: bytes) -> int:
  """How many lines `text` ends: \r\n counts once."""
  return text.count(b"\r") + text.count(b"\n") - text.count(b"\r\n")


def _open_text_pairs(spec: str, pattern: str):
  """Every line checked when the files are opened, so that a bad line stops the run before its
  first step rather than when a batch reaches it."""
  lines, keys = _open_text_lines(spec, pattern)
  for i, line in enumerate(keys):
    inputs, tab, targets = line.partition(b"\t")
    problem = None
    if not tab:
      problem = "has no tab between the source and the target"
    elif not inputs.strip():
      problem = "has an empty source (nothing before its tab)"
    elif not targets.strip():
      problem = "has an empty target (nothing after its tab)"
    if problem:
      where = f"{lines.names[i].decode(errors='replace')}:{lines.line_numbers[i]}"
      raise UserError(
          f"--dataset={spec}: line {where} {problem}; each line is SOURCE<tab>TARGET: "
          f"{line[:60].decode(errors='replace')!r}"
      )
  return TextPairs(lines), keys


def _open_image_folder(spec: str, directory: str):
  if not os.path.isdir(directory):
    raise UserError(
        f"--dataset={spec}: {directory!r} is not a directory (want DIR/CLASS/IMAGE files)"
    )
  classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  paths, labels = _class_images(spec, directory, classes)
  if len(classes) < 2 or not paths:
    raise UserError(
        f"--dataset={spec}: want one sub-folder per class (at least two) holding "
        f"{'/'.join(IMAGE_SUFFIXES)} images; found {len(classes)} sub-folder(s) and {len(paths)} image(s)"
    )
  source = ImageFolder(
      tuple(paths), np.array(labels, np.int64), tuple(classes), decode_image(paths[0]).shape
  )
  return source, [os.path.relpath(p, directory).encode() for p in paths]


def _class_images(spec: str, directory: str, classes: list[str]) -> tuple[list[str], list[int]]:
  """Each real image file once, with its class. Links are followed, but never back into the image
  folder or a class folder above them; a file that two class folders reach (a link from one into
  another) has no one label, so it is an error rather than a guess."""
  owner = {}  # (st_dev, st_ino) -> (label, first path)
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(directory, name)
    ancestors = frozenset([_folder_id(directory), _folder_id(folder)])
    for path in sorted(_find(folder, ("**", "*"), ancestors)):
      if not path.lower().endswith(IMAGE_SUFFIXES):
        continue
      first_label, first = owner.setdefault(_file_id(path), (label, path))
      if first_label != label:
        link = _first_link(first, directory) or _first_link(path, directory)
        raise UserError(
            f"--dataset={spec}: {first} and {path} are one file, in class folders "
            f"{classes[first_label]!r} and {name!r}, so it has no one label; remove "
            f"{f'the link {link}' if link else 'one of the two (they are hard links)'}"
        )
      if first == path:
        paths.append(path)
        labels.append(label)
  return paths, labels


def _first_link(path: str, top: str) -> str | None:
  """The first symbolic link on the way from `top` to `path`, if any."""
  parts = os.path.relpath(path, top).split(os.sep)
  steps = (os.path.join(top, *parts[:i]) for i in range(1, len(parts) + 1))
  return next((step for step in steps if os.path.islink(step)), None)


_LINE = re.compile(rb"[^\r\n]+")
_OPENERS = {
    "textfiles": _open_text_files,
    "textlines": _open_text_lines,
    "textpairs": _open_text_pairs,
    "imagefolder": _open_image_folder,
}
