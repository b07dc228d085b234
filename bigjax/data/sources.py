"""Opens a data set split for random access (len, getitem -> dict of numpy): bigjax's own offline
builders, any TFDS data set prepared in ArrayRecord form, or the user's own files (see files.py)."""

import difflib
import os
import threading

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils
from tensorflow_datasets.core import constants as tfds_constants

from bigjax.data import digits
from bigjax.data import files
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
  `imagefolder:DIR` for the user's own files. `split` takes TFDS's syntax (`train[:90%]`,
  `train[10:20]+validation`). Local builders are prepared into `data_dir` on first use (seconds);
  any other TFDS name must already be prepared there in ArrayRecord form: nothing is downloaded.
  """
  if files.is_files_spec(name):
    return files.open_split(name, split)
  builder = open_builder(name, data_dir)
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:  # TFDS's unknown-split and bad-slice errors
    reason = " ".join(str(e).split())
    splits = ", ".join(f"{s} ({info.num_examples:,})" for s, info in builder.info.splits.items())
    raise UserError(f"data set {name!r} in {builder.data_dir} has no split {split!r} ({reason}); its splits are "
                    f"{splits}; slice them as train[:90%] or train[10:20]+test, or prepare the data set again "
                    f"with {_build_command(name, _root(data_dir))}") from None


def split_names(name: str, data_dir: str | None = None) -> list[str]:
  if files.is_files_spec(name):
    return list(files.SPLITS)
  return list(open_builder(name, data_dir).info.splits)


def default_eval_split(name: str, data_dir: str | None = None) -> str:
  """validation where the data set has one, else test (what --eval_split means when not given)."""
  names = split_names(name, data_dir)
  for split in ("validation", "test"):
    if split in names:
      return split
  raise UserError(f"data set {name!r} has neither a validation nor a test split (it has {', '.join(names)}); "
                  "choose one with --eval_split, e.g. --train_split=train[:90%] --eval_split=train[90%:]")


def num_classes(name: str, label_key: str, data_dir: str | None = None) -> int | None:
  """How many classes the label feature has, where the data set says (a ClassLabel, an image folder)."""
  if files.is_files_spec(name):
    return files.num_classes(name)
  feature = open_builder(name, data_dir).info.features[label_key]
  return getattr(feature, "num_classes", None)


def feature_names(name: str, data_dir: str | None = None) -> set[str]:
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
    raise UserError(f"data set {base!r} needs a config: use {', '.join(f'{base}/{c}' for c in configs)}")
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
      print(f"preparing {builder.name} in {builder.data_dir} from local sources (nothing is downloaded)", flush=True)
      # TFDS's own two lines would say "Downloading and preparing"; silenced on this builder only.
      builder._log_download_bytes = builder._log_download_done = lambda: None  # noqa: SLF001
      builder.download_and_prepare()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bigjax: {builder.name} prepared by process {turn}")


def _root(data_dir: str | None) -> str:
  # Without --data_dir, TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  return os.path.expanduser(data_dir or tfds_constants.DATA_DIR)


def _parse_name(name: str) -> tuple[str, dict]:
  try:
    base, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError as e:
    raise UserError(f"--dataset={name!r} is not NAME[/CONFIG][:VERSION] like mnist or mnist:3.0.1") from None
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
  how_to_prepare = (f"prepare it with {_build_command(name, data_dir)} on a machine with internet and "
                    f"TensorFlow, then copy {os.path.join(data_dir, base)} there")
  prepared = _prepared_versions(data_dir, base)
  where = (f"{data_dir} holds only {', '.join(f'{base}/{v}' for v in prepared)}" if prepared else
           f"{data_dir} holds no version of it; bigjax's offline data sets are {', '.join(LOCAL_BUILDERS)}")
  close = difflib.get_close_matches(base, LOCAL_BUILDERS, n=1)
  if close and not prepared:
    where = f"did you mean {close[0]!r}? {where}"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, AssertionError, ValueError):
    # Not registered with TFDS and not in data_dir, or a version or config that is not there.
    raise UserError(f"data set {name!r} is not prepared in {data_dir} ({where}); {how_to_prepare}") from None
  if not builder.is_prepared():
    raise UserError(f"data set {name!r} is not prepared in {data_dir} ({where}); {how_to_prepare}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UserError(f"data set {name!r} in {data_dir} is stored as {builder.info.file_format.value}, "
                    f"but random access needs array_record; {how_to_prepare}")
  return builder
