"""Orbax checkpoints of the whole train state plus the grain data-iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written step that looks finished. Saves are asynchronous: the device
arrays are copied to host, then written while training goes on. Each step also holds fingerprints
of the state's arrays, computed on the devices at save time and checked after every restore, so a
step whose files were damaged without becoming unreadable (bytes overwritten on disk) is treated
like an unreadable one instead of being trained on.
"""

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from bigjax import storage
from bigjax import workdir as workdir_lib
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
  return {
      sharding_path(path): f"{getattr(leaf, 'dtype', '')}{list(getattr(leaf, 'shape', ()))}"
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def state_differences(saved: dict, expected: dict) -> list[str]:
  """How a saved state's arrays (leaf_arrays) differ from the ones this run builds, one phrase
  each; parameters before optimizer state, as they name the model setting that changed."""
  order = functools.partial(sorted, key=lambda path: (path.startswith("opt_state/"), path))
  return (
      [
          f"{path}: saved {saved[path]}, this run {expected[path]}"
          for path in order(saved.keys() & expected.keys())
          if saved[path] != expected[path]
      ]
      + [f"{path} only in the checkpoint" for path in order(saved.keys() - expected.keys())]
      + [f"{path} only in this run" for path in order(expected.keys() - saved.keys())]
  )


# ---- fingerprints of the state's values -------------------------------------------------------------

FINGERPRINTS = "fingerprints"  # the item of a step that holds them


def _as_uint32(x):
  """The bits of `x` as uint32 words (8-byte types give two per element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  words = jax.lax.bitcast_convert_type(
      x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  )
  return words.astype(jnp.uint32)


@jax.jit
def _fingerprints(tree):
  """Two position-weighted sums of each leaf's bits, modulo 2**32 (odd weights: any change to one
  word changes both; integer sums give the same result on any mesh and in any reduction order)."""

  def leaf(x):
    words = _as_uint32(x).reshape(-1)
    index = jnp.arange(words.size, dtype=jnp.uint32)
    first = jnp.sum(words * (index * jnp.uint32(0x9E3779B9) | jnp.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(
        (words ^ jnp.uint32(0x5BD1E995))
        * ((index + jnp.uint32(0x7F4A7C15)) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)),
        dtype=jnp.uint32,
    )
    return jnp.stack([first, second])

  return jax.tree.map(leaf, tree)


def fingerprints(tree) -> dict[str, list[int]]:
  """{"params/head/kernel": [a, b]} for every array leaf of `tree` (global arrays on any mesh)."""
  sums = _fingerprints(tree)
  # Replicated results: every process holds the whole value in its first shard.
  return {
      sharding_path(path): [int(v) for v in np.asarray(leaf.addressable_data(0))]
      for path, leaf in jax.tree_util.tree_leaves_with_path(sums)
  }


class CorruptCheckpoint(Exception):
  """A step's arrays restored but do not match the fingerprints written with them."""


def _first_mismatch(saved: dict, restored: dict) -> str | None:
  for path in sorted(saved.keys() | restored.keys()):
    if saved.get(path) != restored.get(path):
      return path
  return None


# ---- save failures -----------------------------------------------------------------------------------

_NO_SPACE = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "a file grew past the size limit",
}
_NO_WRITE = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# How the storage libraries under Orbax (tensorstore, etils) spell those errors in their messages.
_SPELLINGS = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


def storage_errno(error: BaseException) -> int | None:
  """The errno of a storage failure anywhere in `error`'s chain (its causes and context, and the
  text of errors that wrap a C++ one), or None when it is not one."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in {**_NO_SPACE, **_NO_WRITE}:
      return error.errno
    for text, number in _SPELLINGS.items():
      if text in str(error):
        return number
    error = error.__cause__ or error.__context__
  return None


def state_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _mib(num_bytes: float) -> str:
  return f"{num_bytes / 2**20:,.1f} MiB"


class Checkpointer:
  """Saves every `every` steps into `directory`, keeps the newest `keep`, restores the latest."""

  def __init__(
      self,
      directory: str,
      *,
      every: int,
      keep: int = 3,
      best_metric: str | None = None,
      best_is_highest: bool = False,
      read_only: bool = False,
  ):
    """Keeps the newest `keep` checkpoints and, with `best_metric` (say "eval_loss"), also the one
    with the best value of that metric: the highest with `best_is_highest` (the task says which
    metrics those are: bigjax.tasks.higher_is_better), else the lowest. A read-only
    one (evaluation, export, sampling) neither writes nor cleans up: a run may be saving there."""
    self.directory = storage.absolute(directory)
    self.every = every
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(
          checkpoint_managers.BestN(
              get_metric_fn=lambda metrics: metrics[best_metric],
              reverse=not best_is_highest,  # reverse=True keeps the lowest value
              n=1,
              keep_checkpoints_without_metrics=False,
          )
      )
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            # Not Orbax's own read_only, which warns on every use.
            create=not read_only,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        ),
    )
    self._pending = None  # (step, bytes) of the save in flight
    self.last_complete = None  # the newest step known to be fully written

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iterator=None, metrics: dict | None = None) -> None:
    """Starts writing `step` (returns once the arrays are copied to host). `metrics` with the
    best metric in it make this step a candidate for the best checkpoint. A failed write (this
    one, or the previous one still in flight) is a one-line UserError naming the last good step."""
    self.wait()  # the previous save's failure is reported before anything new is written
    self._pending = (step, self._step_bytes(state))
    # Checked before Orbax starts: a write that fails for space fails in its threads, noisily, and
    # on a directory that became read-only Orbax waits minutes before it gives up.
    try:
      problem = None if storage.is_remote(self.directory) else self._local_space_problem()
    except OSError as e:
      problem = e.errno if e.errno in {**_NO_SPACE, **_NO_WRITE} else errno.EACCES
    if not _everywhere(problem is None):
      raise self._failed_save(problem or errno.EACCES)
    args = {
        "state": ocp.args.StandardSave(state),
        FINGERPRINTS: ocp.args.JsonSave(fingerprints(state)),
    }
    if data_iterator is not None:
      args["data"] = _grain_checkpoint().CheckpointSave(data_iterator)
    if not (self.best_metric and metrics and self.best_metric in metrics):
      metrics = None
    with self._reporting_failures():
      self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics, force=True)

  def _local_space_problem(self) -> int | None:
    """ENOSPC when the disk has less free space than the next step needs (an object store has no
    such figure: its writes fail on their own)."""
    workdir_lib.write_probe(self.directory)
    return None if shutil.disk_usage(self.directory).free >= self._pending[1] else errno.ENOSPC

  def wait(self) -> None:
    """Until the save in flight is on disk; its failure is a one-line UserError."""
    with self._reporting_failures():
      self._manager.wait_until_finished()
    if self._pending is not None:
      self.last_complete = self._pending[0]
      self._pending = None

  @contextlib.contextmanager
  def _reporting_failures(self):
    """A save's failure for space or permissions becomes one line; other errors pass unchanged."""
    try:
      yield
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for one cause
      number = storage_errno(e)
      if number is None:
        raise
      raise self._failed_save(number) from None

  def _failed_save(self, number: int) -> UserError:
    """What to tell the user when a save failed for space or permissions, after removing what it
    left half-written."""
    step, needed = self._pending or (None, 0)
    self._pending = None
    self._remove_partial_saves()
    last = self.last_complete or max(
        (s for s in self._manager.all_steps() if s != step), default=None
    )
    last_text = (
        f"the last good checkpoint is step {last}" if last else "no checkpoint was saved yet"
    )
    if number in _NO_SPACE:
      free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0  # local
      return UserError(
          f"could not save checkpoint step {step} in {self.directory}: {_NO_SPACE[number]} (a step "
          f"needs about {_mib(needed)}, {_mib(free)} free there); {last_text}; free some space "
          "(or lower --keep_checkpoints) and rerun to resume"
      )
    return UserError(
        f"could not save checkpoint step {step} in {self.directory}: {_NO_WRITE[number]}; "
        f"{last_text}; make the directory writable and rerun to resume"
    )

  def _remove_partial_saves(self) -> None:
    """Deletes the temporary directories of unfinished saves (Orbax names them *.orbax-checkpoint-tmp*)."""
    if jax.process_index() != 0:
      return
    for name in storage.list_names(self.directory):
      if "orbax-checkpoint-tmp" in name:
        with contextlib.suppress(OSError):
          storage.remove(os.path.join(self.directory, name))

  def _step_bytes(self, state) -> int:
    """What the next step will take on disk: as much as the newest saved one, or the state's size."""
    newest = max(self._manager.all_steps(), default=None)
    if newest is None:
      return state_bytes(state)
    return storage.tree_bytes(os.path.join(self.directory, str(newest)))

  def _has_fingerprints(self, step: int) -> bool:
    return storage.is_dir(os.path.join(self.directory, str(step), FINGERPRINTS))

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, placed with the shardings in `abstract_state` (any mesh), and the
    data iterator moved to where it was. Raises CorruptCheckpoint when the restored arrays do not
    match their fingerprints (steps saved before bigjax wrote them are not checked)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    checked = self._has_fingerprints(step)
    if checked:
      args[FINGERPRINTS] = ocp.args.JsonRestore()
    if data_iterator is not None:
      args["data"] = _grain_checkpoint().CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    if checked:
      mismatch = _first_mismatch(restored[FINGERPRINTS], fingerprints(restored["state"]))
      if mismatch is not None:
        raise CorruptCheckpoint(
            f"the values of {mismatch} differ from what was saved: the files were damaged "
            "after they were written"
        )
    return restored["state"]

  def restore_newest_readable(
      self, abstract_state, data_iterator=None, *, set_aside: bool = True, refusal=None
  ):
    """(state, step, unreadable) from the newest checkpoint that restores and matches its
    fingerprints; (None, 0, unreadable) when none does, where `unreadable` lists (step, reason)
    of every step that failed.

    A step that fails (files cut short, deleted or damaged) is skipped for the one before it, so
    a damaged newest save costs only the steps since the previous one. Training sets the failed
    steps aside once a good one is found (renamed, so that new saves do not build on them);
    read-only callers (evaluation, export) pass set_aside=False and leave the workdir as it is.
    When no step restores, nothing is moved: the caller decides (see `set_aside_steps`).
    `refusal(step)`, when given, judges the step that restored before anything is moved: a
    message (from any process) stops with it as a UserError.
    """
    self.check_some_step_fits(abstract_state)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored, error = self.restore(step, abstract_state, data_iterator), None
      except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
        restored, error = None, e
      # Every process must take the same step, even when only one of them could not read its shards.
      if _everywhere(error is None):
        why = None if refusal is None else refusal(step)
        if not _everywhere(why is None):
          raise UserError(
              why or f"another process refused checkpoint step {step} in {self.directory}"
          )
        for bad, reason in unreadable:
          action = f"moved it to {self._set_aside(bad)}" if set_aside else "left it in place"
          print(
              f"checkpoint step {bad} in {self.directory} is unreadable ({reason}); {action} and resumed from "
              f"step {step}",
              file=sys.stderr,
              flush=True,
          )
        self.last_complete = step
        return restored, step, unreadable
      unreadable.append(
          (step, "another process could not read its part" if error is None else _reason(error))
      )
    return None, 0, unreadable

  def set_aside_steps(self, steps) -> list[str]:
    """Renames each step out of the manager's view; the new names."""
    return [self._set_aside(step) for step in steps]

  def _differences(self, step: int, expected: dict) -> list[str] | None:
    """How `step`'s saved state differs from `expected` (leaf_arrays), or None when its metadata
    cannot be read."""
    try:
      metadata = ocp.PyTreeCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / "state"
      )
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
    differences = {
        step: self._differences(step, expected)
        for step in sorted(self._manager.all_steps(), reverse=True)
    }
    refusal = None
    if not any(found == [] for found in differences.values()):
      step, found = next(
          ((step, found) for step, found in differences.items() if found), (None, None)
      )
      if found:
        more = f" and {len(found) - 1} more difference(s)" if len(found) > 1 else ""
        refusal = (
            f"checkpoint step {step} in {self.directory} does not fit the state these flags build "
            f"({found[0]}{more}); resume with the flags it was trained with "
            f"(--flagfile={os.path.dirname(self.directory)}/flags.txt) or use a new --workdir"
        )
    if not _everywhere(refusal is None):
      raise UserError(
          refusal
          or f"another process found that no checkpoint in {self.directory} fits the state "
          "these flags build; resume with the flags it was trained with or use a new --workdir"
      )

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step out of the manager's view (kept for inspection, not overwritten)."""
    source = os.path.join(self.directory, str(step))
    target = f"{source}.unreadable-{int(time.time())}"
    if jax.process_index() == 0:
      storage.rename(source, target)
    if jax.process_count() > 1:  # nobody looks again before the rename is done
      multihost_utils.sync_global_devices(f"bigjax: set aside checkpoint step {step}")
    self._manager.reload()
    return target

  def close(self) -> None:
    self.wait()
    self._manager.close()


def _reason(error: BaseException) -> str:
  """One line saying why a step could not be restored."""
  first_line = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore details")[
      0
  ][:200]
  return (
      first_line
      if isinstance(error, CorruptCheckpoint)
      else f"{type(error).__name__}: {first_line}"
  )


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings: what a restore fills in."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


EXPORT_CONFIG = "model.json"
EXPORT_PARAMS = "variables"
EXPORT_FINGERPRINTS = "fingerprints.json"


def saved_steps(workdir: str) -> list[int]:
  """The steps a training workdir holds checkpoint directories for, oldest first."""
  steps_dir = os.path.join(storage.absolute(workdir), "checkpoints")
  return sorted(int(d) for d in storage.list_names(steps_dir) if d.isdigit())


def _params_location(path: str) -> tuple[str, bool]:
  """(directory, holds a whole train state) for an export directory or a training workdir."""
  path = storage.absolute(path)
  if storage.exists(os.path.join(path, EXPORT_CONFIG)):
    return os.path.join(path, EXPORT_PARAMS), False
  steps_dir = os.path.join(path, "checkpoints")
  steps = saved_steps(path)
  if not steps:
    raise UserError(
        f"{path} is neither an export directory (no {EXPORT_CONFIG}) nor a workdir with "
        "checkpoints; point --init_from at one"
    )
  return os.path.join(steps_dir, str(steps[-1]), "state"), True


def _saved_tree(directory: str, path: str):
  with _reading(directory, path):
    return ocp.StandardCheckpointer().metadata(directory).item_metadata.tree


@contextlib.contextmanager
def _reading(directory: str, path: str):
  """Any failure to read the saved arrays at `directory` becomes one line naming it."""
  try:
    yield
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types for one cause
    raise UserError(
        f"cannot read the parameters saved in {directory} ({_reason(e)}); {path} is damaged or "
        "incomplete: export or copy it again"
    ) from None


def _check_fingerprints(expected: dict, variables: dict, directory: str, path: str) -> None:
  mismatch = _first_mismatch(expected, fingerprints(variables))
  if mismatch is not None:
    raise UserError(
        f"the parameters saved in {directory} are damaged: the values of {mismatch} differ from what "
        f"was written; export or copy {path} again"
    )


def _expected_fingerprints(directory: str, whole_state: bool) -> dict | None:
  """The fingerprints written with an export (its fingerprints.json) or with a checkpoint step
  (its fingerprints item, which also covers the optimizer state), for the model variables only."""
  if whole_state:
    step_dir = os.path.dirname(directory)
    file = os.path.join(step_dir, FINGERPRINTS, "metadata")
    prefixes = {"params/": "params/", "model_state/": ""}
  else:
    file = os.path.join(os.path.dirname(directory), EXPORT_FINGERPRINTS)
    prefixes = {"": ""}
  if not storage.exists(file):
    return None  # written before bigjax kept fingerprints
  try:
    saved = json.loads(storage.read_text(file))
  except (OSError, json.JSONDecodeError):
    return {"(fingerprints file)": None}  # damaged itself: nothing can match it
  return {
      new + key[len(old) :]: value
      for key, value in saved.items()
      for old, new in prefixes.items()
      if key.startswith(old) and (old or not whole_state)
  }


def load_variables(path: str, abstract_variables: dict) -> dict:
  """Model variables ({"params": ..., and e.g. "batch_stats"}) from an export directory or the
  newest checkpoint of a workdir, placed with the shardings of `abstract_variables`
  (ShapeDtypeStructs). A structure or shape mismatch, damaged files or values that differ from
  their fingerprints are a one-line error naming the first parameter that differs or the files."""
  directory, whole_state = _params_location(path)
  saved = _saved_tree(directory, path)
  if whole_state:  # a train state: {"params", "model_state", "opt_state", ...}
    saved = {"params": saved["params"], **saved.get("model_state", {})}
  _check_same_shapes(saved, abstract_variables, path)
  with _reading(directory, path):
    if not whole_state:
      variables = ocp.StandardCheckpointer().restore(directory, abstract_variables)
    else:
      params = abstract_variables["params"]
      model_state = {k: v for k, v in abstract_variables.items() if k != "params"}
      target = {"params": params, "model_state": model_state}
      restored = ocp.PyTreeCheckpointer().restore(
          directory,
          args=ocp.args.PyTreeRestore(
              item=target,
              partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          ),
      )
      variables = {"params": restored["params"], **restored["model_state"]}
  expected = _expected_fingerprints(directory, whole_state)
  if expected is not None:
    _check_fingerprints(expected, variables, directory, path)
  return variables


def _check_same_shapes(saved, abstract, path: str) -> None:
  flat_saved = {sharding_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved)}
  flat_wanted = {
      sharding_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(abstract)
  }
  for name, wanted in flat_wanted.items():
    if name not in flat_saved:
      raise UserError(
          f"--init_from={path} has no parameter {name} (shape {tuple(wanted.shape)}); "
          "was it saved from the same model?"
      )
    if tuple(flat_saved[name].shape) != tuple(wanted.shape):
      raise UserError(
          f"--init_from={path}: parameter {name} has shape {tuple(flat_saved[name].shape)} "
          f"but the model wants {tuple(wanted.shape)}"
      )
  extra = sorted(set(flat_saved) - set(flat_wanted))
  if extra:
    raise UserError(f"--init_from={path} has parameter {extra[0]}, which the model does not")


def export(directory: str, variables: dict, model_name: str, overrides: dict) -> str:
  """Writes the model variables (parameters, batch statistics) and how to rebuild the model (preset
  name and overrides) to `directory`, which `bigjax.models.load` reads back without any training
  state."""
  directory = storage.absolute(directory)
  if storage.exists(os.path.join(directory, EXPORT_PARAMS)):
    raise UserError(f"{directory} already holds an export; choose a new --export_dir")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(directory, EXPORT_PARAMS), variables)
  ckpt.wait_until_finished()
  sums = fingerprints(variables)
  if jax.process_index() == 0:
    workdir_lib.replace_file(os.path.join(directory, EXPORT_FINGERPRINTS), json.dumps(sums))
    workdir_lib.replace_file(
        os.path.join(directory, EXPORT_CONFIG),
        json.dumps({"model": model_name, "overrides": overrides}, indent=2),
    )
  return directory


def is_export(directory: str) -> bool:
  return storage.exists(os.path.join(storage.absolute(directory), EXPORT_CONFIG))


def read_export_identity(directory: str) -> tuple[str, dict]:
  """(model name, overrides) that an export directory's model was built from."""
  directory = storage.absolute(directory)
  config_path = os.path.join(directory, EXPORT_CONFIG)
  if not storage.exists(config_path):
    raise UserError(f"{directory} is not a bigjax export (no {EXPORT_CONFIG})")
  try:
    config = json.loads(storage.read_text(config_path))
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path} is not valid JSON ({e}); export the model again") from None
  return config["model"], _tuples(config["overrides"])


def read_export(directory: str):
  """(model name, overrides, variables) of an export directory."""
  name, overrides = read_export_identity(directory)
  directory = storage.absolute(directory)
  params_dir = os.path.join(directory, EXPORT_PARAMS)
  with _reading(params_dir, directory):
    variables = ocp.StandardCheckpointer().restore(params_dir)
  expected = _expected_fingerprints(params_dir, whole_state=False)
  if expected is not None:
    _check_fingerprints(expected, variables, params_dir, directory)
  return name, overrides, variables


def _tuples(value):
  """JSON turns tuples into lists; configs want them back (and hashable)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value
