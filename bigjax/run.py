"""The run: what an experiment does with its model, data and configs (train, evaluate, export, or
compile only), one library function that the CLI (through bigjax.flags) and a script or notebook
call alike, with every choice in the configs it is given.

    exp = run.Experiment(model=..., mesh=..., config=train.TrainConfig(...), optim=optim.OptimConfig(...),
                         dataset="python_stdlib_text", data_dir=None,
                         run_config=run.RunConfig(mode="train"))
    run.run(exp, task=tasks.LanguageModelling(), train_data=..., eval_data=...)
"""

import dataclasses
import os
from typing import Any

import jax

from bigjax import checkpoint
from bigjax import config_checks as checks
from bigjax import metrics
from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax import workdir as workdir_lib
from bigjax.errors import UserError
from bigjax.interop import hf
from bigjax.nn import lora

MODES = ("train", "eval", "sample", "export")  # sample: language-model experiments, before run
EXPORT_FORMATS = ("bigjax", "hf")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What to do: `mode` train (resuming from the workdir's checkpoint), eval (the newest
  checkpoint, or --init_from's model before there is one) or export (the newest checkpoint to
  `export_dir`, in `export_format`, its parameter average with `export_ema`); with
  `compile_only`, compile the train step and report its memory instead of training.

  Attributes:
    task: a task registered with bigjax.tasks.register to train with instead of the experiment's.
    model_identity: (preset, overrides) that rebuild the model, written into a bigjax export.
    flags_text: the run's flags, written to WORKDIR/flags.txt when training starts (None: not
      written); `--flagfile=` that file repeats the run.
  """

  mode: str = "train"
  task: str = ""
  export_dir: str | None = None
  export_format: str = "bigjax"
  export_ema: bool = False
  compile_only: bool = False
  show_sharding: bool = False
  model_identity: tuple[str, dict] | None = None
  flags_text: str | None = None

  def __post_init__(self):
    checks.one_of(self, "mode", MODES)
    checks.one_of(self, "export_format", EXPORT_FORMATS)
    if self.mode == "export" and not self.export_dir:
      checks.fail(self, "mode='export' needs export_dir (--export_dir)")


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a run is made of. `model` is the module that trains, evaluates and samples: with LoRA, a
  lora.Lora around the architecture, `base_model`."""

  model: Any
  mesh: jax.sharding.Mesh
  config: train.TrainConfig
  optim: optim.OptimConfig
  dataset: str
  data_dir: str | None
  losses: tasks.Losses = tasks.Losses()
  run_config: RunConfig = RunConfig()

  @property
  def base_model(self):
    return lora.base_of(self.model)

  @property
  def tx(self):
    return optim.make_optimizer(self.optim, self.config.num_steps)


def run(exp: Experiment, *, task, train_data, eval_data) -> dict:
  """Does what `exp.run_config` says with `task` on the data (grain datasets of host batches, as
  bigjax.data builds them); returns the last record (train, eval), the export's step, or the
  compile report."""
  cfg = exp.run_config
  task = _with_losses(tasks.create(cfg.task, task) if cfg.task else task, exp.losses)
  if cfg.mode == "eval":
    record = train.evaluate_checkpoint(
        model=exp.model, task=task, tx=exp.tx, eval_data=eval_data, config=exp.config, mesh=exp.mesh
    )
    metrics.console(metrics.format_record(record, record["step"], task.unit))
    return record
  if cfg.mode == "export":
    return _export(exp, task, eval_data)
  if cfg.mode != "train":
    raise UserError(f"--mode={cfg.mode} is not available for this experiment")
  example_batch = jax.tree.map(lambda x: x[:1], train_data[0])
  if cfg.compile_only or cfg.show_sharding:
    metrics.console(
        train.describe_shardings(
            model=exp.model,
            task=task,
            tx=exp.tx,
            example_batch=example_batch,
            mesh=exp.mesh,
            seed=exp.config.seed,
        )
    )
  if cfg.compile_only:
    report = train.compile_report(
        model=exp.model,
        task=task,
        tx=exp.tx,
        example_batch=example_batch,
        config=exp.config,
        mesh=exp.mesh,
    )
    metrics.console(train.format_compile_report(report, exp.mesh))
    return report
  return train.fit(
      model=exp.model,
      task=task,
      tx=exp.tx,
      learning_rate=optim.make_schedule(exp.optim, exp.config.num_steps),
      train_data=train_data,
      eval_data=eval_data,
      config=exp.config,
      mesh=exp.mesh,
      on_start=lambda: _save_flags(exp),
  )


def decoding_params(exp: Experiment, task, example_batch) -> tuple[Any, int]:
  """(parameters, step) of the newest checkpoint in the workdir, on one device, for sampling and
  decoding (the parameter average with --eval_with_ema, as evaluation uses)."""
  one_device = sharding.make_mesh("data:1,fsdp:1,tensor:1", jax.devices()[:1])
  with train.mesh_context(one_device):
    state, step = _newest_state(exp, task, example_batch, one_device)
  return train.evaluated_state(state, exp.config).params, step


def _newest_state(exp: Experiment, task, example_batch, mesh) -> tuple[Any, int]:
  """(state, step) of the newest readable checkpoint in the workdir, placed on `mesh` (inside its
  mesh_context)."""
  state, step, _ = train.load_checkpoint(
      model=exp.model,
      task=task,
      tx=exp.tx,
      example_batch=example_batch,
      config=exp.config,
      mesh=mesh,
  )
  return state, step


def _save_flags(exp: Experiment) -> None:
  if exp.run_config.flags_text is not None and jax.process_index() == 0:
    workdir_lib.replace_file(
        os.path.join(exp.config.workdir, "flags.txt"), exp.run_config.flags_text
    )


def _export(exp: Experiment, task, eval_data) -> dict:
  """The newest checkpoint's model (adapters merged; the average with export_ema) to export_dir."""
  cfg = exp.run_config
  if cfg.export_ema and not exp.optim.ema_decay:
    raise UserError(
        f"--export_ema needs --ema_decay: export with the run's own flags "
        f"(--flagfile={os.path.join(exp.config.workdir, 'flags.txt')}), or drop --export_ema"
    )
  hf_format = cfg.export_format == "hf"
  if hf_format:  # a model transformers has no counterpart for fails before loading
    hf.check_exportable(exp.base_model)
  if not hf_format and cfg.model_identity is None:
    raise UserError(
        "a bigjax export needs RunConfig.model_identity: the preset that rebuilds the model"
    )
  example_batch = jax.tree.map(lambda x: x[:1], eval_data[0])
  with train.mesh_context(exp.mesh):
    state, step = _newest_state(exp, task, example_batch, exp.mesh)
    if cfg.export_ema:
      state = train.ema_state(state, "--export_ema")
    variables = {"params": _merged_adapters(exp.model, state.params), **state.model_state}
    if hf_format:
      directory = models.save_hf(cfg.export_dir, exp.base_model, variables)
    else:
      directory = checkpoint.export(cfg.export_dir, variables, *cfg.model_identity)
  metrics.console(f"exported step {step} of {exp.config.workdir} to {directory}")
  return {"step": step}


def _merged_adapters(model, params):
  """The parameters of the architecture: LoRA's adapters folded into the kernels they adapt."""
  if not isinstance(model, lora.Lora):
    return params
  return jax.jit(lora.merged, static_argnums=1)(params, model.config)


def _with_losses(task, losses: tasks.Losses):
  """The task with --label_smoothing and --z_loss; a task of a fork's own without a `losses` field
  runs as it is unless they are set."""
  if dataclasses.is_dataclass(task) and any(f.name == "losses" for f in dataclasses.fields(task)):
    return dataclasses.replace(task, losses=losses)
  if losses != tasks.Losses():
    raise UserError(
        f"{type(task).__name__} takes no --label_smoothing or --z_loss (it has no `losses` field)"
    )
  return task
