"""Flags that every experiment shares (same names everywhere), and the one-line-error entry point.

Importing this module defines the flags; experiments add their own beside them and turn the parsed
values into typed configs with the `*_config()` helpers.
"""

import ast
import contextlib
import dataclasses
import importlib
import logging as python_logging
import os
import re
import sys
from typing import Any

import jax
from absl import app
from absl import flags
from absl import logging

from bigjax import checkpoint
from bigjax import host_memory
from bigjax import metrics
from bigjax import models
from bigjax import optim
from bigjax import run as run_lib
from bigjax import sharding
from bigjax import storage
from bigjax import tasks
from bigjax import train
from bigjax import workdir as workdir_lib
from bigjax.errors import UserError
from bigjax.interop import hf
from bigjax.nn import lora as lora_lib

# What and where.
MODE = flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "eval", "sample", "export"],
    "train (resuming from --workdir), eval (the newest checkpoint), sample "
    "(language models: generate from --prompt), or export (parameters and model "
    "config of the newest checkpoint to --export_dir, as --export_format says).",
)
INIT_FROM = flags.DEFINE_string(
    "init_from",
    None,
    "Start a fresh run from the parameters of an export "
    "directory, of a workdir's newest checkpoint, or of a Hugging Face model directory "
    "(config.json + safetensors; its architecture then needs no --model) to fine-tune.",
)
EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: where to write the model.")
EXPORT_FORMAT = flags.DEFINE_enum(
    "export_format",
    "bigjax",
    ["bigjax", "hf"],
    "--mode=export: bigjax (what bigjax.models.load and "
    "--init_from read) or hf (a Hugging Face directory, config.json and model.safetensors, for transformers' "
    "from_pretrained; Transformer language models of the gpt2, llama, qwen2 and qwen3 families).",
)
MODEL = flags.DEFINE_string("model", None, "Model preset name (see bigjax.models.names()).")
TASK = flags.DEFINE_string(
    "task",
    "",
    "A task registered with bigjax.tasks.register (in a module --import_modules imports) in place "
    "of the experiment's own (language modelling, classification); it is given that one to reuse.",
)
IMPORT_MODULES = flags.DEFINE_list(
    "import_modules",
    [],
    "Python modules to import before anything is built, "
    "e.g. your own that register presets with bigjax.models.register "
    "(my_fork.models: importable from the current directory or PYTHONPATH).",
)
MODEL_OVERRIDES = flags.DEFINE_multi_string(
    "model_override", [], "Replace one field of the preset's config, as name=value (repeatable)."
)
DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "TFDS NAME[/CONFIG][:VERSION], or your own files: textfiles:GLOB "
    "(a document per file), textlines:GLOB (per line), imagefolder:DIR (DIR/CLASS/IMAGE), "
    "jsonl:GLOB (a JSON object per line; .gz, .zst too), parquet:GLOB (a row each); or a weighted "
    "mixture of those: mix:SOURCE@WEIGHT,SOURCE@WEIGHT,... (each item split at its last @; no "
    "comma inside a source).",
)
DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "TFDS data directory (default ~/tensorflow_datasets); its bigjax_index/ keeps the row indexes "
    "of JSON Lines files in folders bigjax cannot write to.",
)
TRAIN_SPLIT = flags.DEFINE_string(
    "train_split", "train", "Split to train on, in TFDS syntax (train[:90%])."
)
EVAL_SPLIT = flags.DEFINE_string(
    "eval_split", None, "Split to evaluate on (default: validation, else test)."
)
TEXT_KEY = flags.DEFINE_string(
    "text_key", None, "Feature holding the text (default: text, bytes or content)."
)
IMAGE_KEY = flags.DEFINE_string("image_key", "image", "Feature holding the image.")
LABEL_KEY = flags.DEFINE_string("label_key", "label", "Feature holding the class label.")
DATA_WORKERS = flags.DEFINE_integer(
    "data_workers",
    None,
    "Loader processes reading ahead; 0 reads in this "
    "process (threads). Default: an eighth of the CPU cores, at most 8.",
    lower_bound=0,
)
WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Run directory: checkpoints and metrics.jsonl. " "Rerunning with the same workdir resumes.",
)
# How long and how much.
NUM_STEPS = flags.DEFINE_integer("num_steps", 1000, "Optimizer steps.", lower_bound=1)
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Global batch size (over all devices and processes).", lower_bound=1
)
SEED = flags.DEFINE_integer("seed", 0, "Seed for initialisation, dropout and data order.")
MESH = flags.DEFINE_string(
    "mesh",
    "data:-1,fsdp:1,tensor:1",
    "Device mesh as axis:size pairs over data, fsdp, tensor; -1 takes the rest.",
)
DTYPE = flags.DEFINE_enum(
    "dtype",
    "auto",
    ["auto", "float32", "bfloat16", "float16"],
    "Compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU. Losses and softmax "
    "are float32 either way.",
)
PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype",
    "float32",
    ["float32", "bfloat16"],
    "Parameter (and optimizer state) storage dtype.",
)
# Scale: memory, many processes, an ahead-of-time check.
GRAD_ACCUM = flags.DEFINE_integer(
    "grad_accum",
    1,
    "Micro-batches per optimizer step (gradients summed); "
    "--batch_size stays the global batch per step.",
    lower_bound=1,
)
REMAT = flags.DEFINE_enum(
    "remat",
    "none",
    ["none", "full", "dots", "dots_no_batch"],
    "Transformer blocks: recompute activations in the backward pass; full keeps only "
    "block inputs, dots keeps matmul outputs, dots_no_batch also recomputes attention's.",
)
SCAN_LAYERS = flags.DEFINE_bool(
    "scan_layers",
    False,
    "Transformer blocks: one block under nn.scan with "
    "stacked parameters; compiles num_layers times faster.",
)
COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only",
    False,
    "Compile the train step for --mesh and --batch_size, "
    "print the FLOPs and memory per device and the parameter shardings, and exit.",
)
SHOW_SHARDING = flags.DEFINE_bool(
    "show_sharding", False, "Print every parameter's shape and sharding " "before training."
)
XLA_OPTIONS = flags.DEFINE_multi_string(
    "xla_option",
    [],
    "NAME=VALUE: an XLA compiler option for the jitted init, train and eval steps "
    "(repeatable; the last value of a name wins; true/false become booleans, any other value goes to XLA "
    "as text, which XLA parses as its option's type). xla_cpu_* options apply only on CPU, xla_gpu_* only "
    "on GPU, xla_tpu_* only on TPU. On CPU, xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE "
    "runs matmuls on XLA's own kernels instead of YNNPACK: faster for Transformers, slower for ResNets "
    "(benchmarks/README.md); XLA's default is LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE.",
)
COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/bigjax/xla"),
    "Persistent XLA compilation cache: a rerun, resume or eval with the same shapes loads its compiled "
    "steps instead of compiling again. Empty turns it off. Defaults to $JAX_COMPILATION_CACHE_DIR where "
    "that is set; programs that compile in under 1 s are not stored unless "
    "$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise.",
)
COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-process runs: host:port of process 0. Without it, TPU pods, SLURM, "
    "Open MPI and Kubernetes are detected by JAX itself.",
)
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-process runs: how many processes.", lower_bound=1
)
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-process runs: this process's index.", lower_bound=0
)
# Optimizer.
OPTIMIZER = flags.DEFINE_enum("optimizer", "adamw", list(optim.OPTIMIZERS), "Optimizer.")
LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate.")
SCHEDULE = flags.DEFINE_enum(
    "schedule", "warmup_cosine", list(optim.SCHEDULES), "Learning-rate schedule."
)
WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.", lower_bound=0)
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (matrices only).")
GRAD_CLIP = flags.DEFINE_float("grad_clip", 1.0, "Clip gradients to this global norm; 0 disables.")
MOMENTUM = flags.DEFINE_float(
    "momentum", 0.9, "SGD momentum; first-moment decay b1 of adamw and lion."
)
NESTEROV = flags.DEFINE_bool("nesterov", False, "Nesterov momentum for sgd.")
FREEZE = flags.DEFINE_multi_string(
    "freeze",
    [],
    "Regular expression (repeatable) searched in parameter paths (block_0/attn/query/kernel; "
    "blocks/... under --scan_layers): matching parameters stay unchanged bit for bit and keep no optimizer state.",
)
LR_MULTIPLIER = flags.DEFINE_multi_string(
    "lr_multiplier",
    [],
    "REGEX=FACTOR (repeatable): parameters whose path matches train with FACTOR times the "
    "learning rate; the first matching pattern wins.",
)
WD_MULTIPLIER = flags.DEFINE_multi_string(
    "wd_multiplier",
    [],
    "REGEX=FACTOR (repeatable): parameters whose path matches decay with FACTOR times "
    "--weight_decay (which still leaves vectors alone); the first matching pattern wins.",
)
EMA_DECAY = flags.DEFINE_float(
    "ema_decay",
    0.0,
    "Keep an exponential moving average of the parameters with this "
    "decay (0.999: over about the last 1000 steps), sharded and checkpointed with them; "
    "0 keeps none.",
)
EVAL_WITH_EMA = flags.DEFINE_bool(
    "eval_with_ema", False, "Evaluate the --ema_decay average, not the parameters."
)
EXPORT_EMA = flags.DEFINE_bool(
    "export_ema", False, "--mode=export: export the --ema_decay average."
)
LORA_RANK = flags.DEFINE_integer(
    "lora_rank",
    0,
    "Train low-rank adapters of this rank on the --lora_targets "
    "projections, with every other parameter frozen; 0 trains the model itself. "
    "--mode=export merges them into the weights.",
    lower_bound=0,
)
LORA_ALPHA = flags.DEFINE_float(
    "lora_alpha",
    None,
    "The adapters' update is scaled by lora_alpha / lora_rank; " "default: the rank (scale 1).",
)
LORA_TARGETS = flags.DEFINE_string(
    "lora_targets",
    lora_lib.DEFAULT_TARGETS,
    "Regular expression searched in "
    "kernel paths (block_0/mlp/wi/kernel): the projections to adapt; default: "
    "the attention and MLP projections of Transformer blocks.",
)
LORA_DROPOUT = flags.DEFINE_float(
    "lora_dropout", 0.0, "Dropout on the adapters' inputs while training."
)
LABEL_SMOOTHING = flags.DEFINE_float(
    "label_smoothing",
    0.0,
    "Train on targets that put this much probability "
    "spread evenly over all classes (the plain loss is still reported).",
)
Z_LOSS = flags.DEFINE_float(
    "z_loss",
    0.0,
    "Weight of the log(Z)^2 term added to the trained loss (PaLM: 1e-4), "
    "Z the softmax normaliser; its mean is reported as log_z_squared.",
)
ADAM_B2 = flags.DEFINE_float(
    "adam_b2", 0.999, "Second-moment decay of adamw; 0.95-0.99 adapts faster in short runs."
)
# Logging, evaluation, checkpoints.
LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Log train metrics every N steps.", lower_bound=1)
EVAL_EVERY = flags.DEFINE_integer(
    "eval_every", 500, "Evaluate every N steps (and at the end).", lower_bound=1
)
EVAL_BATCHES = flags.DEFINE_integer(
    "eval_batches",
    0,
    "Batches per evaluation (a fixed random sample); " "0 evaluates the whole split.",
    lower_bound=0,
)
CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every",
    500,
    "Checkpoint every N steps (and at the end); " "0 saves only at the end.",
    lower_bound=0,
)
KEEP_CHECKPOINTS = flags.DEFINE_integer(
    "keep_checkpoints", 3, "Newest checkpoints to keep.", lower_bound=1
)
ALLOW_RESTART = flags.DEFINE_bool(
    "allow_restart",
    False,
    "When every checkpoint in --workdir is unreadable, set "
    "them aside (renamed, with the earlier metrics) and train again from step 0; "
    "without it that is an error and nothing is touched.",
)
ALLOW_NEW_DATA = flags.DEFINE_bool(
    "allow_new_data",
    False,
    "Resume a checkpoint whose batches came from other data (another --dataset, --seed, "
    "--batch_size, --seq_len, tokenizer or mixture): its batch position continues on the new "
    "data; without it that is an error.",
)
KEEP_BEST_METRIC = flags.DEFINE_string(
    "keep_best_metric",
    None,
    "Also keep the checkpoint with the best value "
    "of this eval metric (eval_loss: lowest; eval_accuracy: highest).",
)
PROFILE_STEPS = flags.DEFINE_string(
    "profile_steps",
    None,
    "START:END: write a jax.profiler trace of training steps START to END - 1 (END not included: "
    "10:13 traces steps 10, 11 and 12; steps count from 1, as the console lines do) into "
    "WORKDIR/profile/process_N, one directory per process; open it with "
    'xprof --logdir=WORKDIR/profile (pip install -e ".[profile]").',
)
WANDB_PROJECT = flags.DEFINE_string(
    "wandb_project",
    None,
    "Also send the metrics to a Weights & Biases run in this project "
    '(pip install -e ".[wandb]"), with the flags as its config; a resumed run continues the same '
    "W&B run. wandb's environment variables apply: WANDB_MODE=offline writes the run locally, "
    "WANDB_ENTITY, WANDB_API_KEY, and WANDB_DIR for its local files (default: the workdir).",
)


def train_config() -> train.TrainConfig:
  return train.TrainConfig(
      workdir=WORKDIR.value,
      num_steps=NUM_STEPS.value,
      batch_size=BATCH_SIZE.value,
      seed=SEED.value,
      log_every=LOG_EVERY.value,
      eval_every=EVAL_EVERY.value,
      checkpoint_every=CHECKPOINT_EVERY.value,
      keep_checkpoints=KEEP_CHECKPOINTS.value,
      init_from=INIT_FROM.value,
      keep_best_metric=KEEP_BEST_METRIC.value,
      grad_accum=GRAD_ACCUM.value,
      xla_options=xla_options(),
      allow_restart=ALLOW_RESTART.value,
      allow_new_data=ALLOW_NEW_DATA.value,
      eval_with_ema=EVAL_WITH_EMA.value,
      profile_steps=profile_steps(),
      wandb=wandb_config(),
  )


def profile_steps() -> tuple[int, int] | None:
  """--profile_steps=START:END as (START, END); TrainConfig checks the range."""
  text = PROFILE_STEPS.value
  if not text:
    return None
  start, sep, end = text.partition(":")
  try:
    if sep:
      return int(start), int(end)
  except ValueError:
    pass
  raise UserError(
      f"--profile_steps={text!r} must look like START:END, e.g. --profile_steps=10:13 (steps 10, "
      "11 and 12)"
  )


def wandb_config() -> metrics.WandbConfig | None:
  """--wandb_project's run, with the run's flags as its config; None without it."""
  if not WANDB_PROJECT.value:
    return None
  return metrics.WandbConfig(project=WANDB_PROJECT.value, config=run_flag_values())


def xla_options(holder: flags.FlagHolder = XLA_OPTIONS) -> dict[str, Any]:
  """--xla_option's (or another multi-flag's) NAME=VALUE pairs as XLA compiler options. XLA parses
  text values as each option's type (int, float, enum, string) but wants booleans as bools."""
  options = {}
  for item in holder.value:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
      raise UserError(f"--{holder.name}={item!r} must look like NAME=VALUE (VALUE may be empty)")
    options[name.strip()] = _option_value(value.strip())
  return options


def _option_value(text: str):
  return text.lower() == "true" if text.lower() in ("true", "false") else text


def optim_config() -> optim.OptimConfig:
  return optim.OptimConfig(
      optimizer=OPTIMIZER.value,
      learning_rate=LEARNING_RATE.value,
      schedule=SCHEDULE.value,
      warmup_steps=WARMUP_STEPS.value,
      weight_decay=WEIGHT_DECAY.value,
      grad_clip=GRAD_CLIP.value,
      momentum=MOMENTUM.value,
      nesterov=NESTEROV.value,
      b2=ADAM_B2.value,
      freeze=tuple(FREEZE.value),
      lr_multipliers=_pattern_factors(LR_MULTIPLIER),
      wd_multipliers=_pattern_factors(WD_MULTIPLIER),
      ema_decay=EMA_DECAY.value,
      trainable=(lora_lib.ADAPTER_PATTERN,) if LORA_RANK.value else (),
  )


def lora_config() -> lora_lib.LoraConfig | None:
  """The --lora_* flags' adapters; None without --lora_rank."""
  if not LORA_RANK.value:
    for holder in (
        LORA_ALPHA,
        LORA_DROPOUT,
    ):  # a saved flags.txt repeats the defaults: only values count
      if holder.value != holder.default:
        raise UserError(f"--{holder.name} needs --lora_rank > 0 (the adapters' rank)")
    return None
  return lora_lib.LoraConfig(
      rank=LORA_RANK.value,
      alpha=LORA_ALPHA.value,
      targets=LORA_TARGETS.value,
      dropout=LORA_DROPOUT.value,
  )


def _pattern_factors(holder: flags.FlagHolder) -> tuple[tuple[str, float], ...]:
  """REGEX=FACTOR values as (regex, factor) pairs; the last "=" splits, so a pattern may hold one."""
  pairs = []
  for value in holder.value:
    pattern, sep, factor = value.rpartition("=")
    try:
      pairs.append((pattern, float(factor)))
    except ValueError:
      sep = ""
    if not sep or not pattern:
      raise UserError(
          f"--{holder.name}={value!r} must be REGEX=FACTOR, e.g. --{holder.name}='embed=0.1'"
      )
  return tuple(pairs)


def loss_config() -> tasks.Losses:
  return tasks.Losses(label_smoothing=LABEL_SMOOTHING.value, z_loss=Z_LOSS.value)


def model_overrides() -> dict:
  """--model_override name=value pairs, values parsed as Python literals where they are one,
  plus --dtype, --param_dtype, and --remat / --scan_layers when set."""
  overrides = {"dtype": compute_dtype(), "param_dtype": PARAM_DTYPE.value}
  if REMAT.value != "none":
    overrides["remat"] = REMAT.value
  if SCAN_LAYERS.value:
    overrides["scan_layers"] = True
  for item in MODEL_OVERRIDES.value:
    name, sep, value = item.partition("=")
    if not sep:
      raise UserError(f"--model_override={item!r} must look like name=value")
    try:
      overrides[name.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[name.strip()] = value.strip()
  return overrides


def compute_dtype() -> str:
  """--dtype, with auto resolved: bfloat16 where the matrix units want it, float32 on CPU."""
  if DTYPE.value != "auto":
    return DTYPE.value
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# What a run holds until its process ends (the workdir's lock): closed by `run`.
_RUN_RESOURCES = contextlib.ExitStack()


def local_data_dir() -> str | None:
  """--data_dir, or for one on a bucket its local copy of --dataset's files (made or completed on
  first use, on every host): TFDS's ArrayRecord reader takes local files only, and a local disk
  is where a training loop's reads should come from anyway."""
  if not (DATA_DIR.value and storage.is_remote(DATA_DIR.value)):
    return DATA_DIR.value
  remote = DATA_DIR.value.rstrip("/")
  local = os.path.join(storage.local_cache_root(), "data", remote.replace("://", "/", 1))
  # NAME[/CONFIG][:VERSION]: the data set's directory (own files, `textfiles:...`, have none)
  name = DATASET.value.partition(":")[0]
  source = f"{remote}/{name}"
  if DATASET.value and storage.is_dir(source):
    storage.local_mirror(source, os.path.join(local, name), progress=metrics.console)
  return local


def check_remote_paths() -> None:
  """--workdir, --export_dir and --init_from on an object store (gs://) answer within
  storage.REACH_TIMEOUT_S: a write to the first two, a read of the third and of --data_dir."""
  for flag, writes in ((WORKDIR, True), (EXPORT_DIR, True), (INIT_FROM, False), (DATA_DIR, False)):
    if flag.value and storage.is_remote(flag.value):
      try:
        storage.check_reachable(flag.value, write=writes)
      except UserError as e:
        raise UserError(f"--{flag.name}: {e}") from None


def experiment() -> run_lib.Experiment:
  """Starts the multi-process runtime if this is one process of many, checks the required flags,
  claims the workdir for a training run (before anything, a tokenizer included, is written there),
  logs the devices, and builds the model, mesh and configs."""
  sharding.initialize_distributed(COORDINATOR_ADDRESS.value, NUM_PROCESSES.value, PROCESS_ID.value)
  # --init_from a Hugging Face directory or an export gives the architecture: no --model needed
  check_remote_paths()  # first: an unreachable bucket is one line, not minutes of retries
  require(*([] if hf_init_dir() or _takes_export_model() else [MODEL]), DATASET, WORKDIR)
  model = build_model()  # before the claim: a model that cannot be built leaves no workdir behind
  if TASK.value:
    tasks.check_registered(TASK.value)
  adapters = lora_config()
  if adapters is not None:
    model = lora_lib.Lora(model, adapters)
  if MODE.value == "train" and not COMPILE_ONLY.value:
    _RUN_RESOURCES.enter_context(workdir_lib.claim(WORKDIR.value))
  log_devices()
  return run_lib.Experiment(
      model=model,
      mesh=sharding.make_mesh(MESH.value),
      config=train_config(),
      optim=optim_config(),
      dataset=DATASET.value,
      data_dir=local_data_dir(),
      losses=loss_config(),
      run_config=run_config(lora_lib.base_of(model)),
  )


def run_config(base_model) -> run_lib.RunConfig:
  """--mode and what it needs, --task, and what an export and a training run record of the flags."""
  if MODE.value == "export":
    require(EXPORT_DIR)
  exports_bigjax = MODE.value == "export" and EXPORT_FORMAT.value == "bigjax"
  return run_lib.RunConfig(
      mode=MODE.value,
      task=TASK.value,
      export_dir=EXPORT_DIR.value,
      export_format=EXPORT_FORMAT.value,
      export_ema=EXPORT_EMA.value,
      compile_only=COMPILE_ONLY.value,
      show_sharding=SHOW_SHARDING.value,
      # Only a bigjax export needs it, and a model without a preset has none.
      model_identity=model_identity(base_model) if exports_bigjax else None,
      flags_text=run_flags_text(),
  )


# Config fields a run sets for itself when its architecture comes from a Hugging Face config.json:
# how it computes, stores and initialises, not what it computes (a shorter context, a ResNet's image
# size are choices too).
_RUN_FIELDS = (
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "dropout_rate",
    "max_len",
    "conv_impl",
    "zero_init_residual",
)


def hf_init_dir() -> str | None:
  """--init_from when it names a Hugging Face model directory (one with config.json), else None."""
  if not INIT_FROM.value:
    return None
  path = storage.absolute(INIT_FROM.value)
  return path if hf.is_hf_directory(path) else None


def _takes_export_model() -> bool:
  return not MODEL.value and bool(INIT_FROM.value) and checkpoint.is_export(INIT_FROM.value)


def _preset_and_overrides() -> tuple[str, dict]:
  """--model and its overrides; without --model, an --init_from export's model with the run's
  overrides on top (a run field such as remat, or any other: the parameters' shapes are checked)."""
  if _takes_export_model():
    name, overrides = checkpoint.read_export_identity(INIT_FROM.value)
    return name, {**overrides, **model_overrides()}
  require(MODEL)
  return MODEL.value, model_overrides()


def build_model():
  """--model with its overrides (or an --init_from export's, see _preset_and_overrides); or, with
  --init_from a Hugging Face directory, the architecture its config.json gives (a --model beside it
  must agree with it)."""
  hf_dir = hf_init_dir()
  if hf_dir is None:
    name, overrides = _preset_and_overrides()
    return models.create(name, **overrides)
  cfg = hf.check(hf_dir, **model_overrides())
  if MODEL.value:
    _check_same_architecture(models.create(MODEL.value, **model_overrides()), cfg, hf_dir)
  return hf.module_for(cfg)


def _check_same_architecture(preset, cfg, hf_dir: str) -> None:
  leave_out = "leave --model out to take the architecture from config.json"
  preset_cfg = getattr(preset, "config", None)
  if type(preset_cfg) is not type(cfg):
    raise UserError(
        f"--model={MODEL.value} is a {type(preset).__name__} but --init_from={hf_dir} holds a "
        f"{type(hf.module_for(cfg)).__name__}; {leave_out}"
    )
  for field in dataclasses.fields(cfg):
    ours, theirs = getattr(preset_cfg, field.name), getattr(cfg, field.name)
    if field.name not in _RUN_FIELDS and ours != theirs:
      raise UserError(
          f"--model={MODEL.value} has {field.name}={ours!r} but {hf_dir}/{hf.CONFIG} gives "
          f"{theirs!r}; {leave_out}"
      )


def model_identity(model) -> tuple[str, dict]:
  """(preset, overrides) that rebuild `model` from an export: --model and its overrides, or for an
  architecture from a Hugging Face config.json the plain preset of its kind with every field."""
  if hf_init_dir() is None:
    return _preset_and_overrides()
  return models.full_config_preset(model), dataclasses.asdict(model.config)


def _run_flags(flag_values: flags.FlagValues) -> list[flags.Flag]:
  """Every flag of bigjax and the experiment, set or not, and each flag of another module (absl,
  grain, TFDS, Orbax) only where the run set it: the libraries' defaults are not part of the
  experiment, and listing them buried its flags among ~20 of absl's and grain's."""
  run_flags = []
  for module, module_flags in sorted(flag_values.flags_by_module_dict().items()):
    ours = module.split(".")[0] in ("bigjax", "experiments") or module == sys.argv[0]
    run_flags += [
        flag
        for flag in sorted(module_flags, key=lambda flag: flag.name)
        if (ours or flag.present) and flag.value is not None
    ]
  return run_flags


# Overrides for one rerun, left out of WORKDIR/flags.txt: a rerun through that flagfile would
# otherwise keep the check they override switched off for good.
ONE_RUN_FLAGS = ("allow_new_data", "allow_restart")


def run_flags_text(flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The run's flags (see _run_flags) but ONE_RUN_FLAGS, one line each, as a flagfile takes them."""
  return "".join(
      flag.serialize() + "\n" for flag in _run_flags(flag_values) if flag.name not in ONE_RUN_FLAGS
  )


def run_flag_values(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  """The run's flags (see _run_flags) by name, as a metrics service records a run's config."""
  return {flag.name: flag.value for flag in _run_flags(flag_values)}


def require(*required: flags.FlagHolder) -> None:
  missing = [f"--{holder.name}" for holder in required if holder.value in (None, "")]
  if missing:
    raise UserError(f"missing required flag(s) {', '.join(missing)}")


def log_devices() -> None:
  metrics.console(
      f"JAX {jax.__version__}: process {jax.process_index()} of {jax.process_count()}, "
      f"{jax.local_device_count()} local / {jax.device_count()} global devices "
      f"({jax.devices()[0].device_kind})"
  )


def _parse_flags_or_exit(argv):
  """absl's parser, but a bad flag or flagfile is one line on stderr and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).removeprefix("ERROR:: ")  # absl's own prefix, for a flagfile it cannot open
    if "Unable to open flagfile" in message:
      message += f" (a relative path is read from the current directory, {os.getcwd()})"
    sys.stderr.write(f"error: {message}\n")
    sys.exit(2)


def import_modules(names: list[str]) -> None:
  """Imports each module (--import_modules), so that the presets it registers can be built."""
  for name in names:
    try:
      importlib.import_module(name)
    except ModuleNotFoundError as e:
      raise UserError(
          f"--import_modules: cannot import {name!r} ({e}); run from the directory that holds it "
          f"or add that directory to PYTHONPATH"
      ) from None


def _without_orbax_errors(record) -> bool:
  """Orbax logs each failed save or restore with its traceback from every thread it touched, and
  raises it too: bigjax turns what it raises into one line (or re-raises what it cannot explain).
  The reads that failed beside the raised one end as Orbax tasks whose exception nobody retrieved,
  which asyncio logs when they are collected."""
  orbax = f"{os.sep}orbax{os.sep}"
  return not (
      record.levelno >= python_logging.ERROR
      and (
          orbax in record.pathname
          or (record.name == "asyncio" and _is_an_orbax_task_never_retrieved(record.getMessage()))
      )
  )


def _is_an_orbax_task_never_retrieved(message: str) -> bool:
  """asyncio's message names the task's coroutine: `coro=<NAME() done, defined at FILE:LINE>`."""
  first, _, future = message.partition("\n")
  coroutine = re.search(r"coro=<[^<>]* defined at ([^<>]*)>", future)
  return (
      first == "Task exception was never retrieved"
      and coroutine is not None
      and f"{os.sep}orbax{os.sep}" in coroutine.group(1)
  )


def _is_a_late_wake_up_of_a_closed_loop(unraisable) -> bool:
  """TensorStore wakes an awaiting asyncio loop through `loop.call_soon_threadsafe` from its own
  threads when a read finishes; the reads still running after Orbax's restore failed finish after
  Orbax closed that loop, and TensorStore reports each refused wake-up as unraisable (object None).
  """
  tb = unraisable.exc_traceback
  return (
      unraisable.object is None
      and isinstance(unraisable.exc_value, RuntimeError)
      and tb is not None
      and str(unraisable.exc_value) == "Event loop is closed"
      and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
      and f"{os.sep}asyncio{os.sep}" in tb.tb_frame.f_code.co_filename
  )


def _drop_orbax_coroutine_errors(default_hook):
  """An unraisable-exception hook that drops what a failed Orbax restore leaves behind: its read
  coroutines left failing, and TensorStore's wake-ups of the event loop Orbax closed. Orbax raised
  the first error, which bigjax reports in one line; Python would otherwise print a traceback for
  each of these as the process exits."""

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    if _is_a_late_wake_up_of_a_closed_loop(unraisable):
      return
    default_hook(unraisable)

  return hook


def run(main) -> None:
  """app.run(main) where a UserError anywhere becomes `error: <message>` and exit code 1, with
  bigjax.host_memory's settings applied first (before JAX starts its CPU backend)."""
  host_memory.keep_freed_host_memory()

  def guarded(argv):
    # Orbax and TFDS log every action at INFO; show warnings and up unless --verbosity asks for more.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_without_orbax_errors)
    python_logging.getLogger("asyncio").addFilter(_without_orbax_errors)
    sys.unraisablehook = _drop_orbax_coroutine_errors(sys.unraisablehook)
    try:
      import_modules(IMPORT_MODULES.value)
      if COMPILATION_CACHE_DIR.value:
        train.enable_compilation_cache(COMPILATION_CACHE_DIR.value)
      else:  # off means off, even where JAX itself found $JAX_COMPILATION_CACHE_DIR
        jax.config.update("jax_enable_compilation_cache", False)
      with _RUN_RESOURCES:
        main(argv)
    except UserError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(1)

  app.run(guarded, flags_parser=_parse_flags_or_exit)
