"""`python_stdlib_text`: a byte-level text corpus built from the Python standard library's sources.

Every machine with Python has these files, so the corpus needs no download. The top-level `*.py`
files of the running interpreter's standard library (about 4.7 MB on Python 3.11) become one example
each; a file goes to validation when the CRC32 of its name is 0 mod 20 (about 5%), a split that stays
fixed as files come and go between Python versions. The corpus differs slightly between Python
versions; the version is recorded in the data set's description.
"""

import pathlib
import sys
import sysconfig
import zlib

import numpy as np
import tensorflow_datasets as tfds

VALIDATION_BUCKETS = 20


def stdlib_sources() -> list[pathlib.Path]:
  """The top-level `.py` files of this interpreter's standard library, sorted by name."""
  return sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def is_validation(path: pathlib.Path) -> bool:
  return zlib.crc32(path.name.encode()) % VALIDATION_BUCKETS == 0


class PythonStdlibText(tfds.core.GeneratorBasedBuilder):
  """Python standard library sources as raw bytes, one file per example."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Top-level Lib/*.py files; validation = crc32(name) % 20 == 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built in code rather than from metadata files next to the module, which TFDS would otherwise
    # look for (and not find) for a builder that lives inside a package.
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Python {sys.version.split()[0]} standard library sources, byte level.",
        features=tfds.features.FeaturesDict(
            {
                "name": tfds.features.Text(),
                "bytes": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = stdlib_sources()
    return {
        "train": self._generate_examples([f for f in files if not is_validation(f)]),
        "validation": self._generate_examples([f for f in files if is_validation(f)]),
    }

  def _generate_examples(self, files):
    for path in files:
      yield path.name, {
          "name": path.name,
          "bytes": np.frombuffer(path.read_bytes(), dtype=np.uint8),
      }
