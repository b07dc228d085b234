#!/usr/bin/env bash
# One prepared run on a single NVIDIA H200 that fits in 10 minutes:
#   0. the versions that run, and cuDNN's fused attention checked against bigjax's own attention
#      (output and gradients, bfloat16, GPT-2 medium's shapes; benchmarks/attention_check.py);
#   1. MFU of gpt2-medium (355M parameters) training in bfloat16, attention through cuDNN's fused
#      kernel (bigjax.nn.attention picks jax.nn.dot_product_attention(implementation="cudnn") on an
#      Ampere-or-newer GPU in bfloat16 with a causal mask; the record's cudnn_attention_calls says
#      whether the compiled step really calls it), against the measured bf16 matmul peak and the
#      datasheet's 989 TFLOP/s;
#   2. ResNet-50 training images/s at 224x224 in bfloat16 (XLA's convolution, i.e. cuDNN, on GPU).
#
#   bash benchmarks/gpu.sh                       # JSON lines on stdout, copies under $OUT (default /tmp/bigjax_gpu)
#   BIGJAX_GPU_DRY_RUN=1 bash benchmarks/gpu.sh  # the same steps at toy sizes on the CPU: checks this script
#
# It installs nothing and runs from this checkout (PYTHONPATH), so it works on a machine without
# internet: it needs Python with jax and a CUDA plugin, flax, optax, orbax-checkpoint and absl-py
# (the benchmarks import neither grain nor TFDS). Such an image may hold other versions than
# setup.py's tested ranges; step 0 prints the ones that ran. Each step has its own time limit
# (60 + 300 + 180 s, plus start-up), so one failure cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-/tmp/bigjax_gpu}"
mkdir -p "$OUT_DIR"
DRY_RUN="${BIGJAX_GPU_DRY_RUN:-0}"
if [ "$DRY_RUN" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi

python - "$DRY_RUN" <<'EOF' | tee "$OUT_DIR/versions.txt" || exit 1
import importlib.metadata
import platform
import sys
import jax
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy")
versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names)
print(f"python {platform.python_version()}: {versions}; devices {jax.devices()}", flush=True)
if sys.argv[1] != "1" and jax.default_backend() != "gpu":
  sys.exit("error: JAX sees no GPU; install jax[cuda12] (or cuda13) on this machine")
EOF
if [ "$DRY_RUN" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT_DIR/nvidia-smi.csv"
fi

# run NAME SECONDS MODULE FLAGS...: one step, its JSON lines on stdout and in $OUT_DIR/NAME.jsonl.
run() {
  local name=$1 seconds=$2 module=$3
  shift 3
  echo "== $name: python -m $module $*"
  timeout "$seconds" python -m "$module" "$@" 2> "$OUT_DIR/$name.err" | tee "$OUT_DIR/$name.jsonl"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name failed (exit $rc); last lines of $OUT_DIR/$name.err:"
    tail -n 15 "$OUT_DIR/$name.err"
    FAILED+=("$name")
  fi
}
FAILED=()

# A dry run keeps every flag below and appends toy sizes (later flags win), so the presets, flags
# and record fields the GPU run uses are the ones it exercises.
ATTENTION_IMPL=cudnn ATTENTION_TOY=() GPT_TOY=() RESNET_TOY=()
if [ "$DRY_RUN" = 1 ]; then
  ATTENTION_IMPL=xla ATTENTION_TOY=(--check_seq_len=128)
  TOY=(--bench_warmup=0 --bench_steps=1 --peak_matmul_size=256)
  GPT_TOY=(--model_override=num_layers=2 --batch_size=1 --seq_len=64 "${TOY[@]}")
  # One bottleneck block per stage: every kind of block and stride the 3-4-6-3 stack has, at a
  # fifth of its compile time on the CPU.
  RESNET_TOY=(--batch_size=2 --image_size=32 --model_override=stage_sizes=1,1,1,1 "${TOY[@]}")
fi

run attention_check 60 benchmarks.attention_check --attention_implementation=$ATTENTION_IMPL "${ATTENTION_TOY[@]}"

# Batch 32 x 1024 tokens. The vocabulary is padded from 50257 to 50304 (a multiple of 128, as
# nanoGPT does) so the logits matmul tiles evenly; the FLOP count uses the padded size.
run gpt2_medium_bf16 300 benchmarks.throughput --model=gpt2-medium --dtype=bfloat16 \
    --model_override=vocab_size=50304 --batch_size=32 --seq_len=1024 --bench_warmup=3 --bench_steps=10 \
    "${GPT_TOY[@]}"

run resnet50_bf16 180 benchmarks.throughput --model=resnet50 --dtype=bfloat16 --batch_size=256 \
    --bench_warmup=3 --bench_steps=10 "${RESNET_TOY[@]}"

if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "== failed: ${FAILED[*]}"
  exit 1
fi
