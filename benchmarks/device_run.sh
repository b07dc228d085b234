# Sourced by gpu.sh and tpu.sh after they set PLATFORM (gpu or tpu), DRY_RUN (1: toy sizes on the
# CPU) and OUT_DIR: prints the versions that run (failing when JAX does not see the platform) and
# defines `run`, `FAILED` and `finish`.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
if [ "$DRY_RUN" = 1 ]; then
  export JAX_PLATFORMS=cpu
fi

python - "$DRY_RUN" "$PLATFORM" <<'PYTHON' | tee "$OUT_DIR/versions.txt" || exit 1
import importlib.metadata
import platform
import sys
import jax
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy")
versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names)
print(f"python {platform.python_version()}: {versions}; devices {jax.devices()}", flush=True)
dry_run, wanted = sys.argv[1] == "1", sys.argv[2]
if not dry_run and jax.default_backend() != wanted:
  install = {"gpu": "jax[cuda12] (or cuda13)", "tpu": "jax[tpu]"}[wanted]
  sys.exit(f"error: JAX sees no {wanted.upper()}; install {install} on this machine")
PYTHON

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

# A dry run's Llama: the preset's structure (grouped heads, rotary, gated MLP) at toy widths.
TOY_LLAMA=(--model_override=num_layers=2 --model_override=embed_dim=64 --model_override=mlp_dim=128
           --model_override=num_heads=4 --model_override=num_kv_heads=2 --model_override=head_dim=16
           --model_override=vocab_size=512)

# finish: exit 1 naming the failed steps, if any.
finish() {
  if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "== failed: ${FAILED[*]}"
    exit 1
  fi
}
