"""Opens a TFDS split for random access: bigjax's own offline builders, or any prepared TFDS data set."""

import os
import threading

import tensorflow_datasets as tfds

from bigjax.data import digits
from bigjax.data import python_text
from bigjax.errors import UserError

# Builders that ship with bigjax and prepare themselves from files already on the machine.
LOCAL_BUILDERS = {
    "python_stdlib_text": python_text.PythonStdlibText,
    "sklearn_digits": digits.SklearnDigits,
}

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")
_prepare_lock = threading.Lock()


def load_source(name: str, split: str, data_dir: str | None = None):
  """A random-access source (len, getitem -> dict of numpy) for `split` of TFDS data set `name`.

  Local builders are prepared into `data_dir` on first use (seconds). Any other name must already
  be prepared there in ArrayRecord form; nothing is downloaded.
  """
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  if name in LOCAL_BUILDERS:
    builder = LOCAL_BUILDERS[name](data_dir=data_dir, file_format="array_record")
    with _prepare_lock:
      if not builder.is_prepared():
        tfds.disable_progress_bar()
        builder.download_and_prepare()
  else:
    builder = _prepared_builder(name, data_dir)
  if split not in builder.info.splits:
    raise UserError(f"data set {name!r} has no split {split!r}; it has {', '.join(builder.info.splits)}")
  return builder.as_data_source(split=split)


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
