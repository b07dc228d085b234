"""Trains an image classifier: any image preset (cnn-small, resnet*, vit-*, mlp).

  python -m experiments.cnn --flagfile=experiments/configs/cnn_tiny.flags
"""

from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import metrics
from bigjax import tasks
from bigjax.data import images

TRAIN_SPLIT = flags.DEFINE_string("train_split", "train", "Split to train on.")
EVAL_SPLIT = flags.DEFINE_string("eval_split", "test", "Split to evaluate on.")
FLIP = flags.DEFINE_bool("augment_flip", False, "Random horizontal flips in training.")
CROP_PADDING = flags.DEFINE_integer("augment_crop_padding", 0, "Random crops from images zero-padded by this "
                                    "many pixels in training; 0 disables.", lower_bound=0)


def fit_classifier(exp: bigjax_flags.Experiment) -> dict:
  """Image classification on the experiment's data set."""
  train_source = images.open_split(exp.dataset, TRAIN_SPLIT.value, exp.data_dir)
  eval_source = images.open_split(exp.dataset, EVAL_SPLIT.value, exp.data_dir)
  metrics.console(f"{exp.dataset}: {len(train_source):,} train / {len(eval_source):,} eval images")
  augment = images.Augment(flip=FLIP.value, crop_padding=CROP_PADDING.value)
  return exp.run(task=tasks.Classification(),
          train_data=images.train_batches(train_source, exp.config.batch_size, exp.config.seed, augment),
          eval_data=images.eval_batches(eval_source, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value))


def main(argv):
  del argv
  fit_classifier(bigjax_flags.experiment())


if __name__ == "__main__":
  bigjax_flags.run(main)
