"""Trains a Transformer language model.

  python -m experiments.transformer --flagfile=experiments/configs/transformer_tiny.flags
"""

from absl import flags

from bigjax import flags as bigjax_flags
from bigjax import metrics
from bigjax import tasks
from bigjax.data import lm

SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per training window.", lower_bound=1)


def main(argv):
  del argv
  exp = bigjax_flags.experiment()
  train_windows = lm.open_windows(exp.dataset, "train", SEQ_LEN.value, exp.data_dir)
  eval_windows = lm.open_windows(exp.dataset, "validation", SEQ_LEN.value, exp.data_dir)
  metrics.console(f"{exp.dataset}: {len(train_windows.stream):,} train / {len(eval_windows.stream):,} "
                  "validation tokens")
  exp.fit(task=tasks.LanguageModelling(bytes_per_token=1.0),
          train_data=lm.train_batches(train_windows, exp.config.batch_size, exp.config.seed),
          eval_data=lm.eval_batches(eval_windows, exp.config.batch_size, bigjax_flags.EVAL_BATCHES.value))


if __name__ == "__main__":
  bigjax_flags.run(main)
