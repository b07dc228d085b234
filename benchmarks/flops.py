"""Model FLOPs: the closed-form estimates per token, and an analytic count of the matmul and
convolution FLOPs in a function's jaxpr that checks them (and serves models without a formula)."""

from collections.abc import Callable

import jax
import numpy as np

from bigjax import sharding
from bigjax.nn import recurrent
from bigjax.nn import transformer


def matmul_params(params) -> int:
  """Parameters that multiply activations in a matmul: every kernel (dense, attention, recurrent,
  convolution, heads), not embedding tables that are only looked up, nor biases or norms."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(
      int(np.prod(x.shape)) for path, x in leaves if sharding.path_name(path).endswith("kernel")
  )


def transformer_flops_per_token(cfg: transformer.TransformerConfig, params, seq_len: int) -> float:
  """Training FLOPs per token, PaLM's estimate (Chowdhery et al. 2022, appendix B):
    6 * N + 12 * L * T * D
  N: matmul parameters (the logits head counts, tied or not: it is a V x D matmul per token);
  6 = 2 FLOPs per multiply-add x (1 forward + 2 backward). 12 * L * T * D: the attention score
  and value matmuls (2 x 2 * T * D per token and layer forward, x3 with the backward), counted over
  the full T x T matrix: NO causal halving (the kernels here compute the masked half too)."""
  n = matmul_params(params)
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.embed_dim
  attention_dim = cfg.num_heads * cfg.resolved_head_dim
  return 6.0 * n + 12.0 * cfg.num_layers * seq_len * attention_dim


def rnn_flops_per_token(cfg: recurrent.RNNLMConfig, params) -> float:
  """6 * N per token: the input, recurrent and head kernels are each one matmul per token (gate
  nonlinearities are elementwise and not counted)."""
  n = matmul_params(params)
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.embed_dim
  return 6.0 * n


def counted_forward_flops(fn: Callable, *args) -> float:
  """2 x multiply-adds of every dot_general and convolution in fn's jaxpr (scan bodies times their
  length): an analytic count of the forward pass's matmul FLOPs, independent of XLA."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += (
          2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs_shape[d] for d in lhs_contract])
      )
    elif name == "conv_general_dilated":
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      rhs_shape = eqn.invars[1].aval.shape
      per_output = np.prod([rhs_shape[d] for d in rhs_spec[1:]])
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
    else:
      times = eqn.params.get("length", 1) if name == "scan" else 1
      for sub in _subjaxprs(eqn.params):
        total += times * _jaxpr_flops(sub)
  return total


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item
