"""Device meshes from a flag spec, the logical-axis rules, and the shardings derived from them."""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bigjax import private_apis
from bigjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes. Parameters use the plain names; activations use act_* names so
# that an activation's model dim is never sharded over fsdp while its batch dim already is.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("conv_out", ("fsdp", "tensor")),  # conv kernels: input channels (often 1 or 3) stay whole
)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
  """Starts JAX's multi-controller runtime when this is one process of many; call before any
  other JAX call. Given a coordinator, the three values are used as they are; without one,
  `jax.distributed.initialize()` runs only where JAX recognises a cluster (Cloud TPU pod, SLURM,
  Open MPI, Kubernetes) and fills them in itself. Returns whether it initialised."""
  if coordinator_address is None:
    if num_processes is not None or process_id is not None:
      raise UserError(
          "--num_processes and --process_id need --coordinator_address (host:port of process 0)"
      )
    if not private_apis.jax_cluster_detected():
      return False
  elif num_processes is None or process_id is None:
    raise UserError("--coordinator_address needs --num_processes and --process_id too")
  elif not 0 <= process_id < num_processes:
    raise UserError(
        f"--process_id={process_id} must be in [0, {num_processes}) for --num_processes={num_processes}"
    )
  # CPU processes exchange collectives over gloo; GPU and TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """'data:-1,fsdp:2,tensor:1' -> {'data': n / 2, 'fsdp': 2, 'tensor': 1}; -1 takes the rest."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if name not in MESH_AXES:
      raise UserError(
          f"--mesh={spec!r}: unknown axis {name!r}; use the axes {', '.join(MESH_AXES)}"
      )
    if name in sizes:
      raise UserError(f"--mesh={spec!r}: axis {name!r} is given twice")
    try:
      sizes[name] = int(size)
    except ValueError:
      raise UserError(
          f"--mesh={spec!r}: size of {name!r} must be an integer, got {size!r}"
      ) from None
    if sizes[name] == 0 or sizes[name] < -1:
      raise UserError(
          f"--mesh={spec!r}: size of {name!r} must be positive or -1, got {sizes[name]}"
      )
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise UserError(f"--mesh={spec!r}: only one axis may be -1, got {', '.join(free)}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise UserError(
          f"--mesh={spec!r}: the fixed axes multiply to {fixed}, which does not divide "
          f"the {num_devices} devices"
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    there_are = "there is 1 device" if num_devices == 1 else f"there are {num_devices} devices"
    raise UserError(
        f"--mesh={spec!r}: the axes multiply to {fixed} but {there_are}; make them match "
        f"or give one axis -1"
    )
  return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (every process's, in a multi-process run).

  Axes are AxisType.Auto: Linen's logical partitioning lets XLA propagate shardings, which
  Explicit axes (jax.make_mesh's default since JAX 0.10) reject for sharded contractions.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh_spec(spec, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def describe(mesh: Mesh) -> str:
  return ", ".join(f"{name}={size}" for name, size in mesh.shape.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[name] for name in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
  """The global batch must split evenly over data x fsdp (for each of `grad_accum` micro-batches),
  and over the processes that feed it."""
  ways = data_parallel_size(mesh)
  if grad_accum < 1:
    raise UserError(f"--grad_accum={grad_accum} must be at least 1")
  if batch_size % (ways * grad_accum):
    per_micro = f" x {grad_accum} micro-batches" if grad_accum > 1 else ""
    raise UserError(
        f"--batch_size={batch_size} does not divide over the {ways} data-parallel "
        f"devices (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}){per_micro}; "
        f"use a multiple of {ways * grad_accum}"
    )
  if batch_size % jax.process_count():
    raise UserError(
        f"--batch_size={batch_size} does not divide over {jax.process_count()} processes"
    )


def logical_shardings(abstract_boxed, mesh: Mesh):
  """NamedShardings for a tree whose leaves carry logical names (nn.Partitioned); others replicate."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES)


def check_divisible(abstract_boxed, shardings) -> None:
  """Fails with the parameter's path when a sharded dim does not split evenly over its mesh axes."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  leaves = jax.tree_util.tree_leaves_with_path(abstract_boxed, is_leaf=is_box)
  for (path, leaf), sharding in zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True):
    leaf = leaf.value if is_box(leaf) else leaf
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(sharding.mesh.shape[a] for a in axes)
      if leaf.shape[dim] % ways:
        raise UserError(
            f"parameter {path_name(path)} has size {leaf.shape[dim]} in dim "
            f"{dim}, which does not divide over mesh axes {'x'.join(axes)} ({ways} ways); "
            f"change --mesh or the model size"
        )


def path_name(path) -> str:
  """'block_0/attn/query/kernel' for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def describe_params(params) -> str:
  """A table of every parameter: path, shape, mesh axes per dimension, and the shard each device holds."""
  rows = [("parameter", "shape", "sharding", "per device")]
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    shard = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
    rows.append(
        (
            path_name(path),
            str(tuple(x.shape)),
            str(tuple(spec)) if spec is not None else "-",
            str(tuple(shard)),
        )
    )
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def host_to_global(batch, mesh: Mesh):
  """Turns this process's slice of the batch (numpy) into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
