import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bigjax import models
from bigjax import optim
from bigjax import sharding
from bigjax import tasks
from bigjax import train
from bigjax.errors import UserError


def test_mesh_spec_fills_the_free_axis():
  assert sharding.parse_mesh_spec("data:-1,fsdp:2,tensor:1", 8) == {
      "data": 4,
      "fsdp": 2,
      "tensor": 1,
  }
  with pytest.raises(UserError, match="multiply to 2 but there are 8"):
    sharding.parse_mesh_spec("tensor:2", 8)
  with pytest.raises(UserError, match="multiply to 2 but there is 1 device;"):
    sharding.parse_mesh_spec("data:2", 1)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("data:3,fsdp:1,tensor:1", "multiply to 3 but there are 8 devices"),
        ("data:-1,tensor:3", "fixed axes multiply to 3, which does not divide the 8 devices"),
        ("data:-1,fsdp:-1", "only one axis may be -1"),
        ("batch:8", "unknown axis 'batch'"),
        ("data:two", "must be an integer"),
        ("data:8,data:1", "given twice"),
    ],
)
def test_bad_mesh_specs_say_what_clashes(spec, message):
  with pytest.raises(UserError, match=message):
    sharding.parse_mesh_spec(spec, 8)


def test_mesh_axes_are_auto():
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_batch_must_divide_over_data_and_fsdp():
  mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
  sharding.check_batch_size(8, mesh)
  with pytest.raises(
      UserError, match="--batch_size=6 does not divide over the 4 data-parallel devices"
  ):
    sharding.check_batch_size(6, mesh)


def _tiny_model(**overrides):
  return models.create(
      "transformer-tiny",
      **{
          "num_layers": 2,
          "embed_dim": 32,
          "num_heads": 4,
          "mlp_dim": 64,
          "max_len": 16,
          **overrides,
      },
  )


def _batch(batch_size=8, length=16):
  return {
      "tokens": np.asarray(
          jax.random.randint(jax.random.key(7), (batch_size, length + 1), 0, 256), np.int32
      )
  }


def run_steps(spec, devices, num_steps=3, model=None, task=None, batch=None):
  """Losses of `num_steps` AdamW steps on a fixed batch, and the final state, on the given mesh."""
  mesh = sharding.make_mesh(spec, devices)
  model = model or _tiny_model()
  tx = optim.make_optimizer(
      optim.OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1), 10
  )
  task = task or tasks.LanguageModelling()
  batch = _batch() if batch is None else batch
  with train.mesh_context(mesh):
    steps = train.compile_steps(
        model=model, tx=tx, task=task, example_batch=batch, mesh=mesh, rng=jax.random.PRNGKey(0)
    )
    state = steps.init(jax.random.PRNGKey(0))
    losses = []
    for _ in range(num_steps):
      state, metrics = steps.train_step(state, sharding.host_to_global(batch, mesh))
      losses.append(float(metrics["sums"]["loss"] / metrics["sums"]["count"]))
  return losses, state


def test_parameters_and_optimizer_state_are_sharded_as_the_rules_say():
  _, state = run_steps("data:2,fsdp:2,tensor:2", jax.devices(), num_steps=1)
  block = state.params["block_0"]
  assert block["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert block["attn"]["out"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert block["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert block["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert state.params["token_embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  # Each device really holds only its shard: [32, 4, 8] split 2 ways on dim 0 and 2 on dim 1.
  kernel = block["attn"]["query"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 2, 8)}
  # AdamW's moments follow their parameter.
  moments = {
      sharding.path_name(path): leaf
      for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if sharding.path_name(path).endswith("block_0/mlp/wi/kernel")
  }
  assert len(moments) == 2  # mu and nu
  assert all(m.sharding.spec == P("fsdp", "tensor") for m in moments.values())


def test_heads_that_do_not_divide_the_tensor_axis_name_the_parameter():
  mesh = sharding.make_mesh("data:1,fsdp:1,tensor:8")
  model = _tiny_model(num_heads=2, embed_dim=32)
  tx = optim.make_optimizer(optim.OptimConfig(), 10)
  with (
      train.mesh_context(mesh),
      pytest.raises(
          UserError, match=r"parameter block_0/attn/\w+/(bias|kernel) has size 2 .*\(8 ways\)"
      ),
  ):
    train.compile_steps(
        model=model,
        tx=tx,
        task=tasks.LanguageModelling(),
        example_batch=_batch(),
        mesh=mesh,
        rng=jax.random.PRNGKey(0),
    )
