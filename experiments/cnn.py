"""Trains an image classifier: any image preset (cnn-small, resnet*, vit-*, mlp).

python -m experiments.cnn --flagfile=experiments/configs/cnn_tiny.flags
"""

from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import run as bigjax_run
from bigjax import metrics
from bigjax import tasks
from bigjax.data import images
from bigjax.data import mixture
from bigjax.data import pipeline
from bigjax.data import sources
from bigjax.errors import UserError

FLIP = flags.DEFINE_bool("augment_flip", False, "Random horizontal flips in training.")
CROP_PADDING = flags.DEFINE_integer(
    "augment_crop_padding",
    0,
    "Random crops from images zero-padded by this " "many pixels in training; 0 disables.",
    lower_bound=0,
)


def fit_classifier(exp: bigjax_run.Experiment) -> dict:
  """Image classification on the experiment's data set, or each source of a mixture
  (bigjax.data.mixture)."""
  keys = {"image_key": bigjax_flags.IMAGE_KEY.value, "label_key": bigjax_flags.LABEL_KEY.value}
  parts = mixture.parse(exp.dataset)
  eval_splits = mixture.eval_splits(parts, bigjax_flags.EVAL_SPLIT.value, exp.data_dir)
  mixture.common_kind(parts, exp.data_dir, keys["image_key"])
  train_source = mixture.open_mixed(
      parts,
      lambda p: images.open_split(p.spec, bigjax_flags.TRAIN_SPLIT.value, exp.data_dir, **keys),
      unit="images",
  )
  eval_source = mixture.open_mixed(
      parts, lambda p: images.open_split(p.spec, eval_splits[p], exp.data_dir, **keys)
  )
  for part, train_part, eval_part in zip(
      parts, mixture.members(train_source), mixture.members(eval_source)
  ):
    metrics.console(f"{part.label()}: {len(train_part):,} train / {len(eval_part):,} eval images")
  check_num_classes(exp, parts, keys["label_key"])
  augment = images.Augment(flip=FLIP.value, crop_padding=CROP_PADDING.value)
  workers = pipeline.workers(bigjax_flags.DATA_WORKERS.value)
  return bigjax_run.run(
      exp,
      task=tasks.Classification(sources=tuple(p.name for p in parts if p.name)),
      train_data=images.train_batches(
          train_source, exp.config.batch_size, exp.config.seed, augment, workers=workers, **keys
      ),
      eval_data=images.eval_batches(
          eval_source, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value, **keys
      ),
  )


def check_num_classes(
    exp: bigjax_run.Experiment, parts: tuple[mixture.Source, ...], label_key: str
) -> None:
  """Labels past the model's last output would train on garbage: stop with the fix instead."""
  known = mixture.each(parts, lambda p: sources.num_classes(p.spec, label_key, exp.data_dir))
  classes = max((c for c in known if c), default=None)
  outputs = getattr(getattr(exp.base_model, "config", None), "num_classes", None)
  if classes and outputs and classes > outputs:
    raise UserError(
        f"{exp.dataset} has {classes} classes but --model={bigjax_flags.MODEL.value} outputs {outputs}; "
        f"add --model_override=num_classes={classes}"
    )


def main(argv):
  del argv
  fit_classifier(bigjax_flags.experiment())


if __name__ == "__main__":
  bigjax_flags.run(main)
