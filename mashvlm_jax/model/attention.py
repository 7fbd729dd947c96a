"""Masked multi-head attention with grouped-query heads: one entry point, several backends.

``attend`` is the single call site for every layer. This module holds the dense XLA
backend, the reference that every faster backend (splash on TPU, flash on GPU) must match.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Large finite negative: a fully masked row gives a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    mask: jnp.ndarray) -> jnp.ndarray:
  """Softmax(q k^T / sqrt(d) + mask) v.

  Args:
    q: [B, Sq, Hq, D] queries (already rotated).
    k, v: [B, Sk, Hkv, D]; Hq must be a multiple of Hkv (grouped-query attention).
    mask: bool [B, Sq, Sk] or [Sq, Sk], True = may attend; None = attend everywhere.
  Returns:
    [B, Sq, Hq, D] in q.dtype; logits and softmax in float32.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  if num_heads % num_kv:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv})")
  group = num_heads // num_kv
  qg = q.reshape(batch, q_len, num_kv, group, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  logits = logits * (head_dim ** -0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch,) + mask.shape[-2:])[:, None, None]
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
  return out.reshape(batch, q_len, num_heads, head_dim)


BACKENDS: dict[str, Callable] = {"dense": dense_attention}


def attend(q, k, v, mask, *, backend: str = "dense"):
  """Dispatches to the attention backend named in the config (see ``BACKENDS``)."""
  try:
    fn = BACKENDS[backend]
  except KeyError:
    raise ValueError(f"attention backend {backend!r} is not available; "
                     f"choose one of {sorted(BACKENDS)}") from None
  return fn(q, k, v, mask)
