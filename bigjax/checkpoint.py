"""Orbax checkpoints of the whole train state plus the grain data-iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written step that looks finished. Saves are asynchronous: the device
arrays are copied to host, then written while training goes on.
"""

import functools
import json
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from bigjax.errors import UserError
from bigjax.sharding import path_name as sharding_path


def _grain_checkpoint():
  """grain's checkpoint handlers, imported only where a data iterator is saved or restored, so
  that code without an input pipeline (benchmarks, export, `models.load`) runs where grain is not
  installed (the offline GPU machine of benchmarks/gpu.sh, for one)."""
  import grain  # pylint: disable=g-import-not-at-top
  return grain.checkpoint


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds in every process (one all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def leaf_arrays(tree) -> dict[str, str]:
  """{"opt_state/1/0/mu/head/kernel": "float32[256, 10]"} for every array in `tree`. The path is
  spelt the same for a live state (attributes, tuple indices) and Orbax's saved metadata (dicts,
  lists)."""
  return {sharding_path(path): f"{getattr(leaf, 'dtype', '')}{list(getattr(leaf, 'shape', ()))}"
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def state_differences(saved: dict, expected: dict) -> list[str]:
  """How a saved state's arrays (leaf_arrays) differ from the ones this run builds, one phrase
  each; parameters before optimizer state, as they name the model setting that changed."""
  order = functools.partial(sorted, key=lambda path: (path.startswith("opt_state/"), path))
  return ([f"{path}: saved {saved[path]}, this run {expected[path]}"
           for path in order(saved.keys() & expected.keys()) if saved[path] != expected[path]]
          + [f"{path} only in the checkpoint" for path in order(saved.keys() - expected.keys())]
          + [f"{path} only in this run" for path in order(expected.keys() - saved.keys())])


class Checkpointer:
  """Saves every `every` steps into `directory`, keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int = 3, best_metric: str | None = None):
    """Keeps the newest `keep` checkpoints and, with `best_metric` (say "eval_loss"), also the one
    with the best value of that metric (highest for accuracies, lowest otherwise)."""
    self.directory = os.path.abspath(directory)
    self.every = every
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse="accuracy" not in best_metric, n=1,
          keep_checkpoints_without_metrics=False))  # reverse=True keeps the lowest value
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies)))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iterator=None, metrics: dict | None = None) -> None:
    """Starts writing `step` (returns once the arrays are copied to host). `metrics` with the
    best metric in it make this step a candidate for the best checkpoint."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = _grain_checkpoint().CheckpointSave(data_iterator)
    if not (self.best_metric and metrics and self.best_metric in metrics):
      metrics = None
    self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, placed with the shardings in `abstract_state` (any mesh), and the
    data iterator moved to where it was."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = _grain_checkpoint().CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def restore_newest_readable(self, abstract_state, data_iterator=None, *, set_aside: bool = True):
    """(state, step) from the newest checkpoint that restores, or (None, 0) when there is none.

    A step that fails to restore (files cut short or deleted) is reported in one line and skipped
    for the one before it, so a damaged newest save costs only the steps since the previous one.
    Training sets such a step aside (renamed, so that new saves do not build on it); read-only
    callers (evaluation, export) pass set_aside=False and leave the workdir as it is.
    """
    self.check_some_step_fits(abstract_state)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored, error = self.restore(step, abstract_state, data_iterator), None
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
        restored, error = None, e
      # Every process must take the same step, even when only one of them could not read its shards.
      if _everywhere(error is None):
        return restored, step
      reason = "another process could not read its part" if error is None else \
          f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
      action = f"moved it to {self._set_aside(step)}" if set_aside else "left it in place"
      print(f"checkpoint step {step} in {self.directory} is unreadable ({reason}); {action} and trying the "
            "previous one", file=sys.stderr, flush=True)
    return None, 0

  def _differences(self, step: int, expected: dict) -> list[str] | None:
    """How `step`'s saved state differs from `expected` (leaf_arrays), or None when its metadata
    cannot be read."""
    try:
      metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state")
      saved = leaf_arrays(metadata.tree)
    except Exception:  # noqa: BLE001 - unreadable metadata: the restore decides
      return None
    return state_differences(saved, expected)

  def check_some_step_fits(self, abstract_state) -> None:
    """A one-line error when steps were saved but none holds arrays of the shapes, dtypes and
    structure these flags build (another model, optimizer or parameter dtype): every restore
    would fail or cast, and setting them all aside would throw a good run away. A step that does
    not fit while another does is damaged; restoring sets it aside. All processes agree."""
    expected = leaf_arrays(abstract_state)
    differences = {step: self._differences(step, expected) for step in sorted(self._manager.all_steps(), reverse=True)}
    refusal = None
    if not any(found == [] for found in differences.values()):
      step, found = next(((step, found) for step, found in differences.items() if found), (None, None))
      if found:
        more = f" and {len(found) - 1} more difference(s)" if len(found) > 1 else ""
        refusal = (f"checkpoint step {step} in {self.directory} does not fit the state these flags build "
                   f"({found[0]}{more}); resume with the flags it was trained with "
                   f"(--flagfile={os.path.dirname(self.directory)}/flags.txt) or use a new --workdir")
    if not _everywhere(refusal is None):
      raise UserError(refusal or f"another process found that no checkpoint in {self.directory} fits the state "
                                 "these flags build; resume with the flags it was trained with or use a new --workdir")

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step out of the manager's view (kept for inspection, not overwritten)."""
    source = os.path.join(self.directory, str(step))
    target = f"{source}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
      os.rename(source, target)
    if jax.process_count() > 1:  # nobody looks again before the rename is done
      multihost_utils.sync_global_devices(f"bigjax: set aside checkpoint step {step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings: what a restore fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


EXPORT_CONFIG = "model.json"
EXPORT_PARAMS = "variables"


def _params_location(path: str) -> tuple[str, bool]:
  """(directory, holds a whole train state) for an export directory or a training workdir."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(os.path.join(path, EXPORT_CONFIG)):
    return os.path.join(path, EXPORT_PARAMS), False
  steps_dir = os.path.join(path, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(steps_dir) if d.isdigit()) if os.path.isdir(steps_dir) else []
  if not steps:
    raise UserError(f"{path} is neither an export directory (no {EXPORT_CONFIG}) nor a workdir with "
                    "checkpoints; point --init_from at one")
  return os.path.join(steps_dir, str(steps[-1]), "state"), True


def _saved_tree(directory: str):
  return ocp.StandardCheckpointer().metadata(directory).item_metadata.tree


def load_variables(path: str, abstract_variables: dict) -> dict:
  """Model variables ({"params": ..., and e.g. "batch_stats"}) from an export directory or the
  newest checkpoint of a workdir, placed with the shardings of `abstract_variables`
  (ShapeDtypeStructs). A structure or shape mismatch is a one-line error naming the first
  parameter that differs."""
  directory, whole_state = _params_location(path)
  saved = _saved_tree(directory)
  if whole_state:  # a train state: {"params", "model_state", "opt_state", ...}
    saved = {"params": saved["params"], **saved.get("model_state", {})}
  _check_same_shapes(saved, abstract_variables, path)
  if not whole_state:
    return ocp.StandardCheckpointer().restore(directory, abstract_variables)
  params, model_state = abstract_variables["params"], {k: v for k, v in abstract_variables.items() if k != "params"}
  target = {"params": params, "model_state": model_state}
  restored = ocp.PyTreeCheckpointer().restore(
      directory, args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return {"params": restored["params"], **restored["model_state"]}


def _check_same_shapes(saved, abstract, path: str) -> None:
  flat_saved = {sharding_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  flat_wanted = {sharding_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  for name, wanted in flat_wanted.items():
    if name not in flat_saved:
      raise UserError(f"--init_from={path} has no parameter {name} (shape {tuple(wanted.shape)}); "
                      "was it saved from the same model?")
    if tuple(flat_saved[name].shape) != tuple(wanted.shape):
      raise UserError(f"--init_from={path}: parameter {name} has shape {tuple(flat_saved[name].shape)} "
                      f"but the model wants {tuple(wanted.shape)}")
  extra = sorted(set(flat_saved) - set(flat_wanted))
  if extra:
    raise UserError(f"--init_from={path} has parameter {extra[0]}, which the model does not")


def export(directory: str, variables: dict, model_name: str, overrides: dict) -> str:
  """Writes the model variables (parameters, batch statistics) and how to rebuild the model (preset
  name and overrides) to `directory`, which `bigjax.models.load` reads back without any training
  state."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(os.path.join(directory, EXPORT_PARAMS)):
    raise UserError(f"{directory} already holds an export; choose a new --export_dir")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, EXPORT_PARAMS), variables)
  ckpt.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, EXPORT_CONFIG), "w") as f:
      json.dump({"model": model_name, "overrides": overrides}, f, indent=2)
  return directory


def read_export(directory: str):
  """(model name, overrides, variables) of an export directory."""
  directory = os.path.abspath(os.path.expanduser(directory))
  config_path = os.path.join(directory, EXPORT_CONFIG)
  if not os.path.exists(config_path):
    raise UserError(f"{directory} is not a bigjax export (no {EXPORT_CONFIG})")
  with open(config_path) as f:
    config = json.load(f)
  variables = ocp.StandardCheckpointer().restore(os.path.join(directory, EXPORT_PARAMS))
  return config["model"], _tuples(config["overrides"]), variables


def _tuples(value):
  """JSON turns tuples into lists; configs want them back (and hashable)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value
