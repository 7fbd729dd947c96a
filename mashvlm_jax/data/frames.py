"""Frame-array operations of the input pipeline: temporal resampling, resizing, random
resized crop and flip. All take and return uint8 [T, H, W, 3] numpy arrays; one crop (and
one flip) is applied to every frame of a clip so that motion is preserved.
"""
from __future__ import annotations

import math

import numpy as np

from mashvlm_jax.data import video as video_lib


def _axis_matrix(in_size: int, out_size: int, start: float, length: float) -> np.ndarray:
  """float32 [out_size, in_size] bilinear weights sampling the span [start, start +
  length) of an axis of ``in_size`` pixels (half-pixel centres, edge-clamped)."""
  pos = start + (np.arange(out_size) + 0.5) * (length / out_size) - 0.5
  pos = np.clip(pos, 0, in_size - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (pos - lo).astype(np.float32)
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1 - frac)
  np.add.at(m, (rows, hi), frac)
  return m


def crop_resize(video: np.ndarray, box, out_h: int, out_w: int) -> np.ndarray:
  """Bilinear resize of the crop ``box`` = (top, left, height, width) in pixels (floats
  allowed) of every frame to [T, out_h, out_w, 3] (two small matrix products)."""
  top, left, height, width = box
  t, h, w, c = video.shape
  wy = _axis_matrix(h, out_h, top, height)
  wx = _axis_matrix(w, out_w, left, width)
  rows = np.matmul(wy, video.astype(np.float32).reshape(t, h, w * c))  # [T, out_h, W*C]
  out = np.matmul(wx, rows.reshape(t * out_h, w, c)).reshape(t, out_h, out_w, c)
  out += 0.5  # round half up, then clip into uint8 range
  np.clip(out, 0, 255, out=out)
  return out.astype(np.uint8)


def resize(video: np.ndarray, size: int) -> np.ndarray:
  """Shorter side to ``size``, then a centre ``size`` x ``size`` crop (VideoChat2 eval)."""
  h, w = video.shape[1:3]
  if (h, w) == (size, size):
    return video
  side = min(h, w)
  return crop_resize(video, ((h - side) / 2, (w - side) / 2, side, side), size, size)


def random_resized_crop(video: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop: area share in ``scale``, aspect in ``ratio`` (log-uniform),
  the same box for every frame, resized to ``size`` x ``size``. Falls back to the
  centre square when 10 draws miss the frame."""
  h, w = video.shape[1:3]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if cw <= w and ch <= h:
      top, left = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
      return crop_resize(video, (top, left, ch, cw), size, size)
  return resize(video, size)


def resample(video: np.ndarray, num_frames: int, mode: str,
             rng: np.random.Generator | None = None) -> np.ndarray:
  """Picks ``num_frames`` of the stored frames with the VideoChat2 rule (video.py)."""
  if video.shape[0] == num_frames:
    return video
  return video[video_lib.sample_frame_indices(video.shape[0], num_frames, mode, rng=rng)]
