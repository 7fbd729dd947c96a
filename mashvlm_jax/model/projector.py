"""Vision-to-language projector: linear, or LLaVA's 2-layer GELU MLP."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mashvlm_jax.model.config import PROJECTORS
from mashvlm_jax.model.llm import partitioned, rows

_INIT = nn.initializers.normal(stddev=0.02)


class Projector(nn.Module):
  """[..., vision_width] -> [..., llm_width]; kind "linear" or "mlp2x_gelu" (exact GELU).

  ``features`` is everything before the last layer and ``output`` the last layer, an
  affine map; ``__call__`` is ``output(features(x))``. Averages of projected tokens equal
  ``output`` of averaged ``features`` (MashVLM pools there, before the last layer).
  """
  out_features: int
  kind: str = "mlp2x_gelu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.kind not in PROJECTORS:
      raise ValueError(f"projector kind must be one of {PROJECTORS}, found {self.kind!r}")
    dense = functools.partial(nn.Dense, self.out_features, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    self.linear_1 = dense(kernel_init=partitioned(_INIT, ("vision_embed", "embed")))
    if self.kind == "mlp2x_gelu":
      self.linear_2 = dense(kernel_init=partitioned(_INIT, ("mlp", "embed")))

  def __call__(self, x):
    return self.output(self.features(x))

  def features(self, x):
    """[..., vision_width] -> the input of the last layer: x itself ("linear") or
    gelu(linear_1(x)) [..., llm_width] ("mlp2x_gelu")."""
    if self.kind == "linear":
      return x
    return jax.nn.gelu(rows(self.linear_1, x), approximate=False)

  def output(self, h):
    """The last layer, affine: linear_1 ("linear") or linear_2 ("mlp2x_gelu")."""
    return rows(self.linear_1 if self.kind == "linear" else self.linear_2, h)
