"""Trains the MLP classifier: the image-classification experiment with --model=mlp by default.

python -m experiments.mlp --flagfile=experiments/configs/mlp_tiny.flags
"""

from absl import flags

from bigjax import flags as bigjax_flags
from experiments import cnn

if __name__ == "__main__":
  flags.FLAGS.set_default("model", "mlp")
  bigjax_flags.run(cnn.main)
