"""Trains a recurrent model: a language model (lstm-lm, gru-lm) on text, or a sequence classifier
(lstm-classifier, bilstm-classifier) on images read row by row.

  python -m experiments.rnn --flagfile=experiments/configs/lstm_lm_tiny.flags
  python -m experiments.rnn --flagfile=experiments/configs/lstm_digits_tiny.flags
"""

from bigjax import flags as bigjax_flags
from bigjax.nn import recurrent
from experiments import cnn
from experiments import transformer


def main(argv):
  del argv
  transformer.use_tokenizer_vocab()
  exp = bigjax_flags.experiment()
  if isinstance(exp.base_model, recurrent.RNNLM):
    transformer.fit_language_model(exp)
  else:
    cnn.fit_classifier(exp)


if __name__ == "__main__":
  bigjax_flags.run(main)
