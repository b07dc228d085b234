"""The train state, the pure train and eval steps, and the `fit` loop around them."""

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bigjax import checkpoint
from bigjax import config_checks as checks
from bigjax import optim
from bigjax import sharding
from bigjax import storage
from bigjax import tasks
from bigjax import metrics as metrics_lib
from bigjax import workdir as workdir_lib
from bigjax.errors import UserError
from bigjax.interop import hf
from bigjax.nn import lora


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # mutable collections besides params (e.g. batch_stats); {} when there are none
  rng: jax.Array  # base key; step t uses fold_in(rng, t), so a resumed run draws the same dropout


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  workdir: str
  num_steps: int
  batch_size: int
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  keep_checkpoints: int = 3
  # Export dir, workdir or Hugging Face directory whose parameters start a fresh run
  init_from: str | None = None
  keep_best_metric: str | None = None  # e.g. "eval_loss": also keep the checkpoint that did best
  grad_accum: int = 1  # micro-batches per optimizer step
  # when every checkpoint in the workdir is unreadable: set them aside and train from step 0
  # (otherwise that is a one-line error and nothing is touched)
  allow_restart: bool = False
  # resume a checkpoint whose batches came from other data (its position continues on the new
  # data); otherwise that is a one-line error
  allow_new_data: bool = False
  # evaluate the parameter average the optimizer keeps (optim.OptimConfig.ema_decay), not the parameters
  eval_with_ema: bool = False
  # XLA compiler options for the jitted steps; see `platform_xla_options` for which apply where
  xla_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  # (START, END): a jax.profiler trace of steps START to END - 1 into `profile_directory`
  profile_steps: tuple[int, int] | None = None
  # where the metrics also go besides metrics.jsonl and TensorBoard: a Weights & Biases run
  wandb: metrics_lib.WandbConfig | None = None

  def __post_init__(self):
    window = self.profile_steps
    if window is None:
      return
    if not (
        isinstance(window, tuple)
        and len(window) == 2
        and all(checks.is_int(s) for s in window)
        and 1 <= window[0] < window[1]
    ):
      checks.fail(
          self,
          f"profile_steps={window!r} must be (START, END) with 1 <= START < END "
          "(--profile_steps=START:END traces steps START to END - 1; steps count from 1)",
      )
    if checks.is_int(self.num_steps) and window[0] > self.num_steps:
      checks.fail(
          self,
          f"profile_steps={window!r} starts after the last step (num_steps={self.num_steps}): "
          "nothing would be traced",
      )


def enable_compilation_cache(directory: str, min_compile_secs: float | None = None) -> bool:
  """JAX's persistent compilation cache in `directory` (created if missing): a later process that
  compiles the same program (a rerun, a resume, an eval) loads it instead of compiling it again.
  Programs that compiled faster than `min_compile_secs` are not stored; None keeps JAX's own
  setting when JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is set, and 1 s otherwise. A directory
  that cannot be created (a read-only home on a cluster) turns the cache off with a warning, not
  the run."""
  directory = os.path.expanduser(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    # stderr, not metrics.console: asking JAX for the process index would start its backend
    # before jax.distributed.initialize.
    sys.stderr.write(
        f"warning: compilation cache off: cannot create {directory} ({e.strerror}); "
        "pass --compilation_cache_dir=DIR to choose another\n"
    )
    return False
  if min_compile_secs is None:
    min_compile_secs = float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  return True


@contextlib.contextmanager
def mesh_context(mesh):
  """The mesh and logical-axis rules that tracing needs for the modules' sharding constraints."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    yield


def _split_variables(variables):
  variables = dict(variables)
  return variables.pop("params"), variables


def create_state(rng, *, model, tx, task, example_batch) -> TrainState:
  """A fresh state: initialised parameters, optimizer state at zero, step 0."""
  init_rng, state_rng = jax.random.split(rng)
  params, model_state = _split_variables(nn.unbox(task.init(model, init_rng, example_batch)))
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      model_state=model_state,
      rng=state_rng,
  )


def state_shardings(*, model, tx, task, example_batch, mesh, rng):
  """Shardings of every state leaf: parameters by their logical names, optimizer state following
  the parameter it belongs to, everything else replicated. Also checks that every sharded
  dimension divides over its mesh axes."""
  abstract_vars = jax.eval_shape(functools.partial(task.init, model), rng, example_batch)
  boxed_params, boxed_model_state = _split_variables(abstract_vars)
  param_shardings = sharding.logical_shardings(boxed_params, mesh)
  model_state_shardings = sharding.logical_shardings(boxed_model_state, mesh)
  sharding.check_divisible(boxed_params, param_shardings)
  abstract_state = jax.eval_shape(
      functools.partial(create_state, model=model, tx=tx, task=task, example_batch=example_batch),
      rng,
  )
  replicated = sharding.replicated(mesh)
  opt_shardings = _optimizer_state_shardings(
      abstract_state.opt_state, abstract_state.params, param_shardings, replicated
  )
  return TrainState(
      step=replicated,
      params=param_shardings,
      opt_state=opt_shardings,
      model_state=model_state_shardings,
      rng=replicated,
  )


def _optimizer_state_shardings(abstract_opt_state, abstract_params, param_shardings, replicated):
  """Each optimizer-state leaf that mirrors a parameter (its path ends with the parameter's path and
  it has the parameter's shape: Adam's moments, a parameter average, also inside the masked trees
  of parameter groups) takes that parameter's sharding; everything else (step counts, Adafactor's
  factored statistics) is replicated. optax.tree_map_params cannot see through masked groups."""
  params = {
      tuple(path): (leaf.shape, placement)
      for (path, leaf), placement in zip(
          jax.tree_util.tree_flatten_with_path(abstract_params)[0],
          jax.tree_util.tree_leaves(param_shardings),
          strict=True,
      )
  }
  depth = {len(path) for path in params}

  def placement(path, leaf):
    for n in depth:
      shape_and_placement = params.get(tuple(path[-n:]))
      if shape_and_placement is not None and shape_and_placement[0] == leaf.shape:
        return shape_and_placement[1]
    return replicated

  return jax.tree_util.tree_map_with_path(placement, abstract_opt_state)


def _grads_and_sums(params, model_state, batch, rngs, *, model, task, trained):
  """Gradients of the summed loss (not the mean: micro-batches add up) with respect to the trained
  parameters (None in place of each frozen one: never computed), the summed metrics and the updated
  model state of one (micro-)batch."""

  def summed_loss(trainable):
    merged = jax.tree.map(
        lambda p, t, m: t if m else jax.lax.stop_gradient(p), params, trainable, trained
    )
    sums, new_model_state = task.loss_sums(
        model, {"params": merged, **model_state}, batch, rngs=rngs, train=True
    )
    sums = tasks.checked_sums(task, sums)
    return sums["objective"], (sums, new_model_state)

  trainable = jax.tree.map(lambda p, m: p if m else None, params, trained)
  (_, (sums, new_model_state)), grads = jax.value_and_grad(summed_loss, has_aux=True)(trainable)
  return grads, sums, {**model_state, **new_model_state}


def _micro_batches(batch, num_micro: int):
  """[B, ...] -> [num_micro, B / num_micro, ...] where micro-batch k takes rows k, k + num_micro, ...:
  every device keeps contributing its own rows to every micro-batch, so nothing moves."""

  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)
    )

  return jax.tree.map(split, batch)


def train_step(state: TrainState, batch, *, model, tx, task, grad_accum: int = 1):
  """One optimizer update, from `grad_accum` micro-batches whose gradients are summed before the
  update (batch norm statistics see each micro-batch). Returns the new state and the step's summed
  metrics."""
  step_rng = jax.random.fold_in(state.rng, state.step)
  trained = optim.trained_mask(tx, state.params)
  grads_fn = functools.partial(_grads_and_sums, model=model, task=task, trained=trained)
  if grad_accum == 1:
    grads, sums, model_state = grads_fn(
        state.params, state.model_state, batch, {"dropout": step_rng}
    )
  else:

    def accumulate(carry, micro):
      grads, sums, model_state = carry
      index, micro_batch = micro
      g, s, model_state = grads_fn(
          state.params, model_state, micro_batch, {"dropout": jax.random.fold_in(step_rng, index)}
      )
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s), model_state), None

    micro_batches = _micro_batches(batch, grad_accum)
    zeros = jax.tree.map(lambda p, m: jnp.zeros_like(p) if m else None, state.params, trained)
    zero_sums = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(
            lambda: grads_fn(
                state.params,
                state.model_state,
                jax.tree.map(lambda x: x[0], micro_batches),
                {"dropout": step_rng},
            )[1]
        ),
    )
    (grads, sums, model_state), _ = jax.lax.scan(
        accumulate, (zeros, zero_sums, state.model_state), (jnp.arange(grad_accum), micro_batches)
    )
  grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0).astype(g.dtype), grads)
  grad_norm = optax.tree.norm(grads)  # of the trained parameters
  # The optimizer takes a gradient for every parameter; a frozen one's zeros fold away in XLA.
  grads = jax.tree.map(lambda p, g, m: g if m else jnp.zeros_like(p), state.params, grads, trained)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      model_state=model_state,
  )
  return new_state, {"sums": sums, "grad_norm": grad_norm, "update_norm": optax.tree.norm(updates)}


def eval_step(state: TrainState, batch, *, model, task):
  sums, _ = task.loss_sums(model, {"params": state.params, **state.model_state}, batch, train=False)
  return tasks.checked_sums(task, sums)


def evaluate(eval_fn, state, batches: Iterable, mesh, task) -> dict[str, float]:
  """Task metrics over every batch, prefixed with eval_. The sums stay on the device until the
  end, with a single fetch; the host runs at most one batch ahead of the device."""
  total = None
  for batch in batches:
    sums = eval_fn(state, sharding.host_to_global(batch, mesh))
    # Waiting for the previous total keeps one batch in flight while the host prepares the next.
    # Dispatching every batch unpaced deadlocked two-process CPU runs: XLA's CPU client blocks a
    # launch once 32 programs are queued on a device, and with collectives in those programs the
    # processes ended up waiting on each other (reproduced with the README's two-process example).
    total = sums if total is None else jax.tree.map(jnp.add, jax.block_until_ready(total), sums)
  return {
      f"eval_{k}": v
      for k, v in task.metrics(metrics_lib.add_sums(None, jax.device_get(total))).items()
  }


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


@dataclasses.dataclass(frozen=True)
class Compiled:
  """The jitted functions of one (model, optimizer, task, mesh): each runs under `mesh_context`."""

  shardings: TrainState
  init: Callable  # rng -> TrainState, created already sharded
  train_step: Callable  # (state, global batch) -> (state, metrics); donates the state
  eval_step: Callable  # (state, global batch) -> sums
  xla_options: dict[
      str, Any
  ]  # the compiler options they were jitted with (those for this platform)


# XLA names its backend-specific options by platform; the others apply everywhere.
_PLATFORM_OPTION_PREFIXES = {"xla_cpu_": "cpu", "xla_gpu_": "gpu", "xla_tpu_": "tpu"}


def platform_xla_options(xla_options: dict[str, Any], platform: str) -> dict[str, Any]:
  """The options that apply on `platform` ("cpu", "gpu", "tpu"): xla_cpu_* only on CPU, and so on,
  so that one flagfile can carry tuning for the CPU and still run on an accelerator."""

  def owner(name):
    return next(
        (p for prefix, p in _PLATFORM_OPTION_PREFIXES.items() if name.startswith(prefix)), None
    )

  return {name: value for name, value in xla_options.items() if owner(name) in (None, platform)}


def check_xla_options(xla_options: dict[str, Any]) -> None:
  """Compiles a trivial program with `xla_options`, so that a misspelt option or a bad value fails
  here in one line instead of deep inside the first train step's compilation."""
  if not xla_options:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=xla_options).lower(jnp.float32(0)).compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
    raise UserError(f"bad XLA compiler option (--xla_option): {message}") from None


def compile_steps(
    *,
    model,
    tx,
    task,
    example_batch,
    mesh,
    rng,
    grad_accum: int = 1,
    xla_options: dict[str, Any] | None = None,
) -> Compiled:
  """Shardings and jitted init / train / eval for this model on this mesh (call in mesh_context),
  each compiled with those of `xla_options` (XLA compiler options) that apply on the mesh's platform.
  """
  options = platform_xla_options(xla_options or {}, mesh.devices.flat[0].platform)
  check_xla_options(options)
  jit = functools.partial(jax.jit, compiler_options=options or None)
  shardings = state_shardings(
      model=model, tx=tx, task=task, example_batch=example_batch, mesh=mesh, rng=rng
  )
  batch_sharding = sharding.batch_sharding(mesh)
  return Compiled(
      shardings=shardings,
      init=jit(
          functools.partial(
              create_state, model=model, tx=tx, task=task, example_batch=example_batch
          ),
          out_shardings=shardings,
      ),
      train_step=jit(
          functools.partial(train_step, model=model, tx=tx, task=task, grad_accum=grad_accum),
          in_shardings=(shardings, batch_sharding),
          out_shardings=(shardings, None),
          donate_argnums=0,
      ),
      eval_step=jit(
          functools.partial(eval_step, model=model, task=task),
          in_shardings=(shardings, batch_sharding),
      ),
      xla_options=options,
  )


def compile_run_steps(config: TrainConfig, model, tx, task, example_batch, mesh, rng) -> Compiled:
  """compile_steps with the run's gradient accumulation and XLA options."""
  return compile_steps(
      model=model,
      tx=tx,
      task=task,
      example_batch=example_batch,
      mesh=mesh,
      rng=rng,
      grad_accum=config.grad_accum,
      xla_options=config.xla_options,
  )


def fit(
    *,
    model,
    task,
    tx,
    train_data,
    eval_data: Sequence | None,
    config: TrainConfig,
    mesh,
    learning_rate: Callable[[int], float] | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict:
  """Trains `model` on `train_data` (a grain dataset of host batches) until `config.num_steps`.

  Claims the workdir (a second run on it is refused) and checks it is writable. Resumes from the
  newest checkpoint in `config.workdir` that restores and matches its fingerprints; checkpoints
  whose arrays have other shapes, dtypes or structure than this model and optimizer build are a
  one-line error, never a silent restart, and so is a workdir whose checkpoints are all
  unreadable unless `config.allow_restart`. `on_start` runs once the state is restored or
  initialised and there are steps to train (the experiments save their flags there, so a refused
  resume leaves the workdir as it was). `config.profile_steps` traces those steps with jax.profiler
  into `profile_directory`. Returns the last logged record (with the final evaluation, when
  `eval_data` is given).
  """
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum)
  with workdir_lib.claim(config.workdir):
    checkpoints = os.path.join(config.workdir, "checkpoints")
    # Before Orbax, which waits minutes on a read-only directory.
    workdir_lib.check_writable(checkpoints)
    best = config.keep_best_metric
    ckpt = checkpoint.Checkpointer(
        checkpoints,
        every=config.checkpoint_every,
        keep=config.keep_checkpoints,
        best_metric=best,
        best_is_highest=bool(best) and tasks.higher_is_better(task, best),
    )
    try:
      example_batch = jax.tree.map(lambda x: x[:1], train_data[0])
      rng = jax.random.PRNGKey(config.seed)
      with mesh_context(mesh):
        steps = compile_run_steps(config, model, tx, task, example_batch, mesh, rng)
        state, start, train_iter = _restore_or_init(
            steps, rng, ckpt, train_data, config, model, mesh
        )
        # --eval_with_ema without an average fails before the first step
        evaluated_state(state, config)
        _check_best_metric(steps, state, example_batch, task, config, eval_data)
        if start and start >= config.num_steps:
          metrics_lib.console(
              f"nothing to train: the checkpoint in {ckpt.directory} is at step {start} and "
              f"--num_steps={config.num_steps}; raise --num_steps to train further"
          )
          return {"step": start}
        if on_start is not None:
          on_start()
        _, adapters = lora.split_adapters(state.params)
        trained = (
            f" ({count_params(adapters):,} of them in LoRA adapters, the rest frozen)"
            if adapters
            else ""
        )
        metrics_lib.console(
            f"model: {count_params(state.params):,} parameters{trained}; mesh: {sharding.describe(mesh)}"
            + "".join(f"; XLA option {name}={value}" for name, value in steps.xla_options.items())
        )
        log = metrics_lib.MetricsLog(
            config.workdir,
            unit=task.unit,
            num_steps=config.num_steps,
            resumed_step=start,
            wandb=config.wandb,
        )
        # The handlers stay until the last write is on disk, so a second signal cannot cut it short.
        with _StopSignals() as stop, _profile_trace(config, start) as profile:
          return _train_loop(
              state,
              start,
              train_iter,
              steps.train_step,
              steps.eval_step,
              eval_data,
              config,
              mesh,
              task,
              ckpt,
              log,
              learning_rate,
              stop,
              profile,
              getattr(train_data, "seen", None),  # a bigjax.data Loader's; None for other data
          )
    finally:
      ckpt.close()


def _profile_trace(config: TrainConfig, start: int) -> "_ProfileTrace":
  """The trace of the steps of `config.profile_steps` that a run from step `start` trains."""
  steps = traced_steps(config.profile_steps, start, config.num_steps)
  if config.profile_steps and not steps:
    first, end = config.profile_steps
    metrics_lib.console(
        f"nothing profiled: steps {first}-{end - 1} (--profile_steps) were trained before step "
        f"{start}, where this run resumes"
    )
  return _ProfileTrace(steps, profile_directory(config.workdir, jax.process_index()))


def _initial_variables(init_from: str, model, abstract, mesh) -> dict:
  """--init_from's model variables placed as the fresh state's: a Hugging Face model directory (its
  config.json gave `model`'s architecture), an export, or a workdir's newest checkpoint. A LoRA
  model takes its base parameters from there; its adapters are the caller's (fresh) ones."""
  base_params, _ = lora.split_adapters(abstract.params)
  wanted = {"params": base_params, **abstract.model_state}
  if hf.is_hf_directory(storage.absolute(init_from)):
    _, variables = hf.load(init_from, mesh=mesh, **dataclasses.asdict(lora.base_of(model).config))
    return jax.device_put(variables, jax.tree.map(lambda a: a.sharding, wanted))
  return checkpoint.load_variables(init_from, wanted)


def _restore_or_init(steps, rng, ckpt, train_data, config: TrainConfig, model, mesh):
  """(state, start step, train iterator): the newest good checkpoint, or a fresh state."""
  train_iter = iter(train_data)
  abstract = checkpoint.abstract_like(jax.eval_shape(steps.init, rng), steps.shardings)
  state, start, unreadable = ckpt.restore_newest_readable(
      abstract, train_iter, refusal=_other_data_refusal(train_iter, ckpt.directory, config)
  )
  if state is not None:
    metrics_lib.console(f"resumed from step {start} in {ckpt.directory}")
    return state, start, train_iter
  if unreadable:
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in unreadable[:3])
    if not config.allow_restart:
      raise UserError(
          f"every checkpoint in {ckpt.directory} is unreadable ({reasons}); nothing was changed: "
          "restore them, or pass --allow_restart to set them aside and train again from step 0"
      )
    moved = ckpt.set_aside_steps(step for step, _ in unreadable)
    kept = metrics_lib.set_aside_previous_run(config.workdir)
    metrics_lib.console(
        f"starting again from step 0: every checkpoint was unreadable ({reasons}); set aside as "
        f"{', '.join(moved)}"
        + (f"; the earlier run's metrics kept as {', '.join(kept)}" if kept else "")
    )
    # The failed restores moved the old one: a restart draws a fresh run's batches
    train_iter = iter(train_data)
  return _fresh_state(steps, rng, config, model, mesh), 0, train_iter


def _other_data_refusal(train_iter, directory: str, config: TrainConfig):
  """refusal(step) for restore_newest_readable: a resumed run continues the checkpoint's batch
  position, and on other data than the checkpoint was trained on (a changed flag) that silently
  mixes two runs' data. Iterators that do not know their data (a fork's own) are not judged."""

  def refusal(step: int) -> str | None:
    difference = getattr(train_iter, "restored_data_difference", lambda: None)()
    if difference is None:
      return None
    if config.allow_new_data:
      metrics_lib.console(
          f"step {step} was trained on other data ({difference}); --allow_new_data: its batch "
          "position continues on the data these flags read"
      )
      return None
    return (
        f"checkpoint step {step} in {directory} was trained on other data than these flags read "
        f"({difference}); resume with the run's flags (--flagfile={config.workdir}/flags.txt), "
        "use a new --workdir, or pass --allow_new_data to continue its batch position on the new "
        "data"
    )

  return refusal


def _fresh_state(steps, rng, config: TrainConfig, model, mesh):
  """A step-0 state: initialised, with --init_from's parameters in place of the base's."""
  state = steps.init(rng)
  if config.init_from:
    abstract = checkpoint.abstract_like(jax.eval_shape(steps.init, rng), steps.shardings)
    variables = _initial_variables(config.init_from, model, abstract, mesh)
    _, adapters = lora.split_adapters(state.params)
    state = state.replace(
        params=lora.join(variables.pop("params"), adapters), model_state=variables
    )
    metrics_lib.console(f"parameters from {config.init_from}")
  return state


def _check_best_metric(steps, state, example_batch, task, config: TrainConfig, eval_data) -> None:
  """--keep_best_metric names a metric the evaluation reports (found from shapes, before training)."""
  name = config.keep_best_metric
  if not name:
    return
  if eval_data is None:
    raise UserError(
        f"--keep_best_metric={name} needs an evaluation, and this run has no evaluation data"
    )
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((config.batch_size, *x.shape[1:]), x.dtype), example_batch
  )
  sums = jax.eval_shape(steps.eval_step, state, batch)
  reported = [f"eval_{k}" for k in task.metrics({k: 1.0 for k in sums})]
  if name not in reported:
    raise UserError(
        f"--keep_best_metric={name} is not a metric this run's evaluation reports; choose one of "
        f"{', '.join(reported)}"
    )


def describe_shardings(*, model, task, tx, example_batch, mesh, seed: int = 0) -> str:
  """The parameter sharding table for `mesh`, from shapes alone (the optimizer state follows it)."""
  rng = jax.random.PRNGKey(seed)
  with mesh_context(mesh):
    shardings = state_shardings(
        model=model, tx=tx, task=task, example_batch=example_batch, mesh=mesh, rng=rng
    )
    abstract = jax.eval_shape(
        functools.partial(create_state, model=model, tx=tx, task=task, example_batch=example_batch),
        rng,
    )
  params = checkpoint.abstract_like(abstract.params, shardings.params)
  return (
      f"parameter shardings on mesh {sharding.describe(mesh)}:\n{sharding.describe_params(params)}"
  )


def compile_report(*, model, task, tx, example_batch, config: TrainConfig, mesh) -> dict:
  """Lowers and compiles the train step for the global batch on `mesh` from shapes alone (nothing
  is allocated), and returns its FLOPs and per-device memory: an out-of-memory shows here, before
  any accelerator time is spent."""
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum)
  rng = jax.random.PRNGKey(config.seed)
  with mesh_context(mesh):
    steps = compile_run_steps(config, model, tx, task, example_batch, mesh, rng)
    abstract_state = checkpoint.abstract_like(jax.eval_shape(steps.init, rng), steps.shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            (config.batch_size, *x.shape[1:]), x.dtype, sharding=batch_sharding
        ),
        example_batch,
    )
    start = time.perf_counter()
    compiled = steps.train_step.lower(abstract_state, abstract_batch).compile()
  report = {
      "compile_s": time.perf_counter() - start,
      "params": count_params(abstract_state.params),
      "flops_per_step": (compiled.cost_analysis() or {}).get("flops", 0.0),
  }
  memory = compiled.memory_analysis()
  if memory is not None:  # bytes on each device: the program is the same on all of them
    report.update(
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
    )
    # Donated state buffers are reused for the outputs, so aliased bytes count once.
    report["peak_bytes"] = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
  limit = (mesh.devices.flat[0].memory_stats() or {}).get("bytes_limit")
  if limit:
    report["device_bytes"] = limit
  return report


def format_compile_report(report: dict, mesh) -> str:
  gib = lambda b: f"{b / 2**30:,.3f} GiB"
  lines = [
      (
          f"compiled the train step for mesh {sharding.describe(mesh)} in {report['compile_s']:.1f}s: "
          f"{report['params']:,} parameters, {report['flops_per_step'] / 1e9:,.2f} GFLOP per step per device "
          "(XLA's count; loops counted once)"
      )
  ]
  if "peak_bytes" in report:
    lines.append(
        f"memory per device: state and batch in {gib(report['argument_bytes'])}, outputs "
        f"{gib(report['output_bytes'])} ({gib(report['alias_bytes'])} of them reusing donated "
        f"inputs), temporaries {gib(report['temp_bytes'])}, code {gib(report['code_bytes'])}; "
        f"peak about {gib(report['peak_bytes'])}"
    )
  if "device_bytes" in report:
    fits = "fits" if report["peak_bytes"] <= report["device_bytes"] else "DOES NOT FIT"
    lines.append(f"device memory {gib(report['device_bytes'])}: {fits}")
  return "\n".join(lines)


def load_checkpoint(*, model, task, tx, example_batch, config: TrainConfig, mesh):
  """The newest checkpoint's (state, step), placed on `mesh` (call in mesh_context), and the
  compiled steps. Fails with a one-line error when `config.workdir` holds no checkpoint."""
  directory = os.path.join(storage.absolute(config.workdir), "checkpoints")
  missing = UserError(f"no checkpoint in {directory}; train first with the same --workdir")
  if not storage.is_dir(directory):  # checked first: the Checkpointer would create it
    raise missing
  ckpt = checkpoint.Checkpointer(directory, every=0, read_only=True)
  rng = jax.random.PRNGKey(config.seed)
  steps = compile_run_steps(config, model, tx, task, example_batch, mesh, rng)
  state, step, unreadable = ckpt.restore_newest_readable(
      checkpoint.abstract_like(jax.eval_shape(steps.init, rng), steps.shardings), set_aside=False
  )
  ckpt.close()
  if unreadable and state is None:
    reasons = "; ".join(f"step {step}: {reason}" for step, reason in unreadable[:3])
    raise UserError(f"every checkpoint in {directory} is unreadable ({reasons})")
  if state is None:
    raise missing
  return state, step, steps


def ema_state(state: TrainState, flag: str) -> TrainState:
  """`state` with the optimizer's parameter average as its parameters; `flag` names the option that
  asked for it in the error when the run keeps none."""
  ema = optim.ema_params(state.opt_state, state.params)
  if ema is None:
    raise UserError(
        f"{flag} needs a run that keeps a parameter average: train with --ema_decay > 0"
    )
  return state.replace(params=ema)


def evaluated_state(state: TrainState, config: TrainConfig) -> TrainState:
  return ema_state(state, "--eval_with_ema") if config.eval_with_ema else state


def evaluate_checkpoint(*, model, task, tx, eval_data: Sequence, config: TrainConfig, mesh) -> dict:
  """Evaluates the newest checkpoint in `config.workdir` on every eval batch; a workdir without
  one, given `config.init_from`, evaluates that model as training would start from it (step 0: the
  score before fine-tuning)."""
  example_batch = jax.tree.map(lambda x: x[:1], eval_data[0])
  with mesh_context(mesh):
    if config.init_from and not checkpoint.saved_steps(config.workdir):
      rng = jax.random.PRNGKey(config.seed)
      steps = compile_run_steps(config, model, tx, task, example_batch, mesh, rng)
      state, step = _fresh_state(steps, rng, config, model, mesh), 0
    else:
      state, step, steps = load_checkpoint(
          model=model, task=task, tx=tx, example_batch=example_batch, config=config, mesh=mesh
      )
    return {
        "step": step,
        **evaluate(steps.eval_step, evaluated_state(state, config), eval_data, mesh, task),
    }


class _StopSignals:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a request that the loop honours after the
  current step: save, wait for the write, return. Handlers are restored on exit."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def profile_directory(workdir: str, process: int) -> str:
  """Where process `process` writes its --profile_steps trace: one directory per process, since
  jax.profiler names each trace file after the host alone (processes sharing a host would overwrite
  each other's) and each process's trace gets a directory of its own timestamp anyway. TensorBoard
  and XProf, given WORKDIR/profile, list every process's trace as a run of its own."""
  return os.path.join(workdir, "profile", f"process_{process}")


def traced_steps(window: tuple[int, int] | None, start: int, num_steps: int) -> range:
  """The steps of `window` (START, END: END not included) that a run from step `start` to
  `num_steps` trains; empty without a window, or when a resumed run has passed it."""
  if window is None:
    return range(0)
  return range(max(window[0], start + 1), min(window[1], num_steps + 1))


class _ProfileTrace:
  """A jax.profiler trace of `steps` into `directory`, holding their device work and no other
  step's: dispatch returns before the device has run, so the trace starts once the step before has
  finished (before the first traced step reads its batch) and stops once the last one's outputs are
  ready, or when the run ends or fails inside the window."""

  def __init__(self, steps: range, directory: str):
    self.steps, self.directory = steps, directory
    self.tracing, self.last = False, None  # the last step dispatched inside the trace

  def before(self, step: int, state) -> None:
    if self.steps and step == self.steps[0]:
      jax.block_until_ready(state)
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def after(self, step: int, outputs) -> None:
    if not self.tracing:
      return
    self.last = step
    if step == self.steps[-1]:
      jax.block_until_ready(outputs)
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self.tracing = False
    first, last = self.steps[0], self.last
    what = f"steps {first}-{last}" if last is not None and last > first else f"step {first}"
    metrics_lib.console(
        f"profile of {what} written to {self.directory} (open it with "
        f"xprof --logdir={os.path.dirname(self.directory)})"
    )

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.tracing:  # the run stopped or failed inside the window
      self._stop()


# A finite loss this many times its first value (and above DIVERGED_FLOOR) has diverged: the
# cross-entropy of a model that has learnt nothing is ln(classes), and one this far above it means
# confidently wrong outputs (a CNN at learning rate 1e6 reached 4e23).
DIVERGED_FACTOR = 20.0
DIVERGED_FLOOR = 20.0


def instability(
    step: int, start: int, mean_loss: float, update_norm: float, first: tuple[int, float]
) -> str | None:
  """Why training cannot go on at `step` (a non-finite loss or update, or a loss that diverged from
  `first` = (step, mean loss)), with advice that fits the cause; None when it can."""
  if math.isfinite(mean_loss) and math.isfinite(update_norm):
    if mean_loss > max(DIVERGED_FACTOR * first[1], DIVERGED_FLOOR):
      return (
          f"training diverged: the loss rose from {first[1]:.4g} at step {first[0]} to {mean_loss:.4g} at step "
          f"{step}; the updates are too large for this model: lower --learning_rate, lengthen "
          "--warmup_steps or tighten --grad_clip"
      )
    return None
  # The update counts too: a finite loss with a NaN update would still poison the saved state.
  what = f"loss {mean_loss}, update norm {update_norm}"
  if step == start + 1 and not math.isfinite(mean_loss):
    if start == 0:
      return (
          f"the loss is not finite at the first step ({what}), before any update: the learning rate is not "
          "the cause; check the data (NaN or out-of-range inputs) and the model's configuration"
      )
    return (
        f"the loss is not finite at the first step after resuming from step {start} ({what}), before any "
        "update: the restored state gives it; evaluate that checkpoint (--mode=eval) or restart from an "
        "earlier one"
    )
  return (
      f"training became non-finite at step {step} ({what}); lower --learning_rate or tighten --grad_clip, "
      "or with --dtype=float16 use bfloat16 or float32"
  )


def _train_loop(
    state,
    start,
    train_iter,
    step_fn,
    eval_fn,
    eval_data,
    config,
    mesh,
    task,
    ckpt,
    log,
    learning_rate,
    stop: "_StopSignals",
    profile: "_ProfileTrace",
    seen: Callable[[int], dict[str, int]] | None = None,
):
  """The loop proper. Metrics of step n are fetched after step n+1 is dispatched, so the host never
  waits for the device except at evaluation and checkpoint steps. A non-finite or diverged loss
  stops the run before anything is saved from that step on. Records of log and eval steps hold
  `data_fingerprint`, the CRC32 of the batch this process fed (bigjax.metrics.fingerprint), and
  `seen(step)`: what the data says the first `step` batches held (a mixture's tokens per source,
  derived from the step, so a resumed run logs what an unbroken one does)."""
  is_log_step = lambda s: s % config.log_every == 0 or s == config.num_steps
  is_eval_step = lambda s: eval_data is not None and (
      s % config.eval_every == 0 or s == config.num_steps
  )
  interval_sums, record = None, {}
  # (step, mean loss) of this process's first step: what divergence is measured from
  first_loss = None
  speed = metrics_lib.Throughput()
  compile_start = time.perf_counter()

  def fetch(step, step_metrics) -> dict:
    """Host copy of a step's metrics, added to the interval; stops the run on a NaN or Inf loss or
    one that diverged."""
    nonlocal interval_sums, speed, first_loss
    step_metrics = jax.device_get(step_metrics)
    loss, update = float(step_metrics["sums"]["loss"]), float(step_metrics["update_norm"])
    mean_loss = loss / max(float(step_metrics["sums"]["count"]), 1.0)
    first_loss = first_loss or (step, mean_loss)
    problem = instability(step, start, mean_loss, update, first_loss)
    if problem is not None:
      ckpt.wait()
      where = (
          f"the last good checkpoint is step {ckpt.last_complete} in {ckpt.directory}"
          if ckpt.last_complete
          else "no checkpoint was saved yet"
      )
      raise UserError(f"{problem}; stopped at step {step} before saving it; {where}")
    if step == start + 1:  # the first step includes compilation: keep it out of the speed figures
      speed = metrics_lib.Throughput()
    else:
      speed.add(1, float(step_metrics["sums"]["count"]))
    interval_sums = metrics_lib.add_sums(interval_sums, step_metrics["sums"])
    log.step(step, mean_loss, float(step_metrics["sums"]["count"]))
    return step_metrics

  def write(step, step_metrics, evals, fingerprint):
    nonlocal interval_sums, record
    rates = speed.rate()
    record = {"step": step, **{f"train_{k}": v for k, v in task.metrics(interval_sums).items()}}
    record["grad_norm"] = float(step_metrics["grad_norm"])
    if learning_rate is not None:
      record["learning_rate"] = float(learning_rate(step - 1))
    if rates is not None:  # the first step (compilation) is not timed
      record.update(steps_per_sec=rates[0], **{f"{task.unit}_per_sec": rates[1]})
    record.update(seen(step) if seen is not None else {})
    if fingerprint is not None:
      record["data_fingerprint"] = fingerprint
    record.update(evals)
    log.write(record)
    interval_sums = None

  pending = None
  best = None  # (value, step) of the first eval metric
  run_start = time.perf_counter()
  for step in range(start + 1, config.num_steps + 1):
    profile.before(step, state)  # on the run's first step the trace holds the compilation too
    host_batch = next(train_iter)
    # Only where a record is written: hashing an image batch every step would cost time.
    fingerprint = (
        metrics_lib.fingerprint(host_batch) if is_log_step(step) or is_eval_step(step) else None
    )
    batch = sharding.host_to_global(host_batch, mesh)
    if step == start + 1:  # compile ahead of time, to report the cost before the first step runs
      step_fn = step_fn.lower(state, batch).compile()
      flops = (step_fn.cost_analysis() or {}).get("flops", 0.0)
      metrics_lib.console(
          f"compiled the train step in {time.perf_counter() - compile_start:.1f}s: "
          f"{flops / 1e9:,.2f} GFLOP per step (XLA's count; loops counted once)"
      )
    state, step_metrics = step_fn(state, batch)
    profile.after(step, (state, step_metrics))
    if pending is not None:  # the previous step's metrics: ready by now, so this rarely waits
      previous, previous_metrics, previous_fingerprint = pending
      fetched = fetch(previous, previous_metrics)
      if is_log_step(previous):
        write(previous, fetched, {}, previous_fingerprint)
      pending = None
    last = step == config.num_steps or stop.received is not None
    save = ckpt.should_save(step) or last
    if not (save or is_eval_step(step)):
      pending = (step, step_metrics, fingerprint)
      continue
    fetched = fetch(step, step_metrics)  # before saving: a NaN state is never checkpointed
    speed.pause()
    evals = (
        evaluate(eval_fn, evaluated_state(state, config), eval_data, mesh, task)
        if is_eval_step(step)
        else {}
    )
    if save:
      ckpt.save(step, state, train_iter, metrics=evals)
    speed.resume()
    if is_log_step(step) or evals or last:
      write(step, fetched, evals, fingerprint)
    if evals:
      key = next(iter(evals))
      better = (lambda a, b: a > b) if tasks.higher_is_better(task, key) else (lambda a, b: a < b)
      if best is None or better(evals[key], best[0]):
        best = (evals[key], step, key)
    if stop.received is not None:
      if not save:  # the signal came during this step's evaluation
        ckpt.save(step, state, train_iter)
      metrics_lib.console(f"{stop.received}: saved step {step} to {ckpt.directory}; stopping")
      break
  ckpt.wait()  # the last save is on disk (or its failure reported) before the run says it is done
  log.close()
  took = metrics_lib.format_seconds(time.perf_counter() - run_start)
  summary = f"done: steps {start + 1}-{record.get('step', start)} in {took}"
  if best is not None:
    summary += f"; best {best[2]} {best[0]:.4f} at step {best[1]}"
  metrics_lib.console(summary + f"; checkpoints in {ckpt.directory}")
  return record
