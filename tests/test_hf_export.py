"""Hugging Face checkpoints out, against transformers itself: a model exported by bigjax loads with
transformers' from_pretrained with no missing, unexpected or misshapen tensor and gives the same
logits, for every family the importer reads; what transformers cannot express is a one-line error.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

from bigjax import checkpoint
from bigjax import models
from bigjax import sharding
from bigjax.errors import UserError
from bigjax.interop import hf
from bigjax.nn import transformer
from tests.test_cli import TINY_FLAGS
from tests.test_cli import _assert_one_line_error
from tests.test_cli import _run_experiment
from tests.test_hf_interop import _FAMILIES
from tests.test_hf_interop import _TOKENS_BT
from tests.test_hf_interop import _reference_logits
from tests.test_hf_interop import _relative_error
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXPORTED_FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")  # llama with Llama 3's rotary scaling


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """model_type -> (directory, transformers model), made and saved by transformers; norm scales and
  biases (ones and zeros at init) perturbed so that a misplaced one shows in the logits."""
  made = {}
  for model_type in _EXPORTED_FAMILIES:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _FAMILIES[model_type](), dtype=torch.float32
    ).eval()
    with torch.no_grad():
      for param in model.parameters():
        if param.ndim == 1:
          param.add_(0.1 * torch.randn_like(param))
    directory = tmp_path_factory.mktemp(model_type)
    model.save_pretrained(directory)
    made[model_type] = (str(directory), model)
  return made


def _from_pretrained(directory: str):
  """transformers' model of `directory`, after checking that every tensor found its place."""
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, output_loading_info=True
  )
  for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info[key], (key, info[key])
  return model.eval()


@pytest.mark.parametrize("model_type", _EXPORTED_FAMILIES)
def test_export_of_an_imported_model_loads_into_transformers_with_its_logits(
    hf_dirs, tmp_path, model_type
):
  directory, reference = hf_dirs[model_type]
  module, variables = models.load(directory)
  out = models.save_hf(str(tmp_path / "out"), module, variables)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == model_type and written["architectures"] == [
      hf.ARCHITECTURES[model_type]
  ]
  exported = _from_pretrained(out)
  assert type(exported) is type(reference)
  want = _reference_logits(reference, _TOKENS_BT)
  assert _relative_error(_reference_logits(exported, _TOKENS_BT), want) < 1e-5


def _random_variables(module):
  """Random parameters drawn on the host (compiling init would dominate these tests); vectors (norm
  scales, biases) around one, so that a misplaced one shows in the logits."""
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))[
      "params"
  ]
  rng = np.random.RandomState(0)
  draw = lambda x: (1.0 if len(x.shape) == 1 else 0.0) + 0.1 * rng.standard_normal(x.shape).astype(
      x.dtype
  )
  return {"params": jax.tree.map(draw, abstract)}


_TINY = dict(num_layers=2, embed_dim=32, mlp_dim=64, max_len=32, vocab_size=128)


@pytest.mark.parametrize(
    "name, overrides, model_type",
    [
        (
            "llama-tiny",
            dict(
                tie_embeddings=False,
                rope_scaling="llama3",
                rope_original_max_len=16,
                rope_scaling_factor=4.0,
            ),
            "llama",
        ),
        ("transformer-tiny", {}, "gpt2"),
        ("llama-tiny", dict(qkv_bias=True), "qwen2"),
        ("llama-tiny", dict(qk_norm=True, head_dim=16), "qwen3"),
    ],
)
def test_bigjax_model_exports_with_its_logits(tmp_path, name, overrides, model_type):
  module = models.create(name, **_TINY, **overrides)
  variables = _random_variables(module)
  out = models.save_hf(str(tmp_path / "out"), module, variables)
  exported = _from_pretrained(out)
  assert exported.config.model_type == model_type
  with jax.default_matmul_precision("highest"):
    want = np.asarray(jax.jit(module.apply)(variables, _TOKENS_BT[:, :8]))
  assert _relative_error(_reference_logits(exported, _TOKENS_BT[:, :8]), want) < 1e-5


def _files(directory: str) -> dict[str, bytes]:
  return {
      name: open(os.path.join(directory, name), "rb").read()
      for name in sorted(os.listdir(directory))
  }


def test_scanned_sharded_model_exports_the_same_files_as_the_unscanned_one(hf_dirs, tmp_path):
  directory, _ = hf_dirs["qwen3"]
  plain = models.save_hf(str(tmp_path / "plain"), *models.load(directory))
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  module, variables = models.load(directory, mesh=mesh, scan_layers=True)
  assert variables["params"]["blocks"]["attn"]["query"]["kernel"].sharding.spec[1:3] == (
      "fsdp",
      "tensor",
  )
  scanned = models.save_hf(str(tmp_path / "scanned"), module, variables)
  assert _files(scanned) == _files(plain)
  assert sorted(_files(plain)) == ["config.json", "model.safetensors"]


def test_bfloat16_model_exports_bfloat16_tensors(hf_dirs, tmp_path):
  directory, _ = hf_dirs["qwen2"]
  module, variables = models.load(directory, dtype="bfloat16", param_dtype="bfloat16")
  out = models.save_hf(str(tmp_path / "out"), module, variables)
  with safetensors.safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
  _, reloaded = models.load(out)
  for got, want in zip(jax.tree.leaves(reloaded), jax.tree.leaves(variables), strict=True):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, want)
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


@transformer.register_block("export_test_parallel")
class _ParallelBlock(transformer.TransformerBlock):
  """A fork's block (the standard one under another name is enough to be refused)."""


def _lm(**overrides):
  return models.create("llama-tiny", **_TINY, **overrides)


@pytest.mark.parametrize(
    "module, message",
    [
        (
            _lm(position="learned"),
            "position='learned' with norm='rmsnorm' and mlp='gated' has no Hugging Face "
            "counterpart",
        ),
        (_lm(position="sinusoidal"), "position='sinusoidal' with norm='rmsnorm'"),
        (
            _lm(block="export_test_parallel"),
            "block='export_test_parallel' is a registered block type with no "
            "Hugging Face counterpart",
        ),
        (
            _lm(attn_out_bias=True),
            r"attn_out_bias=True has no counterpart in a Hugging Face llama config.json "
            r"\(it would load as attn_out_bias=False\)",
        ),
        (
            _lm(qk_norm=True, mlp_bias=True),
            "mlp_bias=True has no counterpart in a Hugging Face qwen3",
        ),
        (
            models.create("transformer-tiny", use_bias=False),
            "use_bias=False, qkv_bias=False, .* has no " "counterpart in a Hugging Face gpt2",
        ),
        (
            models.create("mlp"),
            "MLP has no Hugging Face export; it covers TransformerLM, ViT, ResNet models",
        ),
        (models.create("resnet18", stem="small"), "stem='small' has no Hugging Face counterpart"),
        (
            models.create("vit-ti16", pool="mean"),
            "pool='mean' with position='learned' has no Hugging Face counterpart",
        ),
        (
            models.create("vit-ti16", position="sinusoidal_2d"),
            "position='sinusoidal_2d' has no Hugging Face",
        ),
    ],
    ids=[
        "learned_rmsnorm",
        "sinusoidal",
        "custom_block",
        "out_bias_only",
        "qwen3_mlp_bias",
        "gpt2_no_bias",
        "not_an_lm_vit_or_resnet",
        "resnet_small_stem",
        "vit_mean_pool",
        "vit_fixed_positions",
    ],
)
def test_models_without_a_hugging_face_counterpart_are_refused_in_one_line(
    tmp_path, module, message
):
  with pytest.raises(UserError, match=message) as error:
    models.save_hf(str(tmp_path / "out"), module, {"params": {}})
  assert "\n" not in str(error.value)
  assert not os.path.exists(tmp_path / "out")


def test_export_refuses_a_directory_that_holds_a_model(hf_dirs):
  directory, _ = hf_dirs["gpt2"]
  with pytest.raises(UserError, match="already holds a model"):
    models.save_hf(directory, *models.load(directory))


def test_variables_that_do_not_fit_the_config_are_named(tmp_path):
  module = _lm()
  variables = _random_variables(module)
  del variables["params"]["block_1"]["mlp"]["wo"]
  with pytest.raises(
      UserError,
      match=r"the variables do not fit the module's config \(variable "
      r"params/block_1/mlp/wo/kernel is missing\)",
  ):
    models.save_hf(str(tmp_path / "out"), module, variables)
  assert not os.path.exists(tmp_path / "out")


def test_cli_exports_a_trained_llama_that_transformers_loads(tmp_path, data_dir):
  tiny = [
      f"--flagfile={TINY_FLAGS}",
      "--model=llama-tiny",
      f"--workdir={tmp_path / 'run'}",
      f"--data_dir={data_dir}",
      "--seq_len=32",
      "--batch_size=8",
      "--model_override=num_layers=1",
      "--model_override=embed_dim=32",
      "--model_override=mlp_dim=64",
      "--eval_batches=2",
      "--num_steps=2",
      "--eval_every=2",
      "--checkpoint_every=2",
  ]
  env = cpu_env()
  for extra in ([], ["--mode=export", "--export_format=hf", f"--export_dir={tmp_path / 'hf'}"]):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.transformer", *tiny, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
  assert "exported step 2" in result.stdout
  exported = _from_pretrained(str(tmp_path / "hf"))
  # The run's own parameters, read from its newest checkpoint, give the reference logits.
  module = models.create("llama-tiny", num_layers=1, embed_dim=32, mlp_dim=64)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
  variables = checkpoint.load_variables(str(tmp_path / "run"), abstract)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(jax.jit(module.apply)(variables, _TOKENS_BT))
  assert _relative_error(_reference_logits(exported, _TOKENS_BT), want) < 1e-5


def test_cli_refuses_hf_export_of_a_model_without_a_hugging_face_family(tmp_path, data_dir):
  result = _run_experiment(
      "experiments.mlp",
      "--dataset=sklearn_digits",
      f"--workdir={tmp_path}",
      f"--data_dir={data_dir}",
      "--mode=export",
      "--export_format=hf",
      f"--export_dir={tmp_path / 'hf'}",
  )
  _assert_one_line_error(
      result, 1, "MLP has no Hugging Face export; it covers TransformerLM, ViT, ResNet"
  )
  assert not os.path.exists(tmp_path / "hf")
