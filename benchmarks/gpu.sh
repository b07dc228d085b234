#!/usr/bin/env bash
# One prepared run on a single NVIDIA H200 that fits in 10 minutes:
#   0. the versions that run, and cuDNN's fused attention checked against bigjax's reference
#      attention (output and gradients, bfloat16, GPT-2 medium's shapes, unpacked and over packed
#      documents with padding; benchmarks/attention_check.py);
#   1. MFU of gpt2-medium (355M parameters) training in bfloat16 on packed windows, as the
#      experiments train, against the measured bf16 matmul peak and the datasheet's 989 TFLOP/s;
#   2. the same for llama3.2-1b (1.24B parameters, grouped-query attention, 2048-token windows);
#      in both, bigjax.ops.attention picks cuDNN's packed-document kernel (Hopper, bfloat16,
#      segment ids): each record names the implementation picked and its cudnn_attention_calls
#      count the fused calls the compiled step really holds;
#   3. ResNet-50 training images/s at 224x224 in bfloat16 (XLA's convolution, i.e. cuDNN, on GPU).
#
#   bash benchmarks/gpu.sh                       # JSON lines on stdout, copies under $OUT (default /tmp/bigjax_gpu)
#   BIGJAX_GPU_DRY_RUN=1 bash benchmarks/gpu.sh  # the same steps at toy sizes on the CPU: checks this script
#
# It installs nothing and runs from this checkout (PYTHONPATH), so it works on a machine without
# internet: it needs Python with jax and a CUDA plugin, flax, optax, orbax-checkpoint and absl-py
# (the benchmarks import neither grain nor TFDS). Such an image may hold other versions than
# setup.py's tested ranges; step 0 prints the ones that ran. Each step has its own time limit
# (60 + 150 + 180 + 150 s, plus start-up), so one failure cannot eat the others' time.
set -uo pipefail
PLATFORM=gpu
OUT_DIR="${OUT:-/tmp/bigjax_gpu}"
DRY_RUN="${BIGJAX_GPU_DRY_RUN:-0}"
source "$(dirname "$0")/device_run.sh"
if [ "$DRY_RUN" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT_DIR/nvidia-smi.csv"
fi

# A dry run keeps every flag below and appends toy sizes (later flags win), so the presets, flags
# and record fields the GPU run uses are the ones it exercises.
ATTENTION_TOY=() GPT_TOY=() LLAMA_TOY=() RESNET_TOY=()
if [ "$DRY_RUN" = 1 ]; then
  ATTENTION_TOY=(--check_seq_len=128)
  TOY=(--bench_warmup=0 --bench_steps=1 --peak_matmul_size=256)
  GPT_TOY=(--model_override=num_layers=2 --batch_size=1 --seq_len=64 --document_len=16 "${TOY[@]}")
  LLAMA_TOY=("${TOY_LLAMA[@]}" --batch_size=1 --seq_len=64 --document_len=16 "${TOY[@]}")
  # One bottleneck block per stage: every kind of block and stride the 3-4-6-3 stack has, at a
  # fifth of its compile time on the CPU.
  RESNET_TOY=(--batch_size=2 --image_size=32 --model_override=stage_sizes=1,1,1,1 "${TOY[@]}")
fi

run attention_check 60 benchmarks.attention_check "${ATTENTION_TOY[@]}"

# Batch 32 x 1024 tokens. The vocabulary is padded from 50257 to 50304 (a multiple of 128, as
# nanoGPT does) so the logits matmul tiles evenly; the FLOP count uses the padded size.
run gpt2_medium_bf16 150 benchmarks.throughput --model=gpt2-medium --dtype=bfloat16 \
    --model_override=vocab_size=50304 --batch_size=32 --seq_len=1024 --bench_warmup=3 --bench_steps=10 \
    "${GPT_TOY[@]}"

# Batch 8 x 2048 tokens, documents of 512 tokens on average; the 16 layers scanned (one compiled).
run llama3_2_1b_bf16 180 benchmarks.throughput --model=llama3.2-1b --dtype=bfloat16 --scan_layers \
    --batch_size=8 --seq_len=2048 --bench_warmup=3 --bench_steps=10 "${LLAMA_TOY[@]}"

run resnet50_bf16 150 benchmarks.throughput --model=resnet50 --dtype=bfloat16 --batch_size=256 \
    --bench_warmup=3 --bench_steps=10 "${RESNET_TOY[@]}"

finish
