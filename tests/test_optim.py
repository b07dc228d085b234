import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax import optim
from bigjax.errors import UserError


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedules_warm_up_linearly_to_the_peak(schedule):
  lr = optim.make_schedule(
      optim.OptimConfig(learning_rate=2.0, schedule=schedule, warmup_steps=10), 100
  )
  if schedule == "constant":
    assert float(lr(0)) == float(lr(50)) == 2.0
    return
  warmup = [float(lr(s)) for s in range(11)]
  # The first step already learns
  assert warmup[0] > 0 and warmup[0] == pytest.approx(0.2, rel=1e-5)
  assert all(b > a for a, b in zip(warmup, warmup[1:-1]))
  np.testing.assert_allclose(np.diff(warmup[:10]), np.diff(warmup[:10])[0], rtol=1e-4)  # linear
  np.testing.assert_allclose(warmup[10], 2.0, rtol=0.05)


def test_cosine_and_linear_decay_to_zero_at_the_end():
  for schedule in ("warmup_cosine", "warmup_linear"):
    lr = optim.make_schedule(
        optim.OptimConfig(learning_rate=1.0, schedule=schedule, warmup_steps=10), 100
    )
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-6)
  cosine = optim.make_schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=10), 110)
  np.testing.assert_allclose(float(cosine(60)), 0.5, rtol=1e-5)  # half way through the decay


def test_inverse_sqrt_decays_as_one_over_root_step():
  lr = optim.make_schedule(
      optim.OptimConfig(learning_rate=1.0, schedule="inverse_sqrt", warmup_steps=100), 10_000
  )
  np.testing.assert_allclose(float(lr(399)), 0.5, rtol=1e-5)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_descends_a_quadratic(name):
  cfg = optim.OptimConfig(
      optimizer=name,
      learning_rate=0.05,
      schedule="constant",
      warmup_steps=0,
      weight_decay=0.01,
      grad_clip=10.0,
  )
  tx = optim.make_optimizer(cfg, 100)
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  state = tx.init(params)
  start = loss(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.7 * start


def test_weight_decay_skips_vectors():
  cfg = optim.OptimConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, grad_clip=0.0)
  tx = optim.make_optimizer(cfg, 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)


def test_gradient_clipping_bounds_the_global_norm():
  cfg = optim.OptimConfig(
      optimizer="sgd", learning_rate=1.0, schedule="constant", momentum=0.0, grad_clip=1.0
  )
  tx = optim.make_optimizer(cfg, 10)
  params = {"w": jnp.zeros(4)}
  updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def test_unknown_names_are_user_errors():
  with pytest.raises(UserError, match="unknown optimizer 'adamx'"):
    optim.make_optimizer(optim.OptimConfig(optimizer="adamx"), 10)
  with pytest.raises(UserError, match="unknown schedule 'cyclic'"):
    optim.make_schedule(optim.OptimConfig(schedule="cyclic"), 10)
