"""Convolutional image classifiers: a configurable conv block, the classic CNN, and ResNet v1.5.

Images are [B, H, W, C] (NHWC). Models take `train` (batch statistics vs running averages, dropout)
and return float32 logits [B, num_classes]. Batch-norm running averages live in the `batch_stats`
collection, which the train loop carries beside the parameters.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax.numpy as jnp

from bigjax import config_checks as checks
from bigjax.errors import UserError
from bigjax.ops import convolution as ops

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
NORMS = ("batch", "layer", "none")
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # He init, as torchvision


def check_image_shape(images, expected: tuple[int, int, int]) -> None:
  """One clear error instead of a shape failure deep inside a convolution."""
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(expected):
    raise UserError(
        f"images have shape {tuple(images.shape)} but the model expects [batch, "
        f"{', '.join(map(str, expected))}] (height, width, channels); set the model's input_shape "
        f"(--model_override='input_shape={tuple(images.shape[1:])}') or resize the data"
    )


def _checked_input(images_BHWC, cfg):
  """The images in the compute dtype, batch-sharded, after checking their shape; and the dtypes."""
  check_image_shape(images_BHWC, cfg.input_shape)
  dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
  return (
      nn.with_logical_constraint(images_BHWC.astype(dtype), ("batch", None, None, None)),
      dtype,
      param_dtype,
  )


def _norm(kind: str, train: bool, dtype, param_dtype, name: str, zero_scale: bool = False):
  if kind == "batch":
    # Momentum 0.9 and epsilon 1e-5 as torchvision's BatchNorm2d.
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
    )
  if kind == "layer":
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
    )
  if kind == "none":
    return lambda x: x
  raise UserError(f"unknown norm {kind!r}; use batch, layer or none")


class Conv(nn.Module):
  """A 2-D convolution with nn.Conv's parameters ("kernel" [kh, kw, in, out], "bias" [out]), so
  presets and checkpoints do not depend on which implementation `impl` picks
  (bigjax.ops.convolution.implementation)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  use_bias: bool = True
  impl: ops.ConvImpl = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = _conv_init
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x_BHWC):
    kernel_HWIO = self.param(
        "kernel",
        self.kernel_init,
        (*self.kernel_size, x_BHWC.shape[-1], self.features),
        self.param_dtype,
    )
    bias_O = (
        self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        if self.use_bias
        else None
    )
    x_BHWC, kernel_HWIO, bias_O = nn.dtypes.promote_dtype(
        x_BHWC, kernel_HWIO, bias_O, dtype=self.dtype
    )
    y_BHWO = ops.convolution(x_BHWC, kernel_HWIO, self.strides, self.padding, self.impl)
    return y_BHWO if bias_O is None else y_BHWO + bias_O


def conv(
    features: int,
    kernel: int,
    strides: int = 1,
    *,
    use_bias: bool,
    dtype,
    param_dtype,
    name: str,
    kernel_init=_conv_init,
    impl: ops.ConvImpl = "auto",
) -> Conv:
  """A k x k convolution with 'SAME'-style symmetric padding (k // 2) and logically named kernel axes."""
  return Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((kernel // 2,) * 2,) * 2,
      use_bias=use_bias,
      impl=impl,
      dtype=dtype,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
  )


class ConvBlock(nn.Module):
  """Convolution, then normalisation, activation and pooling, each choosable."""

  features: int
  kernel: int = 3
  strides: int = 1
  norm: Literal["batch", "layer", "none"] = "batch"
  activation: str = "relu"
  pool: Literal["max", "avg", "none"] = "none"
  pool_size: int = 2
  conv_impl: ops.ConvImpl = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, *, train: bool = False):
    x_BHWC = conv(
        self.features,
        self.kernel,
        self.strides,
        use_bias=self.norm == "none",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="conv",
        impl=self.conv_impl,
    )(x_BHWC)
    x_BHWC = _norm(self.norm, train, self.dtype, self.param_dtype, "norm")(x_BHWC)
    x_BHWC = _ACTIVATIONS[self.activation](x_BHWC)
    window = (self.pool_size, self.pool_size)
    if self.pool == "max":
      x_BHWC = nn.max_pool(x_BHWC, window, strides=window)
    elif self.pool == "avg":
      x_BHWC = nn.avg_pool(x_BHWC, window, strides=window)
    return x_BHWC


def classifier_head(x_BD, num_classes: int, param_dtype, name: str = "head"):
  """Dense to float32 logits."""
  return nn.Dense(
      num_classes,
      dtype=jnp.float32,
      param_dtype=param_dtype,
      name=name,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "classes")
      ),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)),
  )(x_BD)


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """The classic CNN: `len(features)` stages of `convs_per_stage` conv blocks and a 2x2 max pool,
  flatten, dense layers with dropout, and a softmax head."""

  num_classes: int
  input_shape: tuple[int, int, int]  # height, width, channels
  features: Sequence[int] = (32, 64)
  convs_per_stage: int = 2
  kernel: int = 3
  norm: str = "batch"
  activation: str = "relu"
  dense: Sequence[int] = (128,)
  dropout_rate: float = 0.0
  # See ops.convolution.implementation; parameters are the same for every choice
  conv_impl: ops.ConvImpl = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    checks.positive_int(self, "num_classes")
    checks.positive_ints(self, "input_shape", length=3, meaning="height, width, channels")
    checks.positive_ints(self, "features", nonempty=True, meaning="channels of each stage")
    checks.positive_int(self, "convs_per_stage")
    checks.positive_int(self, "kernel")
    checks.one_of(self, "norm", NORMS)
    checks.one_of(self, "activation", _ACTIVATIONS)
    checks.positive_ints(self, "dense", meaning="widths of the dense layers")
    checks.fraction(self, "dropout_rate")
    checks.one_of(self, "conv_impl", ops.CONV_IMPLS)
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")
    height, width = (self.feature_map_size(n) for n in self.input_shape[:2])
    if height < 1 or width < 1:
      # A 0x0 map flattens to nothing: the dense layers' initialisers would divide by zero.
      in_height, in_width = self.input_shape[:2]
      checks.fail(
          self,
          f"features={tuple(self.features)} shrink the {in_height}x{in_width} input to "
          f"{height}x{width} (each of the {len(self.features)} stages halves it); "
          f"use fewer stages or a larger input_shape",
      )

  def feature_map_size(self, size: int) -> int:
    """Height or width after the conv stages: each conv pads k // 2 on both sides (keeping odd
    kernels' size), each stage ends in a 2x2 max pool with stride 2."""
    pad = self.kernel // 2
    for _ in self.features:
      for _ in range(self.convs_per_stage):
        size = ops.conv_output_size(size, self.kernel, 1, (pad, pad))
      size //= 2
    return size


class CNN(nn.Module):
  config: CNNConfig

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool = False):
    cfg = self.config
    x, dtype, param_dtype = _checked_input(images_BHWC, cfg)
    for stage, features in enumerate(cfg.features):
      for i in range(cfg.convs_per_stage):
        last = i == cfg.convs_per_stage - 1
        x = ConvBlock(
            features,
            cfg.kernel,
            norm=cfg.norm,
            activation=cfg.activation,
            pool="max" if last else "none",
            conv_impl=cfg.conv_impl,
            dtype=dtype,
            param_dtype=param_dtype,
            name=f"stage{stage}_conv{i}",
        )(x, train=train)
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(cfg.dense):
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
      x = nn.Dropout(cfg.dropout_rate)(_ACTIVATIONS[cfg.activation](x), deterministic=not train)
    return classifier_head(x, cfg.num_classes, param_dtype)


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """ResNet v1.5 (He et al. 2016; the stride-2 sits in the 3x3 conv of a bottleneck, as torchvision).

  `stem="imagenet"` is the 7x7/2 conv and 3x3/2 max pool of the paper; `stem="small"` is one 3x3/1
  conv without pooling, for 32x32 (CIFAR) or smaller images.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  block: Literal["basic", "bottleneck"]
  input_shape: tuple[int, int, int] = (224, 224, 3)
  width: int = 64
  stem: Literal["imagenet", "small"] = "imagenet"
  zero_init_residual: bool = False  # last BN scale of each block at zero (Goyal et al. 2017)
  # See ops.convolution.implementation; parameters are the same for every choice
  conv_impl: ops.ConvImpl = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    checks.positive_int(self, "num_classes")
    checks.positive_ints(self, "stage_sizes", nonempty=True, meaning="residual blocks per stage")
    checks.one_of(self, "block", ("basic", "bottleneck"))
    checks.positive_ints(self, "input_shape", length=3, meaning="height, width, channels")
    checks.positive_int(self, "width")
    checks.one_of(self, "stem", ("imagenet", "small"))
    checks.boolean(self, "zero_init_residual")
    checks.one_of(self, "conv_impl", ops.CONV_IMPLS)
    checks.float_dtype(self, "dtype")
    checks.float_dtype(self, "param_dtype")


class ResidualBlock(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block."""

  features: int
  strides: int
  bottleneck: bool
  zero_init_residual: bool = False
  conv_impl: ops.ConvImpl = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC, *, train: bool = False):
    make_conv = functools.partial(
        conv, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, impl=self.conv_impl
    )
    norm = functools.partial(_norm, "batch", train, self.dtype, self.param_dtype)
    if self.bottleneck:
      out_features = self.features * 4
      y = nn.relu(norm("bn1")(make_conv(self.features, 1, name="conv1")(x_BHWC)))
      y = nn.relu(norm("bn2")(make_conv(self.features, 3, self.strides, name="conv2")(y)))
      y = make_conv(out_features, 1, name="conv3")(y)
      last_norm = "bn3"
    else:
      out_features = self.features
      y = nn.relu(norm("bn1")(make_conv(self.features, 3, self.strides, name="conv1")(x_BHWC)))
      y = make_conv(self.features, 3, name="conv2")(y)
      last_norm = "bn2"
    y = norm(last_norm, zero_scale=self.zero_init_residual)(y)
    shortcut = x_BHWC
    if self.strides != 1 or x_BHWC.shape[-1] != out_features:
      shortcut = norm("downsample_bn")(
          make_conv(out_features, 1, self.strides, name="downsample")(x_BHWC)
      )
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  config: ResNetConfig

  @nn.compact
  def __call__(self, images_BHWC, *, train: bool = False):
    cfg = self.config
    x, dtype, param_dtype = _checked_input(images_BHWC, cfg)
    if cfg.stem == "imagenet":
      x = conv(
          cfg.width,
          7,
          2,
          use_bias=False,
          dtype=dtype,
          param_dtype=param_dtype,
          name="stem_conv",
          impl=cfg.conv_impl,
      )(x)
      x = nn.relu(_norm("batch", train, dtype, param_dtype, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(
          cfg.width,
          3,
          1,
          use_bias=False,
          dtype=dtype,
          param_dtype=param_dtype,
          name="stem_conv",
          impl=cfg.conv_impl,
      )(x)
      x = nn.relu(_norm("batch", train, dtype, param_dtype, "stem_bn")(x))
    for stage, num_blocks in enumerate(cfg.stage_sizes):
      for i in range(num_blocks):
        x = ResidualBlock(
            cfg.width * 2**stage,
            strides=2 if stage > 0 and i == 0 else 1,
            bottleneck=cfg.block == "bottleneck",
            zero_init_residual=cfg.zero_init_residual,
            conv_impl=cfg.conv_impl,
            dtype=dtype,
            param_dtype=param_dtype,
            name=f"stage{stage}_block{i}",
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return classifier_head(x, cfg.num_classes, param_dtype, name="fc")
