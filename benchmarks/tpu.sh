#!/usr/bin/env bash
# One prepared run on a single Cloud TPU host (all its chips; v4, v5e, v5p, v6e) that fits in 10
# minutes, gpu.sh's counterpart:
#   0. the versions that run, and Pallas' splash attention (bigjax.ops.attention's TPU kernel)
#      checked against bigjax's reference attention (output and gradients, bfloat16, GPT-2
#      medium's shapes, unpacked and over packed documents with padding; attention_check.py);
#   1. MFU of gpt2-medium training in bfloat16 on packed windows, data-parallel over the chips;
#   2. the same for llama3.2-1b (grouped-query attention, 2048-token windows), fully sharded;
#      each record names the attention implementation picked (splash for self-attention of a
#      multiple of 128 tokens) and its pallas_tpu_calls count the kernels the compiled step holds;
#   3. ResNet-50 training images/s at 224x224 in bfloat16.
#
#   bash benchmarks/tpu.sh                       # JSON lines on stdout, copies under $OUT (default /tmp/bigjax_tpu)
#   BIGJAX_TPU_DRY_RUN=1 bash benchmarks/tpu.sh  # the same steps at toy sizes on the CPU, splash
#                                                # attention in Pallas' interpret mode
#
# Like gpu.sh it installs nothing and runs from this checkout: it needs jax[tpu], flax, optax,
# orbax-checkpoint and absl-py. Each step has its own time limit (90 + 150 + 180 + 150 s, plus
# start-up; TPU compiles are slower than GPU ones).
set -uo pipefail
PLATFORM=tpu
OUT_DIR="${OUT:-/tmp/bigjax_tpu}"
DRY_RUN="${BIGJAX_TPU_DRY_RUN:-0}"
source "$(dirname "$0")/device_run.sh"

# As in gpu.sh, a dry run appends toy sizes to the same flags (later flags win). On the CPU the
# attention check names splash itself: there the automatic choice would be XLA's.
ATTENTION_TOY=() GPT_TOY=() LLAMA_TOY=() RESNET_TOY=()
if [ "$DRY_RUN" = 1 ]; then
  ATTENTION_TOY=(--check_seq_len=128 --attention_implementation=splash)
  TOY=(--bench_warmup=0 --bench_steps=1 --peak_matmul_size=256)
  GPT_TOY=(--model_override=num_layers=2 --batch_size=2 --seq_len=64 --document_len=16 "${TOY[@]}")
  LLAMA_TOY=("${TOY_LLAMA[@]}" --batch_size=2 --seq_len=64 --document_len=16 "${TOY[@]}")
  RESNET_TOY=(--batch_size=2 --image_size=32 --model_override=stage_sizes=1,1,1,1 "${TOY[@]}")
fi

run attention_check 90 benchmarks.attention_check "${ATTENTION_TOY[@]}"

# Batch 64 x 1024 tokens over the host's chips (8 sequences per chip on an 8-chip host).
run gpt2_medium_bf16 150 benchmarks.throughput --model=gpt2-medium --dtype=bfloat16 \
    --model_override=vocab_size=50304 --batch_size=64 --seq_len=1024 --bench_warmup=3 --bench_steps=10 \
    "${GPT_TOY[@]}"

# Batch 16 x 2048 tokens, parameters and optimizer state sharded over every chip (fsdp).
run llama3_2_1b_bf16 180 benchmarks.throughput --model=llama3.2-1b --dtype=bfloat16 --scan_layers \
    --mesh=data:1,fsdp:-1 --batch_size=16 --seq_len=2048 --bench_warmup=3 --bench_steps=10 \
    "${LLAMA_TOY[@]}"

run resnet50_bf16 150 benchmarks.throughput --model=resnet50 --dtype=bfloat16 --batch_size=256 \
    --bench_warmup=3 --bench_steps=10 "${RESNET_TOY[@]}"

finish
