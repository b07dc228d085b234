"""A plain multi-layer perceptron classifier."""

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.nn import conv


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """Flattened input, `hidden` ReLU layers with dropout, a softmax head."""

  num_classes: int
  input_shape: tuple[int, ...]  # height, width, channels: the input is checked as an image
  hidden: Sequence[int] = (256, 256)
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    checks.positive_int(self, "num_classes")
    checks.positive_ints(self, "input_shape", length=3, meaning="height, width, channels")
    checks.positive_ints(self, "hidden", meaning="widths of the hidden layers")
    checks.fraction(self, "dropout_rate")
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")


class MLP(nn.Module):
  config: MLPConfig

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    cfg = self.config
    conv.check_image_shape(inputs, cfg.input_shape)
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    x = inputs.reshape(inputs.shape[0], -1).astype(dtype)
    for i, width in enumerate(cfg.hidden):
      x = nn.Dense(
          width,
          dtype=dtype,
          param_dtype=param_dtype,
          name=f"dense{i}",
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.lecun_normal(), ("embed", "mlp")
          ),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
      )(x)
      x = nn.Dropout(cfg.dropout_rate)(nn.relu(x), deterministic=not train)
    return conv.classifier_head(x, cfg.num_classes, param_dtype)
