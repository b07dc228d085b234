"""Hugging Face image classifiers (vit, resnet) in and out, against transformers itself: a tiny random
ViTForImageClassification and ResNetForImageClassification (basic and bottleneck layers), saved by
transformers, load into bigjax's ViT and ResNet with the same logits, onto a mesh too; their export
loads back into transformers with no missing or unexpected keys and the same logits; an image
classifier from the hub fine-tunes with experiments.cnn and exports back in both formats; what cannot be mapped is
one line naming it.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from bigjax import models
from bigjax import sharding
from bigjax import train
from bigjax.errors import UserError
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FAMILIES = {
    # A non-square image and 5 classes, so that height, width and the label count cannot be confused.
    "vit": lambda: transformers.ViTForImageClassification(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=[16, 24],
            patch_size=8,
            num_channels=3,
            num_labels=5,
        )
    ),
    # Three stages: the first without a shortcut, the later ones with strided projection shortcuts.
    "resnet_basic": lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 32],
            depths=[1, 2, 1],
            layer_type="basic",
            num_labels=4,
        )
    ),
    "resnet_bottleneck": lambda: transformers.ResNetForImageClassification(
        transformers.ResNetConfig(
            embedding_size=8,
            hidden_sizes=[32, 64],
            depths=[2, 1],
            layer_type="bottleneck",
            num_labels=3,
        )
    ),
}
# Hugging Face's ResNet takes any image size, bigjax's is fixed by the config (224 x 224 by default).
_RESNET_IMAGE = dict(input_shape=(32, 32, 3))


def _perturb(model):
  """Norm scales and biases, BatchNorm's running statistics: transformers initialises them to ones
  and zeros, where a misplaced one would not show in the logits."""
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.1 * torch.randn_like(param))
    for name, buffer in model.named_buffers():
      if name.endswith("running_mean"):
        buffer.copy_(0.1 * torch.randn_like(buffer))
      elif name.endswith("running_var"):
        buffer.copy_(1 + 0.5 * torch.rand_like(buffer))
  return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  made = {}
  for name, make in _FAMILIES.items():
    torch.manual_seed(0)
    model = _perturb(make())
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    made[name] = (str(directory), model)
  return made


def _overrides(name):
  return _RESNET_IMAGE if name.startswith("resnet") else {}


def _images(module, batch=2):
  return np.random.RandomState(0).randn(batch, *module.config.input_shape).astype(np.float32)


def _reference_logits(model, images_BHWC):
  with torch.no_grad():
    return model(torch.tensor(images_BHWC.transpose(0, 3, 1, 2))).logits.numpy()


def _relative_error(got, want) -> float:
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_imported_image_classifier_gives_transformers_logits(hf_dirs, name):
  directory, reference = hf_dirs[name]
  module, variables = models.load(directory, **_overrides(name))
  assert type(module).__name__ == ("ViT" if name == "vit" else "ResNet")
  assert set(variables) == ({"params"} if name == "vit" else {"params", "batch_stats"})
  images = _images(module)
  with jax.default_matmul_precision("highest"):
    logits = module.apply(variables, images)
  assert logits.shape == (2, reference.config.num_labels)
  assert _relative_error(logits, _reference_logits(reference, images)) < 1e-5


def test_the_vit_configs_image_patches_and_epsilon_come_from_config_json(hf_dirs):
  module, _ = models.load(hf_dirs["vit"][0])
  cfg = module.config
  assert (cfg.input_shape, cfg.patch_size, cfg.num_classes) == ((16, 24, 3), 8, 5)
  assert (cfg.layer_norm_epsilon, cfg.activation, cfg.pool) == (1e-12, "gelu_exact", "cls")


@pytest.mark.parametrize("name", sorted(_FAMILIES))
def test_exported_image_classifier_loads_into_transformers_with_the_same_logits(
    hf_dirs, tmp_path, name
):
  directory, reference = hf_dirs[name]
  module, variables = models.load(directory, **_overrides(name))
  out = models.save_hf(str(tmp_path / "out"), module, variables)
  reloaded, info = type(reference).from_pretrained(out, output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
  images = _images(module)
  np.testing.assert_array_equal(
      _reference_logits(reloaded.eval(), images), _reference_logits(reference, images)
  )
  # And the export is a directory bigjax loads as the same model.
  again, again_variables = models.load(out, **_overrides(name))
  assert again.config == module.config
  for got, want in zip(jax.tree.leaves(again_variables), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "name, overrides", [("vit", dict(scan_layers=True)), ("resnet_bottleneck", _RESNET_IMAGE)]
)
def test_image_classifier_loads_onto_a_mesh_in_its_shardings(hf_dirs, name, overrides):
  directory, reference = hf_dirs[name]
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  module, variables = models.load(directory, mesh=mesh, **overrides)
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.key(0), jnp.zeros((1, *module.config.input_shape)))
  )
  for got, want in zip(
      jax.tree.leaves(variables),
      jax.tree.leaves(sharding.logical_shardings(abstract, mesh)),
      strict=True,
  ):
    assert got.sharding == want
  images = _images(module, batch=8)
  with train.mesh_context(mesh), jax.default_matmul_precision("highest"):
    logits = jax.jit(module.apply)(variables, images)
  assert _relative_error(logits, _reference_logits(reference, images)) < 1e-5


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong.


def _copy(hf_dirs, name, tmp_path) -> str:
  target = tmp_path / name
  shutil.copytree(hf_dirs[name][0], target)
  return str(target)


def _edit_config(directory: str, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


@pytest.mark.parametrize(
    "name, changes, message",
    [
        (
            "resnet_basic",
            dict(hidden_sizes=[8, 24, 32]),
            r"hidden_sizes=\[8, 24, 32\] with embedding_size=8 is not "
            r"supported; bigjax's ResNet doubles the width every stage: "
            r"\[8, 16, 32\]",
        ),
        (
            "resnet_basic",
            dict(downsample_in_first_stage=True),
            "downsample_in_first_stage=true is not supported",
        ),
        (
            "resnet_bottleneck",
            dict(downsample_in_bottleneck=True),
            "downsample_in_bottleneck=true is not supported",
        ),
        (
            "resnet_basic",
            dict(layer_type="preactivation"),
            "layer_type='preactivation' is not supported",
        ),
        (
            "resnet_basic",
            dict(hidden_act="gelu"),
            "hidden_act='gelu' is not supported; bigjax's ResNet uses relu",
        ),
        ("vit", dict(qkv_bias=False), "qkv_bias=false is not supported"),
        (
            "vit",
            dict(patch_size=[8, 4]),
            r"patch_size=\[8, 4\] is not supported; bigjax's ViT has square patches",
        ),
        ("vit", dict(image_size=[16, 20]), "patch_size=8 must divide the image's height and width"),
        ("vit", dict(num_hidden_layers=None), "config.json: needs num_hidden_layers"),
    ],
)
def test_unsupported_image_config_is_refused(hf_dirs, tmp_path, name, changes, message):
  directory = _copy(hf_dirs, name, tmp_path)
  _edit_config(directory, **changes)
  with pytest.raises(UserError, match=message) as error:
    models.load(directory, **_overrides(name))
  assert "\n" not in str(error.value)


def test_missing_batch_statistics_are_named(hf_dirs, tmp_path):
  directory = _copy(hf_dirs, "resnet_basic", tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  del tensors["resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var"]
  safetensors.numpy.save_file(tensors, path)
  with pytest.raises(
      UserError,
      match="tensor 'resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var' "
      "is missing .* bigjax variable batch_stats/stage1_block0/downsample_bn/var",
  ):
    models.load(directory, **_RESNET_IMAGE)


# ----------------------------------------------------------------------------------------------
# The experiment: fine-tune a hub image classifier, then export it with the same flags.


def _cnn(workdir, data_dir, *flags):
  command = [
      sys.executable,
      "-m",
      "experiments.cnn",
      "--dataset=sklearn_digits",
      f"--data_dir={data_dir}",
      f"--workdir={workdir}",
      "--batch_size=16",
      "--eval_batches=2",
      "--log_every=1",
      *flags,
  ]
  env = cpu_env()
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_hub_resnet_fine_tunes_on_digits_and_exports_back_to_transformers(tmp_path, data_dir):
  torch.manual_seed(0)
  hub = _perturb(
      transformers.ResNetForImageClassification(
          transformers.ResNetConfig(
              num_channels=1,
              embedding_size=8,
              hidden_sizes=[8, 16],
              depths=[1, 1],
              layer_type="basic",
              num_labels=10,
          )
      )
  )
  hub.save_pretrained(tmp_path / "hub")
  run = [
      f"--init_from={tmp_path / 'hub'}",
      "--model_override=input_shape=(8, 8, 1)",
      "--num_steps=3",
      "--eval_every=3",
      "--learning_rate=0.01",
  ]
  trained = _cnn(tmp_path / "run", data_dir, *run)
  assert trained.returncode == 0, trained.stderr
  assert f"parameters from {tmp_path / 'hub'}" in trained.stdout
  # (--mode=eval on such a workdir: tests/test_hf_finetune.py.)
  for export_format in ("hf", "bigjax"):
    exported = _cnn(
        tmp_path / "run",
        data_dir,
        *run,
        "--mode=export",
        f"--export_format={export_format}",
        f"--export_dir={tmp_path / export_format}",
    )
    assert exported.returncode == 0, exported.stderr
  # The bigjax export names the full-config preset, which rebuilds the architecture without config.json.
  assert json.load(open(tmp_path / "bigjax" / "model.json"))["model"] == "resnet"
  module, variables = models.load(str(tmp_path / "bigjax"))
  reloaded, info = transformers.ResNetForImageClassification.from_pretrained(
      tmp_path / "hf", output_loading_info=True
  )
  assert not any(info.values()), info
  images = _images(module, batch=4)
  want = _reference_logits(reloaded.eval(), images)
  with jax.default_matmul_precision("highest"):
    assert _relative_error(module.apply(variables, images), want) < 1e-5
  # Training moved the weights and the running statistics away from the hub's.
  assert _relative_error(_reference_logits(hub, images), want) > 1e-3
  trained_mean = reloaded.resnet.embedder.embedder.normalization.running_mean
  assert not torch.allclose(trained_mean, hub.resnet.embedder.embedder.normalization.running_mean)
