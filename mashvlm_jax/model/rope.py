"""Rotary position embedding driven by two position-id streams (Harmonic-RoPE).

HuggingFace LLaMA's ``rotate_half`` layout: rotary pair k (k in [0, d/2)) is the pair of
dims (k, k + d/2), rotated by angle ``pos * inv_freq[k]`` with inv_freq[k] =
theta^(-2k/d). Pair k takes its position from id row ``k % 2``: row 0 for even pairs,
row 1 for odd pairs (``layout.position_ids`` fills the rows per RoPE mode).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: Mapping[str, Any] | None = None) -> np.ndarray:
  """float32[head_dim // 2]: theta^(-2k/d), with LLaMA's optional rope_scaling applied.

  ``scaling`` follows HuggingFace's ``rope_scaling`` dict: None / {"rope_type": "default"},
  {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor",
  "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
  """
  if head_dim % 2:
    raise ValueError(f"rotary head_dim must be even, found {head_dim}")
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    pass
  elif kind == "linear":
    inv = inv / float(scaling["factor"])
  elif kind == "llama3":
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    inv = np.where(wavelen > old_len / low, inv / factor,
                   np.where(wavelen < old_len / high, inv, mid))
  else:
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: "
                     f"{SUPPORTED_ROPE_SCALING}")
  return inv.astype(np.float32)


def rotary_angles(position_ids: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Angles float32[B, S, d/2] for ids int[B, 2, S]: pair k uses id row k % 2."""
  pair_row = np.arange(inv_freq.shape[0]) % 2  # [d/2]
  ids = jnp.take(position_ids, pair_row, axis=-2).astype(jnp.float32)  # [B, d/2, S]
  return jnp.swapaxes(ids, -1, -2) * inv_freq  # [B, S, d/2]


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
  """Rotates x [B, S, H, d] by angles [B, S, d/2]; computed in float32, returns x.dtype."""
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.concatenate([cos, cos], axis=-1)
  sin = jnp.concatenate([sin, sin], axis=-1)
  xf = x.astype(jnp.float32)
  return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
