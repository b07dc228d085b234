"""Image classification batches: per-image standardisation and optional flips and crops, in grain."""

import dataclasses

import numpy as np

from bigjax.data import mixture
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.errors import UserError


def standardize(image: np.ndarray) -> np.ndarray:
  """Zero mean and unit variance per image (as tf.image.per_image_standardization); float32."""
  image = image.astype(np.float32)
  std = max(float(image.std()), 1.0 / np.sqrt(image.size))  # a blank image stays finite
  return (image - image.mean()) / std


@dataclasses.dataclass(frozen=True)
class Augment:
  """Random horizontal flip and random crop from a zero-padded image, for natural images (CIFAR)."""

  flip: bool = False
  crop_padding: int = 0

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    if self.crop_padding:
      pad = self.crop_padding
      height, width = image.shape[:2]
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
      top, left = rng.integers(0, 2 * pad + 1, size=2)
      image = padded[top : top + height, left : left + width]
    return image


def _image(example: dict, image_key: str) -> np.ndarray:
  image = np.asarray(example[image_key])
  return image[..., None] if image.ndim == 2 else image


@dataclasses.dataclass(frozen=True)
class Example:
  """Picks and converts one example's image and label (feature names are the data set's)."""

  image_key: str = "image"
  label_key: str = "label"
  augment: Augment | None = None

  def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
    image = _image(example, self.image_key)
    if self.augment is not None and rng is not None:
      image = self.augment(image, rng)
    return {"image": standardize(image), "label": np.int32(example[self.label_key])}


def open_split(
    dataset: str,
    split: str,
    data_dir: str | None,
    image_key: str = "image",
    label_key: str = "label",
):
  source = sources.load_source(dataset, split, data_dir)
  missing = [k for k in (image_key, label_key) if k not in source[0]]
  if missing:
    raise UserError(
        f"{dataset}/{split} has no feature(s) {missing}; its features are {sorted(source[0])}"
    )
  return source


def train_batches(
    source,
    global_batch_size: int,
    seed: int,
    augment: Augment | None = None,
    *,
    image_key: str = "image",
    label_key: str = "label",
    workers: int = 0,
):
  example = Example(image_key=image_key, label_key=label_key, augment=augment)
  check_one_shape(source, image_key)
  return pipeline.train_batches(source, global_batch_size, seed, transform=example, workers=workers)


def check_one_shape(source, image_key: str) -> None:
  """A mixture's sources give images of one shape (a batch is one array)."""
  if not isinstance(source, mixture.Mixture):
    return
  first = None  # (part, shape)
  for part, member in zip(source.parts, source.sources):
    if not len(member):  # the pipeline says so
      continue
    shape = _image(member[0], image_key).shape
    if first is None:
      first = (part, shape)
    elif shape != first[1]:
      raise UserError(
          f"{part.label()} has images of shape {shape} but {first[0].label()} has {first[1]}; a "
          "mixture's images must have one shape: resize them"
      )


def eval_batches(
    source,
    global_batch_size: int,
    max_batches: int = 0,
    *,
    image_key: str = "image",
    label_key: str = "label",
) -> list[dict]:
  return pipeline.eval_batches(
      source,
      global_batch_size,
      max_batches,
      transform=Example(image_key=image_key, label_key=label_key),
  )
