"""MASH-VLM's video token builder (paper Sec. 3.1; docs/design.md): a pure function.

Spatial tokens (N = grid_h * grid_w): frames are split into 4 temporal segments with
numpy's ``array_split`` rule (when T is not a multiple of 4, the first T mod 4 segments get
one extra frame: T=6 -> 2,2,1,1), averaged within each segment, 2x2-average-pooled, and the
4 pooled grids are concatenated segment-major, each grid row-major.

Temporal tokens (M = 3T-1): T class tokens, T spatially averaged frames, T-1 spatially
averaged frame differences (frame t+1 minus frame t), in that order.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout


def segment_bounds(num_frames: int) -> list[tuple[int, int]]:
  """[(start, stop)] frame ranges of the 4 temporal segments (numpy array_split rule)."""
  splits = np.array_split(np.arange(num_frames), layout.NUM_SEGMENTS)
  return [(int(s[0]), int(s[-1]) + 1) for s in splits]


def build_video_tokens(cls: jnp.ndarray, patches: jnp.ndarray,
                       grid: tuple[int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Temporal and spatial tokens from projected frame features.

  Args:
    cls: [B, T, D] projected class tokens.
    patches: [B, T, P, D] projected patch tokens, P = grid_h * grid_w row-major.
    grid: (grid_h, grid_w).
  Returns:
    temporal [B, 3T-1, D] and spatial [B, grid_h * grid_w, D].
  """
  cls, frame_means, spatial = pool_video(cls, patches, grid)
  return temporal_tokens(cls, frame_means), spatial


def pool_video(cls: jnp.ndarray, patches: jnp.ndarray,
               grid: tuple[int, int]) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """The averages the tokens are made of: (cls [B, T, D] as given, frame means [B, T, D]
  over each frame's P patches, spatial [B, grid_h * grid_w, D]: segment means of the
  patches, 2x2-average-pooled). Every output row is an average (weights summing to 1) of
  input rows, so an affine map of the features commutes with it."""
  batch, num_frames, num_patches, dim = patches.shape
  grid_h, grid_w = grid
  layout.video_token_counts(num_frames, grid)  # validates T >= 4 and even grid
  if num_patches != grid_h * grid_w:
    raise ValueError(f"{num_patches} patches per frame do not form a {grid_h}x{grid_w} grid")
  frame_means = jnp.mean(patches, axis=2)  # [B, T, D]
  segments = jnp.stack([jnp.mean(patches[:, a:b], axis=1)
                        for a, b in segment_bounds(num_frames)], axis=1)  # [B, 4, P, D]
  segments = segments.reshape(batch, layout.NUM_SEGMENTS, grid_h // 2, 2, grid_w // 2, 2, dim)
  spatial = jnp.mean(segments, axis=(3, 5)).reshape(batch, -1, dim)
  return cls, frame_means, spatial


def temporal_tokens(cls: jnp.ndarray, frame_means: jnp.ndarray) -> jnp.ndarray:
  """[B, 3T-1, D]: the T class tokens, the T frame means, the T-1 differences of
  consecutive frame means (frame t+1 minus frame t)."""
  return jnp.concatenate([cls, frame_means, frame_means[:, 1:] - frame_means[:, :-1]], axis=1)
