"""Vision-to-language projector: linear, or LLaVA's 2-layer GELU MLP."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mashvlm_jax.model.llm import partitioned

_INIT = nn.initializers.normal(stddev=0.02)


class Projector(nn.Module):
  """[..., vision_width] -> [..., llm_width]; kind "linear" or "mlp2x_gelu" (exact GELU)."""
  out_features: int
  kind: str = "mlp2x_gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, self.out_features, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    x = dense(name="linear_1", kernel_init=partitioned(_INIT, ("vision_embed", "embed")))(x)
    if self.kind == "linear":
      return x
    if self.kind != "mlp2x_gelu":
      raise ValueError(f"projector kind must be 'linear' or 'mlp2x_gelu', found {self.kind!r}")
    x = jax.nn.gelu(x, approximate=False)
    return dense(name="linear_2", kernel_init=partitioned(_INIT, ("mlp", "embed")))(x)
