"""The benchmark's FLOP formulas against an independent count of the matmuls in the jaxpr, and
that count against convolution and matmul FLOPs worked out by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops
from bigjax import models


def _forward_flops(model, inputs):
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs))["params"]
  return params, flops.counted_forward_flops(lambda p, x: model.apply({"params": p}, x), params, inputs)


def test_transformer_formula_is_three_times_the_counted_forward():
  model = models.create("transformer-tiny", num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64, max_len=16)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params, forward = _forward_flops(model, tokens)
  assert flops.transformer_flops_per_token(model.config, params, 16) == 3 * forward / (2 * 16)


def test_lstm_formula_is_three_times_the_counted_forward_over_the_scan():
  model = models.create("lstm-lm", num_layers=2, embed_dim=8, hidden_size=16, vocab_size=32)
  tokens = jnp.zeros((2, 5), jnp.int32)
  params, forward = _forward_flops(model, tokens)
  assert flops.rnn_flops_per_token(model.config, params) == 3 * forward / (2 * 5)


def test_counted_flops_of_a_strided_convolution_and_a_matmul():
  x = jnp.zeros((2, 9, 9, 3))
  kernel = jnp.zeros((3, 3, 3, 4))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (2, 2), [(1, 1)] * 2,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.counted_forward_flops(conv, x, kernel) == 2 * (2 * 5 * 5 * 4) * (3 * 3 * 3)
  assert flops.counted_forward_flops(jnp.matmul, np.zeros((7, 5)), np.zeros((5, 3))) == 2 * 7 * 5 * 3
