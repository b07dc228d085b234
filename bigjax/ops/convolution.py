"""Convolution, the kernel layer: one public `convolution` (2-D cross-correlation, NHWC input,
HWIO kernel) that picks its implementation per convolution and platform, the implementations, and
the reference they are held to by the tests (values and gradients): XLA's own convolution.

  xla     jax.lax.conv_general_dilated: cuDNN on GPU, the MXU on TPU, XLA's CPU kernel.
  matmul  the taps as strided slices, concatenated and contracted in one matmul (CPU, where
          XLA's kernel is slow: see `implementation`).
"""

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from bigjax.errors import UserError


def convolution(
    x_BHWC,
    kernel_HWIO,
    strides: tuple[int, int],
    padding: Sequence[tuple[int, int]],
    impl: str = "auto",
):
  """x * kernel (cross-correlation) with `strides` and explicit `padding` ((top, bottom), (left,
  right)), by `impl` ("auto": what `implementation` picks for these shapes on this platform)."""
  strides, padding = tuple(strides), [tuple(p) for p in padding]
  in_hw, kernel_hw = x_BHWC.shape[1:3], kernel_HWIO.shape[:2]
  out_hw = tuple(
      conv_output_size(n, k, s, p) for n, k, s, p in zip(in_hw, kernel_hw, strides, padding)
  )
  chosen = implementation(impl, in_hw, kernel_hw, strides, out_hw)
  return (matmul_convolution if chosen == "matmul" else reference)(
      x_BHWC, kernel_HWIO, strides, padding
  )


ConvImpl = Literal["auto", "xla", "matmul"]
CONV_IMPLS = ("auto", "xla", "matmul")


def _check_conv_impl(impl: str) -> None:
  if impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {impl!r}: use one of {', '.join(CONV_IMPLS)}")


def implementation(
    impl: str,
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    out_hw: tuple[int, int],
) -> str:
  """'auto' is XLA's convolution (cuDNN, the TPU's MXU) on GPU and TPU. On CPU it is chosen per
  convolution (benchmarks/README.md, "Convolution on CPU"): XLA's own ran forward + backward
  1.2-4.5x faster than the matmul form where its kernel fits the map, but 6-16x slower (one pass
  up to 26x) where the kernel is larger than the input map or the output has fewer than 16
  positions (ResNet's last stages at 32 x 32 input), where the matmul form also leaves out the taps
  that read only padding; and for non-overlapping patches (stride = kernel, ViT's patch
  embedding) the matmul form is a plain reshape and matmul, 1.4x faster."""
  _check_conv_impl(impl)
  if impl != "auto":
    return impl
  if jax.default_backend() != "cpu":
    return "xla"
  kernel_fits = all(k <= n for k, n in zip(kernel_hw, in_hw))
  patches = tuple(strides) == tuple(kernel_hw)
  return "xla" if kernel_fits and not patches and out_hw[0] * out_hw[1] >= 16 else "matmul"


def conv_output_size(in_size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  return (in_size + pad[0] + pad[1] - kernel) // stride + 1


def _reads_real_input(tap: int, stride: int, out_size: int, pad_before: int, in_size: int) -> bool:
  """Whether a kernel tap, slid over every output position, reads at least one unpadded element."""
  return any(pad_before <= tap + stride * k < pad_before + in_size for k in range(out_size))


def matmul_convolution(
    x_BHWC, kernel_HWIO, strides: tuple[int, int], padding: Sequence[tuple[int, int]]
):
  """Cross-correlation as one matmul: each of the kh x kw kernel taps is a strided slice of the
  padded input, the slices are concatenated on the channel axis (tap-major, as the kernel's
  [kh, kw, in] flattens) and contracted with the flattened kernel. Same result as
  lax.conv_general_dilated with NHWC/HWIO layouts, no dilation and one feature group.

  Taps that read only padding at every output position contribute exact zeros, so they are left
  out of the matmul (their kernel gradient is zero either way). On small feature maps that is most
  of the work: a 3 x 3 convolution of a 1 x 1 map (ResNet's last stage at 32 x 32 input) keeps 1
  tap of 9."""
  kh, kw, cin, cout = kernel_HWIO.shape
  if x_BHWC.shape[-1] != cin:
    raise UserError(
        f"convolution input has {x_BHWC.shape[-1]} channels but the kernel expects {cin}"
    )
  sh, sw = strides
  (pad_top, pad_bottom), (pad_left, pad_right) = (tuple(p) for p in padding)
  batch, in_h, in_w, _ = x_BHWC.shape
  out_h = conv_output_size(in_h, kh, sh, (pad_top, pad_bottom))
  out_w = conv_output_size(in_w, kw, sw, (pad_left, pad_right))
  rows = [i for i in range(kh) if _reads_real_input(i, sh, out_h, pad_top, in_h)]
  cols = [j for j in range(kw) if _reads_real_input(j, sw, out_w, pad_left, in_w)]
  if not rows or not cols:  # padding wider than the kernel's reach: every output is zero
    return jnp.zeros((batch, out_h, out_w, cout), jnp.result_type(x_BHWC, kernel_HWIO))
  x_BHWC = jnp.pad(x_BHWC, ((0, 0), (pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
  taps = [
      jax.lax.slice(
          x_BHWC,
          (0, i, j, 0),
          (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, cin),
          (1, sh, sw, 1),
      )
      for i in rows
      for j in cols
  ]
  patches_BHWP = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  if (
      len(rows) < kh or len(cols) < kw
  ):  # not always contiguous: a stride wider than the input leaves gaps
    kernel_HWIO = kernel_HWIO[np.ix_(rows, cols)]
  return jnp.einsum("bhwp,po->bhwo", patches_BHWP, kernel_HWIO.reshape(-1, cout))


def reference(x_BHWC, kernel_HWIO, strides: tuple[int, int], padding: Sequence[tuple[int, int]]):
  """XLA's convolution: the reference, and the implementation everywhere but where `implementation`
  picks the matmul form."""
  return jax.lax.conv_general_dilated(
      x_BHWC,
      kernel_HWIO,
      strides,
      [tuple(p) for p in padding],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
