"""Opens a TFDS split for random access: bigjax's own offline builders, or any prepared TFDS data set."""

import os
import threading

import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from bigjax.data import digits
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
  """A random-access source (len, getitem -> dict of numpy) for `split` of TFDS data set `name`.

  Local builders are prepared into `data_dir` on first use (seconds). Any other name must already
  be prepared there in ArrayRecord form; nothing is downloaded.
  """
  builder = open_builder(name, data_dir)
  if split not in builder.info.splits:
    raise UserError(f"data set {name!r} has no split {split!r}; it has {', '.join(builder.info.splits)}")
  return builder.as_data_source(split=split)


def open_builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` (`name/config` for a builder config), prepared in `data_dir`."""
  # Without --data_dir, TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  data_dir = os.path.expanduser(data_dir or tfds_constants.DATA_DIR)
  base, _, config = name.partition("/")
  if base not in LOCAL_BUILDERS:
    return _prepared_builder(name, data_dir)
  builder_cls = LOCAL_BUILDERS[base]
  configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
  if configs and config not in configs:
    raise UserError(f"data set {base!r} needs a config: use {', '.join(f'{base}/{c}' for c in configs)}")
  builder = builder_cls(data_dir=data_dir, file_format="array_record", **({"config": config} if config else {}))
  with _prepare_lock:
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      builder.download_and_prepare()
  return builder


def feature_names(name: str, data_dir: str | None = None) -> set[str]:
  return set(open_builder(name, data_dir).info.features.keys())


def _prepared_builder(name: str, data_dir: str):
  how_to_prepare = (f"prepare it with `tfds build {name.split('/')[0]} --data_dir={data_dir} "
                    f"--file_format=array_record` on a machine with internet, then copy it there")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f"unknown data set {name!r}; bigjax's offline data sets are "
                    f"{', '.join(LOCAL_BUILDERS)}, and any TFDS name works once prepared") from None
  if not builder.is_prepared():
    raise UserError(f"data set {name!r} is not prepared in {data_dir}; {how_to_prepare}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise UserError(f"data set {name!r} in {data_dir} is stored as {builder.info.file_format.value}, "
                    f"but random access needs array_record; {how_to_prepare}")
  return builder
