"""RMS normalisation (Zhang & Sennrich 2019): LayerNorm without re-centring and without a bias.

Llama, Mistral and Qwen normalise every block input with it, and Qwen3 each query and key head.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + epsilon) * scale over the last axis.

  Statistics are taken in float32 whatever the compute dtype (bfloat16 squares lose too much), then
  the normalised value is cast back before the scale: the order Hugging Face's Llama uses, so that
  imported models round as they do there.

  Attributes:
    scale_axis: the logical name of the scale's one axis ("embed" for the residual stream,
      "head_dim" for a per-head q/k norm).
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scale_axis: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale",
        nn.with_logical_partitioning(nn.initializers.ones, (self.scale_axis,)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return scale.astype(self.dtype) * normed.astype(self.dtype)
