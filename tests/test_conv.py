"""Convolutions and the CNN, ResNet and ViT models: bigjax.ops.convolution's matmul form against XLA's
convolution (values and gradients), the implementation picked per shape, and the models' outputs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import models
from bigjax import tasks
from bigjax.errors import UserError
from bigjax.nn import conv
from bigjax.nn import mlp
from bigjax.nn import transformer
from bigjax.ops import convolution as conv_ops
from tests.test_sharding import run_steps

# Published parameter counts (torchvision resnets, timm ViTs at 224x224, 1000 classes).
PUBLISHED = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vit-ti16": 5_717_416,
    "vit-s16": 22_050_664,
    "vit-b16": 86_567_656,
}


def _naive_conv(x, kernel, bias, stride, pad):
  """Cross-correlation by explicit loops over output pixels, as every framework defines convolution."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  batch, height, width, _ = x.shape
  k = kernel.shape[0]
  out_h, out_w = (height - k) // stride + 1, (width - k) // stride + 1
  out = np.zeros((batch, out_h, out_w, kernel.shape[-1]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
      out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, kernel) + bias
  return out


@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (1, 2), (7, 2)])
def test_conv_matches_naive_reference(kernel, stride):
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, 9, 9, 3)), np.float64)
  layer = conv.conv(
      5, kernel, stride, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, name="c"
  )
  variables = nn.unbox(layer.init(jax.random.key(1), jnp.asarray(x, jnp.float32)))
  params = jax.tree.map(lambda p: p + 0.1, variables["params"])
  got = layer.apply({"params": params}, jnp.asarray(x, jnp.float32))
  want = _naive_conv(
      x, np.asarray(params["kernel"]), np.asarray(params["bias"]), stride, kernel // 2
  )
  np.testing.assert_allclose(got, want, atol=1e-4)


def _lax_conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      [(pad, pad)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
  )


def _value_and_vjp(conv_fn, x, w, cotangent):
  y, vjp = jax.vjp(conv_fn, x, w)
  return y, vjp(cotangent)


# Maps of size 1-3 make some kernel taps read only padding, which conv_as_matmul leaves out.
@pytest.mark.parametrize(
    "kernel,stride,size,pad",
    [
        (1, 1, 8, 0),
        (1, 2, 9, 0),
        (3, 1, 8, 1),
        (3, 2, 8, 1),
        (3, 2, 9, 1),
        (7, 2, 10, 3),
        (3, 1, 1, 1),
        (3, 2, 2, 1),
        (3, 1, 2, 1),
        (7, 2, 3, 3),
    ],
)
def test_matmul_conv_matches_lax_conv_in_value_and_gradient(kernel, stride, size, pad):
  kx, kk, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, size, size, 3))
  w = jax.random.normal(kk, (kernel, kernel, 3, 4))
  cotangent = jax.random.normal(kc, _lax_conv(x, w, stride, pad).shape)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(_value_and_vjp, static_argnums=0)(
        lambda a, b: conv_ops.matmul_convolution(a, b, (stride, stride), [(pad, pad)] * 2),
        x,
        w,
        cotangent,
    )
    want = jax.jit(_value_and_vjp, static_argnums=0)(
        lambda a, b: _lax_conv(a, b, stride, pad), x, w, cotangent
    )
  np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-5)
  for g, h in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, h, atol=1e-3, rtol=1e-5)


def _im2col_every_tap(x, kernel, strides, padding):
  """Reference: the matmul convolution without leaving any tap out."""
  kh, kw, cin, cout = kernel.shape
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // strides[0] + 1, (x.shape[2] - kw) // strides[1] + 1
  taps = [
      x[
          :,
          i : i + strides[0] * (out_h - 1) + 1 : strides[0],
          j : j + strides[1] * (out_w - 1) + 1 : strides[1],
      ]
      for i in range(kh)
      for j in range(kw)
  ]
  return jnp.concatenate(taps, axis=-1) @ kernel.reshape(-1, cout)


# Taps left out at the edges of non-square maps, with asymmetric padding and per-axis strides;
# live taps with gaps between them (a stride wider than the input); no live tap at all.
@pytest.mark.parametrize(
    "kernel,strides,shape,padding",
    [
        ((3, 3), (1, 2), (1, 2), ((0, 2), (1, 1))),
        ((5, 3), (3, 3), (2, 5), ((3, 1), (0, 3))),
        ((3, 3), (2, 2), (1, 1), ((2, 2), (2, 2))),
        ((5, 5), (3, 2), (2, 1), ((4, 4), (1, 3))),
        ((1, 1), (2, 2), (1, 1), ((1, 1), (1, 1))),
    ],
)
def test_matmul_conv_leaves_out_only_taps_that_read_padding(kernel, strides, shape, padding):
  kx, kk, kc = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (2, *shape, 3))
  w = jax.random.normal(kk, (*kernel, 3, 4))
  with jax.default_matmul_precision("highest"):
    want_value = jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    cotangent = jax.random.normal(kc, want_value.shape)
    got = jax.jit(_value_and_vjp, static_argnums=0)(
        lambda a, b: conv_ops.matmul_convolution(a, b, strides, padding), x, w, cotangent
    )
    want = jax.jit(_value_and_vjp, static_argnums=0)(
        lambda a, b: _im2col_every_tap(a, b, strides, padding), x, w, cotangent
    )
  np.testing.assert_allclose(got[0], want_value, atol=1e-4, rtol=1e-5)
  for g, h in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, h, atol=1e-4, rtol=1e-5)


def test_conv_impls_share_parameters_and_honour_dtypes():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  outputs, trees = [], []
  for impl in ("matmul", "xla"):
    layer = conv.conv(
        4, 3, 2, use_bias=True, dtype=jnp.bfloat16, param_dtype=jnp.float32, name="c", impl=impl
    )
    variables = layer.init(jax.random.key(1), x)
    trees.append(
        jax.tree.map(
            lambda p: (p.value.shape, p.value.dtype, p.names),
            variables["params"],
            is_leaf=lambda p: isinstance(p, nn.Partitioned),
        )
    )
    outputs.append(layer.apply(variables, x))
  assert (
      trees[0]
      == trees[1]
      == {
          "kernel": ((3, 3, 3, 4), jnp.float32, (None, None, "conv_in", "conv_out")),
          "bias": ((4,), jnp.float32, ("conv_out",)),
      }
  )
  assert outputs[0].dtype == outputs[1].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(outputs[0], np.float32), np.asarray(outputs[1], np.float32), atol=0.1
  )


def test_resnet_is_the_same_function_with_either_conv_impl():
  tiny = dict(input_shape=(16, 16, 3), num_classes=10, width=8, stage_sizes=(1, 1))
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  matmul, xla = (models.create("resnet18", conv_impl=impl, **tiny) for impl in ("matmul", "xla"))
  variables = jax.jit(matmul.init)(jax.random.key(1), images)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(xla.init, jax.random.key(1), images)
  )
  with jax.default_matmul_precision("highest"):
    got, want = (jax.jit(m.apply)(variables, images) for m in (matmul, xla))
  np.testing.assert_allclose(got, want, atol=1e-4)
  with pytest.raises(UserError, match="unknown conv_impl 'fft'"):
    models.create("resnet18", conv_impl="fft")


def test_auto_conv_impl_is_xla_on_accelerators_and_chosen_per_map_size_on_cpu():
  def choose(in_hw, kernel_hw, strides, out_hw, impl="auto"):
    return conv_ops.implementation(impl, in_hw, kernel_hw, strides, out_hw)

  assert choose((2, 2), (3, 3), (1, 1), (2, 2), impl="xla") == "xla"
  assert choose((8, 8), (3, 3), (1, 1), (8, 8), impl="matmul") == "matmul"
  if jax.default_backend() != "cpu":
    assert choose((2, 2), (3, 3), (1, 1), (2, 2)) == "xla"
    return
  assert choose((8, 8), (3, 3), (1, 1), (8, 8)) == "xla"
  assert choose((8, 8), (3, 3), (2, 2), (4, 4)) == "xla"  # 16 output positions
  assert choose((4, 4), (3, 3), (2, 2), (2, 2)) == "matmul"
  assert choose((4, 4), (5, 5), (1, 1), (4, 4)) == "matmul"  # the kernel is larger than the map
  assert choose((224, 224), (16, 16), (16, 16), (14, 14)) == "matmul"  # non-overlapping patches
  # ResNet-18 at 32 x 32: the stem (16 x 16 out) and stages 1-2 (8 x 8, 4 x 4) on XLA's convolution,
  # stages 3-4 (2 x 2, 1 x 1) as matmuls: 1 + 4 + 5 of the 20 convolutions.
  model = models.create("resnet18", input_shape=(32, 32, 3), num_classes=10)
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert str(jax.make_jaxpr(model.apply)(variables, images)).count("conv_general_dilated[") == 10


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_architectures_have_the_published_parameter_counts(name):
  model = models.create(name)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert sum(x.size for x in jax.tree.leaves(nn.unbox(abstract)["params"])) == PUBLISHED[name]


TINY = {
    "mlp": {},
    "cnn-small": {},
    "resnet18": dict(input_shape=(16, 16, 3), num_classes=10, width=8, stem="small"),
    "resnet50": dict(input_shape=(32, 32, 3), num_classes=10, width=8),
    "vit-ti16": dict(input_shape=(16, 16, 3), num_classes=10, patch_size=4, num_layers=2),
    "vit-s16": dict(
        input_shape=(16, 16, 3),
        num_classes=10,
        patch_size=8,
        num_layers=1,
        pool="mean",
        position="sinusoidal_2d",
    ),
    "vit-b16": dict(
        input_shape=(16, 16, 3),
        num_classes=10,
        patch_size=8,
        num_layers=1,
        embed_dim=32,
        num_heads=2,
        mlp_dim=64,
    ),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_image_preset_runs_at_tiny_size(name):
  model = models.create(name, **TINY[name])
  images = jax.random.normal(jax.random.key(0), (2, *model.config.input_shape))
  # Jitted, with RBG keys: XLA compiles ResNet-50's ~50 threefry initialisers in ~15 s on a CPU,
  # and running the layers op by op costs as much again (suite time, issue 27).
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1, impl="rbg"), images
  )
  logits = jax.jit(functools.partial(model.apply, train=False))(variables, images)
  assert logits.shape == (2, model.config.num_classes) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_every_image_preset_is_listed():
  image_classes = (conv.CNN, conv.ResNet, mlp.MLP, transformer.ViT)
  # The full-config presets assume no sizes, so they build only from a full config (tests/test_bad_values.py).
  image_presets = {
      n
      for n in models.names()
      if n not in models.FULL_CONFIG_PRESETS and isinstance(models.create(n), image_classes)
  }
  # ResNet-34/101/152 differ from 18/50 only in stage sizes, which the parameter counts check.
  assert image_presets == set(TINY) | {"resnet34", "resnet101", "resnet152"}


def _digits_batch(batch_size=8):
  images = jax.random.normal(jax.random.key(3), (batch_size, 8, 8, 1))
  return {"image": np.asarray(images), "label": np.arange(batch_size, dtype=np.int32) % 10}


def test_batch_norm_statistics_change_in_training_and_are_used_at_eval():
  _, state = run_steps(
      "data:1,fsdp:1,tensor:1",
      jax.devices()[:1],
      num_steps=2,
      model=models.create("cnn-small"),
      task=tasks.Classification(),
      batch=_digits_batch(),
  )
  model = models.create("cnn-small")
  fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))["batch_stats"]
  for a, b in zip(
      jax.tree.leaves(fresh), jax.tree.leaves(state.model_state["batch_stats"]), strict=True
  ):
    assert not np.allclose(a, b)
  # Eval uses the running averages: an image's logits do not depend on the rest of its batch.
  variables = {"params": state.params, **state.model_state}
  images = _digits_batch()["image"]
  alone = model.apply(variables, images[:1], train=False)
  together = model.apply(variables, images, train=False)[:1]
  np.testing.assert_allclose(alone, together, atol=1e-5)
  sums, new_state = tasks.Classification().loss_sums(model, variables, _digits_batch(), train=False)
  assert new_state == {}


@pytest.mark.parametrize("name", ["cnn-small", "mlp", "resnet18", "vit-ti16"])
def test_wrong_image_shape_names_the_expected_shape(name):
  model = models.create(name)
  expected = ", ".join(map(str, model.config.input_shape))
  with pytest.raises(
      UserError,
      match=rf"images have shape \(1, 28, 28, 3\) but the model expects \[batch, {expected}\]",
  ):
    model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
