"""--init_from=HF_DIR: a Hugging Face model directory fine-tuned by experiments.transformer, its
architecture from config.json, and the same flags evaluating and exporting the run afterwards."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bigjax import metrics
from bigjax import models
from tests.cpu_env import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = cpu_env()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """A tiny random Llama over the 256 byte ids (bigjax's default tokenizer), saved by transformers."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=256,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      rms_norm_eps=1e-5,
      tie_word_embeddings=False,
  )
  model = transformers.LlamaForCausalLM(config).eval()
  directory = tmp_path_factory.mktemp("hf_llama")
  model.save_pretrained(directory)
  return directory, model


def _experiment(workdir, *flags):
  command = [
      sys.executable,
      "-m",
      "experiments.transformer",
      "--dataset=python_stdlib_text",
      f"--workdir={workdir}",
      "--seq_len=32",
      "--batch_size=8",
      "--eval_batches=2",
      "--log_every=1",
      *flags,
  ]
  return subprocess.run(command, cwd=REPO, env=_ENV, capture_output=True, text=True, timeout=600)


def test_a_hugging_face_model_fine_tunes_then_evaluates_and_exports_with_the_same_flags(
    tmp_path, data_dir, hf_llama
):
  directory, reference = hf_llama
  # A learning rate so small that the exported weights are still the checkpoint's to float32 rounding.
  run = [
      f"--data_dir={data_dir}",
      f"--init_from={directory}",
      "--num_steps=2",
      "--eval_every=2",
      "--learning_rate=1e-12",
      "--warmup_steps=0",
  ]
  trained = _experiment(tmp_path / "run", *run)
  assert trained.returncode == 0, trained.stderr
  assert f"parameters from {directory}" in trained.stdout
  rows = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2] and 4.5 < rows[0][
      "train_loss"
  ] < 6.5  # random weights: ~ln 256
  evaluated = _experiment(tmp_path / "run", *run, "--mode=eval")
  assert evaluated.returncode == 0, evaluated.stderr
  assert "eval_loss" in evaluated.stdout
  exported = _experiment(
      tmp_path / "run", *run, "--mode=export", f"--export_dir={tmp_path / 'export'}"
  )
  assert exported.returncode == 0, exported.stderr
  module, variables = models.load(str(tmp_path / "export"))
  tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
  import torch

  with torch.no_grad():
    want = reference(torch.as_tensor(tokens)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(module.apply(variables, tokens))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_a_model_flag_that_disagrees_with_config_json_is_one_line_and_touches_nothing(
    tmp_path, data_dir, hf_llama
):
  directory, _ = hf_llama
  refused = _experiment(
      tmp_path / "run",
      f"--data_dir={data_dir}",
      f"--init_from={directory}",
      "--model=llama-tiny",
      "--num_steps=1",
  )
  assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
  assert refused.stderr.strip().splitlines()[-1] == (
      f"error: --model=llama-tiny has embed_dim=256 but {directory}/config.json gives 32; leave --model out to "
      "take the architecture from config.json"
  )
  assert not (tmp_path / "run").exists()


def test_a_damaged_hugging_face_directory_is_one_line_before_the_workdir_exists(
    tmp_path, data_dir, hf_llama
):
  import shutil
  from safetensors import numpy as safetensors_numpy

  directory, _ = hf_llama
  damaged = shutil.copytree(directory, tmp_path / "damaged")
  tensors = safetensors_numpy.load_file(damaged / "model.safetensors")
  del tensors["model.layers.1.mlp.down_proj.weight"]
  safetensors_numpy.save_file(tensors, damaged / "model.safetensors")
  refused = _experiment(
      tmp_path / "run", f"--data_dir={data_dir}", f"--init_from={damaged}", "--num_steps=1"
  )
  assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "model.layers.1.mlp.down_proj.weight" in last, last
  assert not (tmp_path / "run").exists()
