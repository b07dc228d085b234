"""Orbax checkpoints of the whole train state plus the grain data-iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save never leaves a half-written step that looks finished. Saves are asynchronous: the device
arrays are copied to host, then written while training goes on.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps into `directory`, keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_iterator=None) -> None:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """The state at `step`, placed with the shardings in `abstract_state` (any mesh), and the
    data iterator moved to where it was."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings: what a restore fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
