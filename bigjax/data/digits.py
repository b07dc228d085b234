"""`sklearn_digits`: the 1,797 handwritten 8x8 digits that scikit-learn bundles, as a TFDS data set.

The images (UCI optdigits, 16 grey levels) ship inside scikit-learn, so no download is needed.
Pixels are scaled from 0..16 to 0..255. Split: every fifth image (index % 5 == 4) is test (359
images), the rest train (1,438); the data set is ordered roughly by writer, so both splits see
every writer.
"""

import numpy as np
import tensorflow_datasets as tfds

TEST_EVERY = 5


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits: 8x8x1 uint8 images, 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits; test = index % 5 == 4."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Handwritten digits bundled with scikit-learn (UCI optdigits, 8x8).",
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    from sklearn import datasets  # a builder-only dependency: reading the prepared set needs none

    digits = datasets.load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    is_test = np.arange(len(labels)) % TEST_EVERY == TEST_EVERY - 1
    return {
        "train": self._generate_examples(images[~is_test], labels[~is_test]),
        "test": self._generate_examples(images[is_test], labels[is_test]),
    }

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
