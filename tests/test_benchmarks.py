"""The benchmark's FLOP formulas against an independent count of the matmuls in the jaxpr, that
count against convolution and matmul FLOPs worked out by hand, and the throughput script's A/B run
end to end."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flops
from benchmarks import throughput
from bigjax import models
from bigjax import tasks
from tests.cpu_env import cpu_env


def _forward_flops(model, inputs):
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs))["params"]
  return params, flops.counted_forward_flops(
      lambda p, x: model.apply({"params": p}, x), params, inputs
  )


def test_transformer_formula_is_three_times_the_counted_forward():
  model = models.create(
      "transformer-tiny", num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=16
  )
  tokens = jnp.zeros((2, 16), jnp.int32)
  params, forward = _forward_flops(model, tokens)
  assert flops.transformer_flops_per_token(model.config, params, 16) == 3 * forward / (2 * 16)


def test_lstm_formula_is_three_times_the_counted_forward_over_the_scan():
  model = models.create("lstm-lm", num_layers=2, embed_dim=8, hidden_size=16, vocab_size=32)
  tokens = jnp.zeros((2, 5), jnp.int32)
  params, forward = _forward_flops(model, tokens)
  assert flops.rnn_flops_per_token(model.config, params) == 3 * forward / (2 * 5)


def test_counted_flops_of_a_strided_convolution_and_a_matmul():
  x = jnp.zeros((2, 9, 9, 3))
  kernel = jnp.zeros((3, 3, 3, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (2, 2), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  assert flops.counted_forward_flops(conv, x, kernel) == 2 * (2 * 5 * 5 * 4) * (3 * 3 * 3)
  assert (
      flops.counted_forward_flops(jnp.matmul, np.zeros((7, 5)), np.zeros((5, 3))) == 2 * 7 * 5 * 3
  )


def test_breakdown_skeleton_flops_and_attention_ablation():
  """The dense skeleton's stated FLOPs are 3 x its counted forward matmuls; the ablation without the
  attention core changes the gradient, and puts the real attention back afterwards."""
  from benchmarks import breakdown
  from bigjax.ops import attention as attention_ops

  model = models.create("transformer-tiny", num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  chain, params, stated = breakdown.dense_skeleton(model.config, tokens=8)
  assert stated == 3 * flops.counted_forward_flops(chain, params)
  batch = throughput.random_batch(model, 2, 8)
  workload = throughput.Workload(
      "transformer-tiny", model, tasks.LanguageModelling(), batch, "tokens", 16, "float32"
  )
  real_fn, real_params = breakdown.loss_gradient(workload)
  ablated_fn, ablated_params = breakdown.without_attention_core(workload)
  assert attention_ops.grouped_attention is not breakdown._attention_without_core
  real, ablated = real_fn(real_params), ablated_fn(ablated_params)
  query_grad = lambda g: g["block_0"]["attn"]["query"]["kernel"]  # noqa: E731
  assert np.all(np.isfinite(query_grad(ablated)))
  assert not np.allclose(query_grad(real), query_grad(ablated))


def _resnet18_flops_per_image(image_size: int, conv_impl: str) -> tuple[float, float]:
  """(the benchmark's training FLOPs per image, 3 x the forward counted with `conv_impl`)."""
  model = models.create("resnet18", input_shape=(image_size, image_size, 3), conv_impl=conv_impl)
  batch = throughput.random_batch(model, 1, 0)
  workload = throughput.Workload(
      "resnet18", model, tasks.Classification(), batch, "images", 1, "float32"
  )
  per_image, _, _ = throughput.flops_per_unit(workload, *throughput.abstract_variables(workload))
  variables = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch["image"]))
  return per_image, 3 * flops.counted_forward_flops(
      lambda v, x: model.apply(v, x, train=False), variables, batch["image"]
  )


def test_resnet_flops_are_the_published_figure_whichever_convolution_runs():
  # torchvision's ResNet-18 at 224 x 224: 1.814 G multiply-adds per image (forward).
  per_image, _ = _resnet18_flops_per_image(224, "matmul")
  np.testing.assert_allclose(per_image, 3 * 2 * 1.814e9, rtol=2e-3)
  # At 32 x 32 the last stage's maps are 1 x 1 and the matmul convolution skips the taps that read
  # only padding; the benchmark still counts every tap, as XLA's convolution defines them.
  per_image, via_matmul = _resnet18_flops_per_image(32, "matmul")
  _, via_xla = _resnet18_flops_per_image(32, "xla")
  assert per_image == via_xla
  assert via_matmul < 0.85 * via_xla


def test_lstm_breakdown_floor_flops_and_stack_gradient():
  """The LSTM matmul floor's stated FLOPs are its jaxpr-counted matmuls (scan bodies times their
  length) and equal the counted matmuls of the recurrent stack's forward + backward, whose
  gradient reaches every layer's kernels and the input."""
  from benchmarks import breakdown

  cfg = models.create("lstm-lm", num_layers=2, embed_dim=8, hidden_size=16, vocab_size=32).config
  floor_fn, floor_params, stated = breakdown.lstm_matmul_floor(cfg, batch=2, length=5)
  assert stated == flops.counted_forward_flops(floor_fn, floor_params)
  grad_fn, args = breakdown.recurrent_stack_gradient(cfg, batch=2, length=5)
  assert stated == flops.counted_forward_flops(grad_fn, args)
  grads, dx = grad_fn(args)
  grads = grads["params"]
  assert np.any(dx != 0)
  for layer in ("layer0_forward", "layer1_forward"):
    assert np.any(grads[layer]["recurrent_kernel"] != 0)
    assert np.all(np.isfinite(grads[layer]["input_kernel"]))


def test_throughput_ab_of_an_xla_option_runs_end_to_end():
  import json
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = cpu_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.throughput",
          "--model=transformer-tiny",
          "--model_override=num_layers=1",
          "--model_override=embed_dim=32",
          "--model_override=mlp_dim=64",
          "--batch_size=2",
          "--seq_len=16",
          "--bench_steps=1",
          "--bench_warmup=0",
          "--rounds=1",
          "--peak_matmul_size=64",
          "--ab_xla_option=xla_cpu_experimental_ynn_fusion_type=",
      ],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  a, b, compare = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert (a["framework"], b["framework"]) == ("bigjax A", "bigjax B")
  assert compare["B"] == ["xla:xla_cpu_experimental_ynn_fusion_type="]
  for record in (a, b):
    assert len(record["peak_measurements"]) == 2  # before and after the timed rounds
    assert record["measured_peak_flops"] == max(record["peak_measurements"])
    assert record["mfu_measured_peak"] == record["achieved_flops"] / record["measured_peak_flops"]
  # An option for another platform would leave B the same as A: a one-line error, not a silent 1.0x.
  gpu_only = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.throughput",
          "--model=transformer-tiny",
          "--ab_xla_option=xla_gpu_autotune_level=0",
      ],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert gpu_only.returncode == 1
  assert gpu_only.stderr.strip().splitlines()[-1] == (
      "error: --ab_xla_option=['xla_gpu_autotune_level=0'] changes nothing on cpu: B would compile as A"
  )


# Loaded by every Python the GPU script starts (through PYTHONPATH): the machine it is written for
# has no grain and no TFDS, so the dry run must not need them either.
_WITHOUT_DATA_STACK = """
import importlib.abc, sys
class _NoDataStack(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.partition(".")[0] in ("grain", "tensorflow_datasets", "array_record"):
      raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, _NoDataStack())
"""


def _dry_run(script: str, tmp_path) -> dict:
  """benchmarks/SCRIPT.sh with its dry-run switch on the CPU, without grain or TFDS: the records
  of each step by name."""
  import json
  import os
  import subprocess

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_WITHOUT_DATA_STACK)
  out = tmp_path / "out"
  env = cpu_env(**{f"BIGJAX_{script.upper()}_DRY_RUN": "1"}, OUT=str(out), PYTHONPATH=str(site))
  result = subprocess.run(
      ["bash", os.path.join(repo, "benchmarks", f"{script}.sh")],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:]
  assert "jax 0." in (out / "versions.txt").read_text()
  return {
      name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
      for name in ("attention_check", "gpt2_medium_bf16", "llama3_2_1b_bf16", "resnet50_bf16")
  }


@pytest.mark.parametrize("script, attention", [("gpu", "xla"), ("tpu", "splash")])
def test_device_script_dry_run_on_cpu(tmp_path, script, attention):
  """benchmarks/gpu.sh and tpu.sh at toy sizes: every step of the device run with the same
  presets and flags, the attention check over packed documents too (tpu.sh's through splash in
  interpret mode), each language model's record naming its attention and fused-kernel calls."""
  records = _dry_run(script, tmp_path)
  checks = records["attention_check"]
  assert [(r["kv_heads"], r["packed_documents"], r["ok"]) for r in checks] == [
      (16, False, True),
      (4, False, True),
      (16, True, True),
      (4, True, True),
  ]
  assert {r["implementation"] for r in checks} == {attention}
  (gpt,), (llama,), (resnet,) = (records[n] for n in list(records)[1:])
  for record, model in ((gpt, "gpt2-medium"), (llama, "llama3.2-1b")):
    assert (record["model"], record["dtype"], record["packed_documents"]) == (
        model,
        "bfloat16",
        True,
    )
    # On the CPU the step's attention is XLA's: no fused calls
    assert (record["attention_implementation"], record["cudnn_attention_calls"]) == ("xla", 0)
    assert record["pallas_tpu_calls"] == 0 and record["tokens_per_s"] > 0
  assert resnet["images_per_s"] > 0


def test_throughput_times_packed_windows_and_names_the_attention_each_platform_picks():
  """The benchmark's batch is what the experiments train on (documents with segment ids), and the
  implementation it reports is bigjax.ops.attention's choice for those inputs."""
  from bigjax.ops import attention as attention_ops

  model = models.create("transformer-tiny", dtype="bfloat16")
  batch = throughput.random_batch(model, 4, 256, document_len=32)
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  ends = batch["tokens"][:, :-1] == model.config.vocab_size - 1
  np.testing.assert_array_equal(np.diff(batch["segment_ids"], axis=1), ends)
  assert 256 * 4 / 32 / 2 < ends.sum() < 256 * 4 / 32 * 2
  assert set(throughput.random_batch(model, 4, 256)) == {"tokens"}  # document_len=0: unpacked
  workload = throughput.Workload("transformer-tiny", model, None, batch, "tokens", 1024, "bfloat16")
  assert throughput.attention_implementation(workload) == "xla"  # this CPU
  cfg = model.config
  shape = (4, 256, cfg.num_heads, cfg.embed_dim // cfg.num_heads)
  mask = attention_ops.Mask(segment_ids_BT=batch["segment_ids"][:, :-1])
  assert (
      attention_ops.implementation(shape, shape, cfg.compute_dtype, mask, platform="tpu")
      == "splash"
  )
  assert (
      attention_ops.implementation(
          shape, shape, cfg.compute_dtype, mask, platform="gpu", gpu_capability=9.0
      )
      == "cudnn_packed"
  )


def test_load_benchmark_writes_a_checkpoint_and_measures_its_sharded_load(tmp_path):
  import json
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.load",
          "--model=llama-tiny",
          "--dtype=float32",
          f"--checkpoint_dir={tmp_path / 'ckpt'}",
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record["mesh"] == "data=1, fsdp=8, tensor=1" and record["parameters"] == 1_639_680
  assert record["checkpoint_bytes"] >= 4 * record["parameters"]
  # Every parameter of llama-tiny splits over fsdp:8, so each device holds an eighth of the model.
  assert (
      record["bytes_per_device_max"]
      == record["bytes_per_device_min"]
      == record["model_bytes_over_devices"]
  )
  assert record["load_s"] > 0 and record["peak_rss_bytes"] >= record["rss_before_bytes"]
