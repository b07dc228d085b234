"""The same models written plainly in PyTorch, timed like benchmarks/throughput.py; and a
side-by-side mode that runs bigjax and PyTorch in one process, alternating, and prints the ratio.

  pip install -e ".[bench]"
  python -m benchmarks.torch_reference --model=transformer-tiny --model_override=num_layers=4 \
      --batch_size=16 --seq_len=256                  # PyTorch alone: one JSON line
  python -m benchmarks.torch_reference --side_by_side --rounds=5 ...   # both, then the ratio

The PyTorch model is built from the bigjax preset's own config (same widths, depths, vocabulary,
tied head, activation), so both sides train the same network on the same random batch with AdamW
and the same gradient clipping. It is the obvious eager script: a GPT block with
F.scaled_dot_product_attention (causal), a torchvision-style ResNet in NCHW, nn.LSTM.
"""

import json
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
from absl import flags
from torch import nn

from benchmarks import throughput
from bigjax import flags as bigjax_flags
from bigjax import optim
from bigjax import sharding
from bigjax.errors import UserError
from bigjax.nn import conv
from bigjax.nn import recurrent
from bigjax.nn import transformer

SIDE_BY_SIDE = flags.DEFINE_bool(
    "side_by_side",
    False,
    "Run bigjax and PyTorch in this process, alternating "
    "rounds of --bench_steps steps, and print the throughput ratio bigjax / PyTorch.",
)

_TORCH_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_exact": F.gelu,
    "relu": F.relu,
}


class GPTBlock(nn.Module):

  def __init__(self, d_model, num_heads, mlp_dim, activation, bias):
    super().__init__()
    self.num_heads, self.activation = num_heads, _TORCH_ACTIVATIONS[activation]
    self.ln_attn, self.ln_mlp = nn.LayerNorm(d_model, bias=bias), nn.LayerNorm(d_model, bias=bias)
    self.qkv, self.proj = nn.Linear(d_model, 3 * d_model, bias=bias), nn.Linear(
        d_model, d_model, bias=bias
    )
    self.fc, self.out = nn.Linear(d_model, mlp_dim, bias=bias), nn.Linear(
        mlp_dim, d_model, bias=bias
    )

  def forward(self, x):
    b, t, d = x.shape
    q, k, v = (
        self.qkv(self.ln_attn(x))
        .view(b, t, 3, self.num_heads, d // self.num_heads)
        .permute(2, 0, 3, 1, 4)
    )
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.out(self.activation(self.fc(self.ln_mlp(x))))


class GPT(nn.Module):

  def __init__(self, cfg: transformer.TransformerConfig):
    super().__init__()
    if (
        cfg.position not in ("learned", "none")
        or cfg.num_kv_heads not in (None, cfg.num_heads)
        or cfg.head_dim
    ):
      raise UserError(
          "the PyTorch GPT covers learned or no positions, multi-head attention and "
          "head_dim = embed_dim / num_heads"
      )
    self.tied = cfg.tie_embeddings
    self.tok = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
    self.pos = nn.Embedding(cfg.max_len, cfg.embed_dim) if cfg.position == "learned" else None
    self.blocks = nn.ModuleList(
        GPTBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.activation, cfg.use_bias)
        for _ in range(cfg.num_layers)
    )
    self.ln_final = nn.LayerNorm(cfg.embed_dim, bias=cfg.use_bias)
    self.head = None if self.tied else nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)

  def forward(self, tokens):
    x = self.tok(tokens)
    if self.pos is not None:
      x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
    for block in self.blocks:
      x = block(x)
    x = self.ln_final(x)
    return x @ self.tok.weight.T if self.tied else self.head(x)


class RNNLM(nn.Module):

  def __init__(self, cfg: recurrent.RNNLMConfig):
    super().__init__()
    if cfg.cell not in ("lstm", "gru") or cfg.tie_embeddings:
      raise UserError("the PyTorch RNN LM covers untied lstm and gru cells")
    self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
    rnn = nn.LSTM if cfg.cell == "lstm" else nn.GRU
    self.rnn = rnn(cfg.embed_dim, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
    self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size)

  def forward(self, tokens):
    return self.head(self.rnn(self.embed(tokens))[0])


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride):
    super().__init__()
    cout = width * self.expansion
    self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
    self.downsample = _downsample(cin, cout, stride)

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride):
    super().__init__()
    cout = width * self.expansion
    self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
    self.downsample = _downsample(cin, cout, stride)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin, cout, stride):
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
  """torchvision's resnet layout (v1.5: the stride in the 3x3 conv), NCHW."""

  def __init__(self, cfg: conv.ResNetConfig):
    super().__init__()
    block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
    cin = cfg.input_shape[-1]
    if cfg.stem == "imagenet":
      self.stem = nn.Sequential(
          nn.Conv2d(cin, cfg.width, 7, 2, 3, bias=False),
          nn.BatchNorm2d(cfg.width),
          nn.ReLU(),
          nn.MaxPool2d(3, 2, 1),
      )
    else:
      self.stem = nn.Sequential(
          nn.Conv2d(cin, cfg.width, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.width), nn.ReLU()
      )
    layers, cin = [], cfg.width
    for stage, num_blocks in enumerate(cfg.stage_sizes):
      width = cfg.width * 2**stage
      for i in range(num_blocks):
        layers.append(block(cin, width, 2 if stage > 0 and i == 0 else 1))
        cin = width * block.expansion
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, cfg.num_classes)

  def forward(self, images):
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(images)), 1), 1))


def torch_model(model) -> nn.Module:
  """The PyTorch twin of a bigjax model, from its config."""
  cfg = model.config
  if isinstance(model, transformer.TransformerLM):
    return GPT(cfg)
  if isinstance(model, recurrent.RNNLM):
    return RNNLM(cfg)
  if isinstance(model, conv.ResNet):
    return ResNet(cfg)
  raise UserError(
      f"no PyTorch reference for {type(model).__name__}; use a Transformer LM, an RNN LM or a ResNet"
  )


class TorchRunner:
  """One eager PyTorch train step per `step()`: forward, cross-entropy, backward, clipping, AdamW."""

  def __init__(self, workload: throughput.Workload, optim_cfg: optim.OptimConfig, seed: int = 0):
    if workload.dtype != "float32":
      raise UserError("the PyTorch reference runs float32 only")
    torch.manual_seed(seed)
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.model = torch_model(workload.model).to(self.device).train()
    self.optimizer = torch.optim.AdamW(
        self.model.parameters(),
        lr=optim_cfg.learning_rate,
        betas=(optim_cfg.momentum, optim_cfg.b2),
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
    )
    self.grad_clip = optim_cfg.grad_clip
    if "tokens" in workload.batch:
      tokens = torch.as_tensor(workload.batch["tokens"], dtype=torch.long, device=self.device)
      self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
    else:
      images = np.ascontiguousarray(workload.batch["image"].transpose(0, 3, 1, 2))  # NHWC -> NCHW
      self.inputs = torch.as_tensor(images, device=self.device)
      self.targets = torch.as_tensor(workload.batch["label"], dtype=torch.long, device=self.device)

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    logits = self.model(self.inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
    loss.backward()
    if self.grad_clip:
      nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    if self.device.type == "cuda":
      torch.cuda.synchronize()


def torch_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of PyTorch's fastest n x n float32 matmul on this machine."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  return 2.0 * size**3 / min(times)


def run_torch(
    workload: throughput.Workload, optim_cfg: optim.OptimConfig, flops: tuple, peaks: tuple
) -> dict:
  runner = TorchRunner(workload, optim_cfg, bigjax_flags.SEED.value)
  first = throughput.time_calls(runner.step, 1)[0]
  throughput.time_calls(runner.step, throughput.BENCH_WARMUP.value)
  record = throughput.summarize(
      workload,
      throughput.time_calls(runner.step, throughput.BENCH_STEPS.value),
      first,
      flops,
      peaks,
      framework="pytorch",
  )
  record["compile_s"] = None
  record["first_step_s"] = first
  return record


def side_by_side(workload: throughput.Workload, optim_cfg: optim.OptimConfig) -> list[dict]:
  """Both frameworks in this process, in alternating rounds (throughput.alternate_rounds)."""
  mesh = sharding.make_mesh(bigjax_flags.MESH.value)
  ours = throughput.BigjaxRunner(
      workload,
      mesh,
      optim.make_optimizer(optim_cfg, 1000),
      bigjax_flags.SEED.value,
      bigjax_flags.xla_options(),
  )
  theirs = TorchRunner(workload, optim_cfg, bigjax_flags.SEED.value)
  (times, medians), peaks = throughput.between_peak_measurements(
      lambda: throughput.alternate_rounds(
          {"bigjax": ours.step, "pytorch": theirs.step},
          throughput.ROUNDS.value,
          throughput.BENCH_STEPS.value,
          throughput.BENCH_WARMUP.value,
      ),
      workload.dtype,
  )
  flops = throughput.flops_per_unit(workload, ours.state.params, ours.state.model_state)
  records = [
      throughput.summarize(workload, times["bigjax"], ours.compile_s, flops, peaks),
      throughput.summarize(workload, times["pytorch"], 0.0, flops, peaks, framework="pytorch"),
  ]
  records[1]["compile_s"] = None
  records[1]["torch_matmul_peak_flops"] = torch_matmul_peak()
  records.append(
      {
          **throughput.comparison(times, medians, workload.unit, "bigjax", "pytorch"),
          "torch_threads": torch.get_num_threads(),
          "jax_devices": jax.device_count(),
      }
  )
  return records


def main(argv):
  del argv
  workload = throughput.workload_from_flags()
  optim_cfg = bigjax_flags.optim_config()
  if SIDE_BY_SIDE.value:
    records = side_by_side(workload, optim_cfg)
  else:
    # FLOPs from the bigjax twin's parameters: the same network, so the same count.
    flops = throughput.flops_per_unit(workload, *throughput.abstract_variables(workload))
    records = [run_torch(workload, optim_cfg, flops, (torch_matmul_peak(),))]
  for record in records:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  bigjax_flags.run(main)
