"""The user's own files as TFDS-style random-access sources (len, getitem -> dict of numpy), with no
builder to write and nothing to prepare:

  textfiles:GLOB    one document per file:           {"text": bytes, "name": bytes}
  textlines:GLOB    one document per non-empty line: {"text": bytes (no newline), "name": bytes}
  imagefolder:DIR   DIR/CLASS/IMAGE, one sub-folder per class (sorted names are labels 0, 1, ...):
                    {"image": uint8 [H, W, C], "label": int64, "name": bytes}

GLOB is a shell pattern (`**` recurses; quote it). Splits are `train` and `validation`: a document
goes to validation when the CRC32 of its key is 0 mod 20 (about 5%). The key of a file is its path
below the pattern's fixed directory, so a file keeps its split as others come and go; the key of a
line is the line itself, so a repeated line never sits on both sides. TFDS's split syntax works on
top (`train[:50%]`, `train+validation`).
"""

import dataclasses
import glob
import os
import re
import types
import zlib

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
  return {"image", "label", "name"} if spec.startswith("imagefolder:") else {"text", "name"}


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

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, index: int) -> dict:
    return {"text": self.buffer[self.starts[index]:self.stops[index]], "name": self.names[index]}


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
    image = decode_image(self.paths[index])
    if image.shape != self.shape:
      raise UserError(f"image {self.paths[index]} is {image.shape[:2]} with {image.shape[2]} channel(s) but "
                      f"{self.paths[0]} is {self.shape[:2]} with {self.shape[2]}; resize the images to one size")
    return {"image": image, "label": np.int64(self.labels[index]), "name": self.paths[index].encode()}


@dataclasses.dataclass(frozen=True)
class Subset:
  """The examples of `source` at `indices`, in that order."""
  source: object
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


def decode_image(path: str) -> np.ndarray:
  """[H, W, C] uint8: grey images keep one channel, anything else becomes RGB."""
  from PIL import Image  # only image folders need Pillow
  with Image.open(path) as image:
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def open_split(spec: str, split: str):
  """`split` (TFDS syntax) of `textfiles:GLOB`, `textlines:GLOB` or `imagefolder:DIR`."""
  kind, _, where = spec.partition(":")
  source, keys = _OPENERS[kind](spec, os.path.expanduser(where))
  in_validation = np.array([is_validation(k) for k in keys], dtype=bool)
  indices = {"train": np.flatnonzero(~in_validation), "validation": np.flatnonzero(in_validation)}
  sizes = {name: types.SimpleNamespace(num_examples=len(ix)) for name, ix in indices.items()}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  except ValueError as e:
    raise UserError(f"--dataset={spec}: bad split {split!r} ({' '.join(str(e).split())}); its splits are "
                    f"train ({len(indices['train']):,}) and validation ({len(indices['validation']):,})") from None
  chosen = np.concatenate([indices[i.splitname][i.from_:i.to] for i in instructions])
  if not len(chosen):
    raise UserError(f"--dataset={spec}: split {split!r} is empty ({len(indices['train']):,} train, "
                    f"{len(indices['validation']):,} validation documents; validation takes the ~5% whose key "
                    "hashes to it); add files, or split train yourself: --train_split=train[:90%] "
                    "--eval_split=train[90%:]")
  return Subset(source, chosen)


def _glob(spec: str, pattern: str) -> tuple[list[str], str]:
  """The files matching `pattern`, sorted, and the directory their keys are relative to."""
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  if not paths:
    raise UserError(f"--dataset={spec}: the pattern {pattern!r} matches no files (relative to {os.getcwd()})")
  fixed = pattern
  while any(c in fixed for c in _GLOB_CHARS):
    fixed = os.path.dirname(fixed)
  return paths, fixed if os.path.isdir(fixed) else os.path.dirname(fixed)


def _open_text_files(spec: str, pattern: str):
  paths, root = _glob(spec, pattern)
  return TextFiles(tuple(paths)), [os.path.relpath(p, root).encode() for p in paths]


def _open_text_lines(spec: str, pattern: str):
  paths, _ = _glob(spec, pattern)
  chunks, starts, stops, names, offset = [], [], [], [], 0
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    for line in _LINE.finditer(data):  # \n, \r\n and \r all end a line; blank lines are no document
      if line.group().strip():
        starts.append(offset + line.start())
        stops.append(offset + line.end())
        names.append(path.encode())
    chunks.append(data)
    offset += len(data)
  if not starts:
    raise UserError(f"--dataset={spec}: the {len(paths)} file(s) matching {pattern!r} hold no non-blank line")
  source = TextLines(b"".join(chunks), np.array(starts, np.int64), np.array(stops, np.int64), tuple(names))
  return source, [source[i]["text"] for i in range(len(source))]


def _open_image_folder(spec: str, directory: str):
  if not os.path.isdir(directory):
    raise UserError(f"--dataset={spec}: {directory!r} is not a directory (want DIR/CLASS/IMAGE files)")
  classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
  paths, labels = [], []
  for label, name in enumerate(classes):
    found = sorted(p for p in glob.glob(os.path.join(directory, name, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_SUFFIXES))
    paths += found
    labels += [label] * len(found)
  if len(classes) < 2 or not paths:
    raise UserError(f"--dataset={spec}: want one sub-folder per class (at least two) holding "
                    f"{'/'.join(IMAGE_SUFFIXES)} images; found {len(classes)} sub-folder(s) and {len(paths)} image(s)")
  source = ImageFolder(tuple(paths), np.array(labels, np.int64), tuple(classes), decode_image(paths[0]).shape)
  return source, [os.path.relpath(p, directory).encode() for p in paths]


_LINE = re.compile(rb"[^\r\n]+")
_OPENERS = {"textfiles": _open_text_files, "textlines": _open_text_lines, "imagefolder": _open_image_folder}
