#!/usr/bin/env bash
# One prepared run on a single NVIDIA H200 that fits in 10 minutes:
#   1. MFU of gpt2-medium (355M parameters) training in bfloat16, attention through cuDNN's fused
#      kernel (bigjax.nn.attention picks jax.nn.dot_product_attention(implementation="cudnn") on an
#      Ampere-or-newer GPU in bfloat16 with a causal mask), against the measured bf16 matmul peak and
#      the datasheet's 989 TFLOP/s;
#   2. ResNet-50 training images/s at 224x224 in bfloat16 (XLA's convolution, i.e. cuDNN, on GPU).
#
#   bash benchmarks/gpu.sh            # JSON lines on stdout, copies under $OUT (default /tmp/bigjax_gpu)
#
# Needs a jax with CUDA (pip install -e ".[bench]" "jax[cuda12]") already installed: the machine may
# have no internet. Each run has its own time limit (330 s + 200 s, plus ~30 s of start-up), so one
# failure cannot eat the other's time. Written by reading the code: not yet run on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/bigjax_gpu}"
mkdir -p "$OUT_DIR"

python - <<'EOF' || exit 1
import sys
import jax
print(f"jax {jax.__version__}: {jax.devices()}", flush=True)
if jax.default_backend() != "gpu":
  sys.exit("error: JAX sees no GPU; install jax[cuda12] on this machine")
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT_DIR/nvidia-smi.csv"

# run NAME SECONDS FLAGS...: one benchmark, its JSON line on stdout and in $OUT_DIR/NAME.jsonl.
run() {
  local name=$1 seconds=$2
  shift 2
  echo "== $name: python -m benchmarks.throughput $*"
  timeout "$seconds" python -m benchmarks.throughput "$@" 2> "$OUT_DIR/$name.err" | tee "$OUT_DIR/$name.jsonl"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed (exit $rc); last lines of $OUT_DIR/$name.err:"
    tail -n 15 "$OUT_DIR/$name.err"
  fi
}

# Batch 32 x 1024 tokens. The vocabulary is padded from 50257 to 50304 (a multiple of 128, as
# nanoGPT does) so the logits matmul tiles evenly; the FLOP count uses the padded size.
run gpt2_medium_bf16 330 --model=gpt2-medium --dtype=bfloat16 --model_override=vocab_size=50304 \
    --batch_size=32 --seq_len=1024 --bench_warmup=3 --bench_steps=10

run resnet50_bf16 200 --model=resnet50 --dtype=bfloat16 --batch_size=256 --bench_warmup=3 --bench_steps=10
