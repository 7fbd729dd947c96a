"""Video decoding with PyAV and VideoChat2's frame-sampling rule.

``sample_frame_indices`` is pure (numbers in, indices out); ``read_video`` decodes only
the frames it needs and returns uint8 [T, size, size, 3] RGB.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np

SAMPLE_MODES = ("middle", "rand")


class VideoDecodeError(RuntimeError):
  """A video file that exists but cannot be decoded; the message names the file."""


def clip_bounds(num_video_frames: int, fps: float | None, start: float | None,
                end: float | None) -> tuple[int, int]:
  """[first, stop) frame indices of the frames shown at times t = i / fps with
  start <= t < end (seconds). Either bound may be None (video start / end). A window
  that holds no frame is widened to the one frame nearest ``start``."""
  n = num_video_frames
  if start is None and end is None:
    return 0, n
  if not fps or fps <= 0:
    raise ValueError(f"start/end given in seconds ({start}, {end}) but the video's fps is "
                     f"unknown ({fps})")
  first = 0 if start is None else math.ceil(start * fps - 1e-9)
  stop = n if end is None else math.ceil(end * fps - 1e-9)
  first, stop = min(max(first, 0), n - 1), min(max(stop, 0), n)
  if stop <= first:
    stop = first + 1
  return first, stop


def sample_frame_indices(num_video_frames: int, num_samples: int, mode: str = "middle",
                         rng: np.random.Generator | int | None = None,
                         start: float | None = None, end: float | None = None,
                         fps: float | None = None) -> np.ndarray:
  """int64 [num_samples] frame indices, VideoChat2's rule.

  The clip (the whole video, or the frames between ``start`` and ``end`` seconds, which
  need ``fps``) is cut into K = min(num_samples, clip length) segments at the integer
  parts of linspace(0, length, K + 1); ``middle`` takes each segment's middle frame
  ((first + last) // 2), ``rand`` a uniformly random frame of each segment (``rng``: a
  numpy Generator or seed). A clip shorter than ``num_samples`` repeats its last index.
  """
  if num_video_frames < 1:
    raise ValueError(f"a video needs at least one frame, found {num_video_frames}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, found {num_samples}")
  if mode not in SAMPLE_MODES:
    raise ValueError(f"sampling mode must be one of {SAMPLE_MODES}, found {mode!r}")
  first, stop = clip_bounds(num_video_frames, fps, start, end)
  length = stop - first
  k = min(num_samples, length)
  bounds = np.linspace(0, length, k + 1).astype(np.int64)
  lo, hi = bounds[:-1], bounds[1:] - 1  # inclusive segment ends
  if mode == "middle":
    picked = (lo + hi) // 2
  else:
    if rng is None:
      raise ValueError("mode='rand' needs rng (a numpy Generator or an int seed)")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    picked = rng.integers(lo, hi + 1)
  picked = np.concatenate([picked, np.full(num_samples - k, picked[-1])])
  return (picked + first).astype(np.int64)


def _to_rgb(frame, size: int | None) -> np.ndarray:
  """A decoded frame as uint8 [size, size, 3]: shorter side to ``size`` then centre crop
  (VideoChat2's scale + centre crop); native size when ``size`` is None."""
  if size is None:
    return frame.to_ndarray(format="rgb24")
  new_w, new_h, left, top = resize_geometry(frame.width, frame.height, size)
  rgb = frame.to_ndarray(format="rgb24", width=new_w, height=new_h, interpolation="BICUBIC")
  return rgb[top:top + size, left:left + size]


def resize_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """(resized width, resized height, crop left, crop top) in pixels of ``_to_rgb``: the
  shorter side scaled to ``size``, then a centre ``size`` x ``size`` crop. A point (x, y)
  of the decoded frame lands at (x * new_w / width - left, y * new_h / height - top)."""
  scale = size / min(width, height)
  new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
  return new_w, new_h, (new_w - size) // 2, (new_h - size) // 2


def _open(src):
  """PyAV container of a file path or of a video file's bytes held in memory."""
  import av
  if isinstance(src, (bytes, bytearray, memoryview)):
    return av.open(io.BytesIO(src))
  return av.open(os.fspath(src))


def probe(path) -> tuple[int, float]:
  """(number of frames, frames per second) of the first video stream of a file path or
  of a file's bytes; counts frames by decoding when the container does not say."""
  with _open(path) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate or 0.0)
    count = stream.frames
    if count <= 0:
      count = sum(1 for _ in container.decode(stream))
  return count, fps


def _decode(path, wanted: set, size, convert=None, geometry: dict | None = None):
  """{index: rgb} for the wanted frame indices, and the number of frames decoded.
  ``convert(frame)`` replaces the default ``_to_rgb(frame, size)``; ``geometry`` (a dict)
  receives the decoded frames' width and height."""
  out, count = {}, 0
  last = max(wanted)
  convert = convert or (lambda frame: _to_rgb(frame, size))
  with _open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for count, frame in enumerate(container.decode(stream), start=1):
      if count - 1 in wanted:
        out[count - 1] = convert(frame)
        if geometry is not None:
          geometry.update(width=frame.width, height=frame.height)
      if count - 1 >= last:
        break
  return out, count


def read_video(path: str | os.PathLike, num_frames: int, mode: str = "middle",
               size: int | None = 224, *, rng: np.random.Generator | int | None = None,
               start: float | None = None, end: float | None = None,
               meta: dict | None = None) -> np.ndarray:
  """uint8 [num_frames, size, size, 3] RGB frames picked by ``sample_frame_indices``.

  ``meta`` (a dict, optional) receives what maps annotations onto the stored frames:
  ``indices`` (the decoded frame index of each stored frame), ``fps``, and the decoded
  ``width`` and ``height`` in pixels (before the resize and centre crop to ``size``).
  Raises FileNotFoundError for a missing file and VideoDecodeError (naming the file and
  the reason) for one PyAV cannot decode.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video file {path} does not exist")
  return read_frames(path, path, num_frames, mode, size, rng=rng, start=start, end=end,
                     meta=meta)


def read_frames(src, name: str, num_frames: int, mode: str = "middle",
                size: int | None = 224, *, rng: np.random.Generator | int | None = None,
                start: float | None = None, end: float | None = None,
                convert=None, meta: dict | None = None) -> np.ndarray:
  """``read_video`` of a file path or of a video file's bytes (``src``); ``name`` is what
  errors call it. ``convert(frame)`` replaces the shorter-side resize + centre crop;
  ``meta`` as in ``read_video``."""
  import av
  try:
    count, fps = probe(src)
  except (av.error.FFmpegError, IndexError) as e:
    raise VideoDecodeError(f"{name}: cannot open ({type(e).__name__}: {e})") from e
  if count < 1:
    raise VideoDecodeError(f"{name}: no decodable video frames")
  indices = sample_frame_indices(count, num_frames, mode, rng, start, end, fps)
  try:
    geometry = {}
    frames, decoded = _decode(src, set(indices.tolist()), size, convert, geometry)
    if len(frames) < len(set(indices.tolist())):
      # The container announced more frames than it holds: sample again from the truth.
      indices = sample_frame_indices(decoded, num_frames, mode, rng, start, end, fps)
      frames, _ = _decode(src, set(indices.tolist()), size, convert, geometry)
  except (av.error.FFmpegError, IndexError) as e:
    raise VideoDecodeError(f"{name}: cannot decode ({type(e).__name__}: {e})") from e
  if decoded < 1 or len(frames) < len(set(indices.tolist())):
    raise VideoDecodeError(f"{name}: {decoded} of {count} announced frames decoded")
  if meta is not None:
    meta.update(geometry, indices=indices.copy(), fps=fps)
  return np.stack([frames[i] for i in indices.tolist()])
