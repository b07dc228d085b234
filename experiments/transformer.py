"""Trains a Transformer language model.

  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags
"""

from absl import flags

from bigjax import data
from bigjax import flags as bigjax_flags
from bigjax import metrics
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.data import lm

SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per training window.", lower_bound=1)


def main(argv):
  del argv
  bigjax_flags.require(bigjax_flags.MODEL, bigjax_flags.DATASET, bigjax_flags.WORKDIR)
  bigjax_flags.log_devices()
  model = models.create(bigjax_flags.MODEL.value, **bigjax_flags.model_overrides())
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  config = bigjax_flags.train_config()
  optim_config = bigjax_flags.optim_config()
  dataset, data_dir = bigjax_flags.DATASET.value, bigjax_flags.DATA_DIR.value
  train_windows = lm.open_windows(dataset, "train", SEQ_LEN.value, data_dir)
  eval_windows = lm.open_windows(dataset, "validation", SEQ_LEN.value, data_dir)
  metrics.console(f"{dataset}: {len(train_windows.stream):,} train / {len(eval_windows.stream):,} "
                  "validation tokens")
  train.fit(
      model=model, task=tasks.LanguageModelling(bytes_per_token=1.0),
      tx=optim.make_optimizer(optim_config, config.num_steps),
      learning_rate=optim.make_schedule(optim_config, config.num_steps),
      train_data=lm.train_batches(train_windows, config.batch_size, config.seed),
      eval_data=lm.eval_batches(eval_windows, config.batch_size, bigjax_flags.EVAL_BATCHES.value),
      config=config, mesh=mesh)


if __name__ == "__main__":
  bigjax_flags.run(main)
