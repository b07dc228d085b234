"""Opens a data set split for random access (len, getitem -> dict of numpy): bigjax's own offline
builders, any TFDS data set prepared in ArrayRecord form, or the user's own files (see files.py,
formats.py)."""

import difflib
import json
import os
import threading
from collections.abc import Iterator

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tensorflow_datasets.core import constants as tfds_constants

from bigjax import private_apis
from bigjax.data import digits
from bigjax.data import files
from bigjax.data import formats
from bigjax.data import python_text
from bigjax.data import synthetic
from bigjax.errors import UserError

# Builders that ship with bigjax and prepare themselves from files already on the machine.
LOCAL_BUILDERS = {
    "python_stdlib_text": python_text.PythonStdlibText,
    "sklearn_digits": digits.SklearnDigits,
    "synthetic_sequences": synthetic.SyntheticSequences,
}

_prepare_lock = threading.Lock()


def load_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source for `split` of data set `name`.

  `name` is `NAME[/CONFIG][:VERSION]` for TFDS, or `textfiles:GLOB`, `textlines:GLOB`,
  `imagefolder:DIR`, `jsonl:GLOB`, `parquet:GLOB` for the user's own files. `split` takes TFDS's
  syntax (`train[:90%]`, `train[10:20]+validation`). Local builders are prepared into `data_dir` on
  first use (seconds); any other TFDS name must already be prepared there in ArrayRecord form:
  nothing is downloaded. JSON Lines indexes that cannot be kept beside their files go to
  `data_dir/bigjax_index`.
  """
  if formats.is_format_spec(name):
    return formats.open_split(name, split, index_cache(data_dir))
  if files.is_files_spec(name):
    return files.open_split(name, split)
  builder = open_builder(name, data_dir)
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:  # TFDS's unknown-split and bad-slice errors
    reason = " ".join(str(e).split())
    splits = ", ".join(f"{s} ({info.num_examples:,})" for s, info in builder.info.splits.items())
    raise UserError(
        f"data set {name!r} in {builder.data_dir} has no split {split!r} ({reason}); its splits are "
        f"{splits}; slice them as train[:90%] or train[10:20]+test, or prepare the data set again "
        f"with {_build_command(name, _root(data_dir))}"
    ) from None


def index_cache(data_dir: str | None) -> str:
  """Where the row indexes of JSON Lines files that sit in read-only folders are kept."""
  return os.path.join(_root(data_dir), "bigjax_index")


def split_names(name: str, data_dir: str | None = None) -> list[str]:
  if formats.is_format_spec(name):
    return formats.split_names(name)
  if files.is_files_spec(name):
    return list(files.SPLITS)
  return list(open_builder(name, data_dir).info.splits)


def default_eval_split(name: str, data_dir: str | None = None) -> str:
  """validation where the data set has one, else test (what --eval_split means when not given)."""
  names = split_names(name, data_dir)
  for split in ("validation", "test"):
    if split in names:
      return split
  raise UserError(
      f"data set {name!r} has neither a validation nor a test split (it has {', '.join(names)}); "
      "choose one with --eval_split, e.g. --train_split=train[:90%] --eval_split=train[90%:]"
  )


def num_classes(name: str, label_key: str, data_dir: str | None = None) -> int | None:
  """How many classes the label feature has, where the data set says (a ClassLabel, an image folder,
  a Parquet column of integers)."""
  if formats.is_format_spec(name):
    return formats.num_classes(name, label_key)
  if files.is_files_spec(name):
    return files.num_classes(name)
  feature = open_builder(name, data_dir).info.features[label_key]
  return getattr(feature, "num_classes", None)


def feature_names(name: str, data_dir: str | None = None) -> set[str]:
  if formats.is_format_spec(name):
    return formats.feature_names(name, index_cache(data_dir))
  if files.is_files_spec(name):
    return files.feature_names(name)
  return set(open_builder(name, data_dir).info.features.keys())


def open_builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` (`NAME[/CONFIG][:VERSION]`), prepared in `data_dir`."""
  data_dir = _root(data_dir)
  base, kwargs = _parse_name(name)
  if base not in LOCAL_BUILDERS:
    return _prepared_builder(name, base, data_dir)
  builder_cls = LOCAL_BUILDERS[base]
  configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if configs and kwargs.get("config") not in configs:
    raise UserError(
        f"data set {base!r} needs a config: use {', '.join(f'{base}/{c}' for c in configs)}"
    )
  try:
    builder = builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)
  except (AssertionError, ValueError) as e:  # TFDS asserts on an unknown version
    raise UserError(f"data set {name!r}: {' '.join(str(e).split())}") from None
  with _prepare_lock:
    if builder.is_prepared():
      return builder
    _prepare_in_process_order(builder)
  # Made anew: this one may have been opened before another process wrote the data set's metadata.
  return builder_cls(data_dir=data_dir, file_format="array_record", **kwargs)


def _prepare_in_process_order(builder) -> None:
  """Processes take turns, so processes sharing a disk never write the same files at once; those
  after the first then find the data set prepared. Processes on separate disks each prepare."""
  for turn in range(jax.process_count()):
    if turn == jax.process_index() and not builder.is_prepared():
      tfds.disable_progress_bar()
      print(
          f"preparing {builder.name} in {builder.data_dir} from local sources (nothing is downloaded)",
          flush=True,
      )
      private_apis.silence_tfds_download_log(builder)
      builder.download_and_prepare()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bigjax: {builder.name} prepared by process {turn}")


def _root(data_dir: str | None) -> str:
  # Without --data_dir, TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  return os.path.expanduser(data_dir or tfds_constants.DATA_DIR)


def _parse_name(name: str) -> tuple[str, dict]:
  try:
    base, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError:
    raise UserError(
        f"--dataset={name!r} is not NAME[/CONFIG][:VERSION] like mnist or mnist:3.0.1"
    ) from None
  return str(base), kwargs


def _build_command(name: str, data_dir: str) -> str:
  return f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`"


def _prepared_versions(data_dir: str, base: str) -> list[str]:
  """Versions of `base` (any config) that have a dataset_info.json under `data_dir`."""
  root = os.path.join(data_dir, base)
  found = set()
  for dirpath, _, filenames in os.walk(root) if os.path.isdir(root) else ():
    if "dataset_info.json" in filenames:
      found.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
  return sorted(found)


def _prepared_builder(name: str, base: str, data_dir: str):
  how_to_prepare = (
      f"prepare it with {_build_command(name, data_dir)} on a machine with internet and "
      f"TensorFlow, then copy {os.path.join(data_dir, base)} there"
  )
  prepared = _prepared_versions(data_dir, base)
  where = (
      f"{data_dir} holds only {', '.join(f'{base}/{v}' for v in prepared)}"
      if prepared
      else f"{data_dir} holds no version of it; bigjax's offline data sets are {', '.join(LOCAL_BUILDERS)}"
  )
  close = difflib.get_close_matches(base, LOCAL_BUILDERS, n=1)
  if close and not prepared:
    where = f"did you mean {close[0]!r}? {where}"
  _check_feature_classes(data_dir, base, name)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError):
    # Not registered with TFDS and not in data_dir, or a version or config that is not there.
    raise UserError(
        f"data set {name!r} is not prepared in {data_dir} ({where}); {how_to_prepare}"
    ) from None
  if not builder.is_prepared():
    raise UserError(f"data set {name!r} is not prepared in {data_dir} ({where}); {how_to_prepare}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UserError(
        f"data set {name!r} in {data_dir} is stored as {builder.info.file_format.value}, "
        f"but random access needs array_record; {how_to_prepare}"
    )
  return builder


# The files of a prepared data set that name feature classes, which TFDS imports by name.
_METADATA_FILES = ("dataset_info.json", "features.json")


def _check_feature_classes(data_dir: str, base: str, name: str) -> None:
  """Refuses a prepared data set whose metadata names a feature class TFDS does not define.

  TFDS imports the module of every `pythonClassName` in a data set's JSON when it reads it, and
  `python -m` puts the current directory first on sys.path: a data set copied from someone else
  would run whatever module it names. Classes already defined (TFDS's own, or from a module given
  to --import_modules) cost no import. Every version and config of `base` is checked, since TFDS
  picks among them.
  """
  known = _known_feature_classes()
  for path in _metadata_files(os.path.join(data_dir, base)):
    for class_name in _class_names(_read_json(path, name, data_dir)):
      if class_name not in known:
        module = class_name.rpartition(".")[0] or class_name
        raise UserError(
            f"{path} names the feature class {class_name!r}, which is neither TFDS's own nor imported "
            "already: bigjax will not import code named by a data set; if you trust the data set and "
            f"its code, import {module!r} yourself with --import_modules={module}"
        )


def _known_feature_classes() -> set[str]:
  """Names of the feature classes defined now (how TFDS names them, aliases included)."""
  known, todo = set(), [tfds.features.FeatureConnector]
  while todo:
    cls = todo.pop()
    known.add(f"{cls.__module__}.{cls.__name__}")
    known.update(cls.__dict__.get("ALIASES", []))
    todo += cls.__subclasses__()
  return known


def _metadata_files(root: str) -> list[str]:
  """The metadata files in ROOT/VERSION and ROOT/CONFIG/VERSION, where TFDS looks (a fixed depth,
  so a link loop cannot make this endless)."""
  found = []
  for first in _subfolders(root):
    for folder in [first, *_subfolders(first)]:
      found += [p for p in (os.path.join(folder, f) for f in _METADATA_FILES) if os.path.isfile(p)]
  return found


def _subfolders(folder: str) -> list[str]:
  try:
    names = sorted(os.listdir(folder))
  except OSError:  # not there (a data set not prepared yet), or unreadable: TFDS will say
    return []
  return [os.path.join(folder, n) for n in names if os.path.isdir(os.path.join(folder, n))]


def _read_json(path: str, name: str, data_dir: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
    raise UserError(
        f"{path} cannot be read ({' '.join(str(e).split())}); restore the data set's files or "
        f"prepare it again with {_build_command(name, data_dir)}"
    ) from None


def _class_names(tree) -> Iterator[str]:
  """Every `pythonClassName` value anywhere in a JSON tree."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      if key == "pythonClassName":
        yield value if isinstance(value, str) else json.dumps(value)
      else:
        yield from _class_names(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _class_names(value)
