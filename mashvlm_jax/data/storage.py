"""Video storage formats of the users' data set (``data.storage``), and their decoding in
the input workers.

  raw     uint8 [T, S, S, 3] frames at the model's shape, sampled once at build time
          (builders.features; zlib on disk). The default: unchanged.
  jpeg    up to ``data.jpeg.max_frames`` frames of the clip (evenly spaced, the VideoChat2
          ``middle`` rule; or at ``data.jpeg.fps`` frames per second up to that cap), each
          a JPEG with its shorter side at ``data.jpeg.short_side`` (0: the model's size).
  source  the video file's bytes (at most ``data.source_max_mb``) and the clip's start /
          end seconds; PyAV decodes it in the worker.

For jpeg and source the model's T frames are sampled at every visit with the VideoChat2
rule (video.sample_frame_indices: ``rand`` on the train split with augmentation, else
``middle``), over the stored frames (jpeg) or the clip's frames (source), then brought to
S x S by a shorter-side resize and a centre crop, as the raw format does at build time.

Stored features of an encoded record (``encoded_features``): the text features of
builders.features, and
  video          uint8 [n]   concatenated JPEGs (jpeg) or the file's bytes (source)
  video_format   text        "jpeg" | "source"
  frame_offsets  int64 [K+1] byte offsets of the K JPEGs in ``video`` (source: empty)
  frame_indices  int32 [K]   the source frame number of each stored JPEG (source: empty)
  clip_start     float64     seconds; -1 = the video's start (source only)
  clip_end       float64     seconds; -1 = the video's end (source only)

A record that cannot be decoded at read time raises ``CorruptRecord``; ``SkipCorrupt``
replaces it with the next readable position of the stream, counts it in the row's
``read_failures`` and stops (``ReadFailureError``) once more than
``data.max_read_failure_share`` of a process's reads failed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import logging
import math
import os

import grain
import numpy as np

from mashvlm_jax.data import video as video_lib

log = logging.getLogger("mashvlm.data")

FORMATS = ("raw", "jpeg", "source")
ENCODED = ("jpeg", "source")
JPEG_DEFAULTS = dict(quality=90, short_side=0, max_frames=32, fps=0.0)
SOURCE_MAX_MB = 64.0
MAX_READ_FAILURE_SHARE = 0.01
READ_FAILURE_MIN_READS = 32  # reads of a process before the share can stop training


class CorruptRecord(RuntimeError):
  """A stored record whose video cannot be decoded; the message names the record."""


class SourceTooLarge(ValueError):
  """A video file over data.source_max_mb for data.storage='source'; names the file."""


class ReadFailureError(RuntimeError):
  """More than data.max_read_failure_share of the records read could not be decoded."""


# ------------------------------------------------------------------------------ settings

@dataclasses.dataclass(frozen=True)
class StorageSpec:
  """How the builder stores videos (``spec(config)``)."""
  format: str = "raw"
  jpeg_quality: int = 90
  jpeg_short_side: int = 0  # 0: the model's image size
  jpeg_max_frames: int = 32
  jpeg_fps: float = 0.0  # 0: max_frames evenly spaced
  source_max_bytes: int = int(SOURCE_MAX_MB * 2 ** 20)

  def params(self) -> dict:
    """What names the built data (registry fingerprint); {} for raw, so raw data keep
    their directory names."""
    if self.format == "raw":
      return {}
    if self.format == "source":
      return dict(storage="source", max_bytes=self.source_max_bytes)
    return dict(storage="jpeg", quality=self.jpeg_quality, short_side=self.jpeg_short_side,
                max_frames=self.jpeg_max_frames, fps=self.jpeg_fps)


def spec(config) -> StorageSpec:
  """data.storage, data.jpeg and data.source_max_mb checked (ValueError naming the field)."""
  d = config.data
  fmt = str(d.get("storage", "raw"))
  if fmt not in FORMATS:
    raise ValueError(f"data.storage must be one of {FORMATS}, found {fmt!r}")
  if fmt != "raw" and d.name != "local_video_qa":
    raise ValueError(f"data.storage={fmt!r} needs data.name='local_video_qa' (the synthetic "
                     f"set is rendered, not decoded), found {d.name!r}")
  jpeg = dict(JPEG_DEFAULTS, **dict(d.get("jpeg", {}) or {}))
  unknown = sorted(set(jpeg) - set(JPEG_DEFAULTS))
  if unknown:
    raise ValueError(f"data.jpeg has unknown fields {unknown}; known: {sorted(JPEG_DEFAULTS)}")
  out = StorageSpec(fmt, int(jpeg["quality"]), int(jpeg["short_side"]),
                    int(jpeg["max_frames"]), float(jpeg["fps"]),
                    int(float(d.get("source_max_mb", SOURCE_MAX_MB)) * 2 ** 20))
  if not 1 <= out.jpeg_quality <= 100:
    raise ValueError(f"data.jpeg.quality must be in [1, 100], found {out.jpeg_quality}")
  if out.jpeg_max_frames < 1 or out.jpeg_short_side < 0 or out.jpeg_fps < 0:
    raise ValueError(f"data.jpeg needs max_frames >= 1, short_side >= 0 and fps >= 0, found "
                     f"{out.jpeg_max_frames}, {out.jpeg_short_side}, {out.jpeg_fps}")
  if out.source_max_bytes <= 0:
    raise ValueError(f"data.source_max_mb must be positive, found {d.get('source_max_mb')}")
  return out


def check_readable(config) -> None:
  """Fails at start, not in a worker, when data.data_dir, data.video_root or an annotation
  is a URL the installed readers cannot open; the error says how to mount it instead."""
  from mashvlm_jax import paths
  d = config.data
  fields = [("data.data_dir", str(d.get("data_dir", ""))),
            ("data.video_root", str(d.get("video_root", "")))]
  for split, value in dict(d.get("annotations", {}) or {}).items():
    for entry in value if isinstance(value, (list, tuple)) else [value]:
      entry = {"path": entry} if isinstance(entry, str) else dict(entry)
      fields += [(f"data.annotations[{split!r}]", str(entry.get("path", ""))),
                 (f"data.annotations[{split!r}].video_root", str(entry.get("video_root", "")))]
  for field, value in fields:
    if not paths.is_url(value):
      continue
    scheme = value.split("://", 1)[0]
    if field == "data.data_dir" and scheme == "gs" and gcs_metadata_backend():
      continue  # ArrayRecord reads gs:// itself; TFDS's metadata goes through epath
    why = ("PyAV and the annotation readers open local files only" if field != "data.data_dir"
           else "TFDS reads data set metadata from gs:// through tensorflow or gcsfs, and "
                "neither is installed" if scheme == "gs"
           else f"no installed reader opens {scheme}:// paths")
    bucket = value.split("://", 1)[1].split("/", 1)[0]
    raise ValueError(
        f"{field}={value!r}: {why}. Mount the bucket and give the local path instead, e.g. "
        f"`mkdir -p /mnt/{bucket} && gcsfuse --implicit-dirs {bucket} /mnt/{bucket}` then "
        f"{field}='/mnt/{bucket}/{value.split('://', 1)[1].partition('/')[2]}'")


def gcs_metadata_backend() -> bool:
  """Whether etils.epath can open gs:// paths here (tensorflow or gcsfs installed)."""
  return any(importlib.util.find_spec(m) is not None for m in ("tensorflow", "gcsfs"))


# ------------------------------------------------------------------------------ building

def encoded_features(text_features: dict):
  """TFDS features of an encoded record: ``text_features`` (the raw format's features
  without ``video``) plus the encoded video fields (module docstring)."""
  import tensorflow_datasets as tfds
  out = dict(text_features)
  out.update(
      video=tfds.features.Tensor(shape=(None,), dtype=np.uint8),
      video_format=tfds.features.Text(),
      frame_offsets=tfds.features.Tensor(shape=(None,), dtype=np.int64),
      frame_indices=tfds.features.Tensor(shape=(None,), dtype=np.int32),
      clip_start=tfds.features.Tensor(shape=(), dtype=np.float64),
      clip_end=tfds.features.Tensor(shape=(), dtype=np.float64))
  return tfds.features.FeaturesDict(out)


def _short_side_rgb(frame, short_side: int) -> np.ndarray:
  """uint8 [h, w, 3] of a PyAV frame with its shorter side scaled to ``short_side``
  (bicubic, the aspect kept: no crop)."""
  w, h = frame.width, frame.height
  scale = short_side / min(w, h)
  new_w, new_h = max(short_side, round(w * scale)), max(short_side, round(h * scale))
  return frame.to_ndarray(format="rgb24", width=new_w, height=new_h, interpolation="BICUBIC")


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
  """One uint8 [h, w, 3] frame as JPEG bytes (PIL, libjpeg)."""
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
  return buf.getvalue()


def stored_count(clip_frames: int, fps: float, s: StorageSpec) -> int:
  """K, the frames a jpeg record keeps of a clip of ``clip_frames`` frames at ``fps``:
  all up to max_frames, or (data.jpeg.fps > 0) one per 1/fps seconds up to max_frames."""
  k = clip_frames
  if s.jpeg_fps > 0 and fps > 0:
    k = max(1, math.ceil(clip_frames / fps * s.jpeg_fps - 1e-9))
  return max(1, min(k, clip_frames, s.jpeg_max_frames))


def jpeg_record(path: str, image_size: int, s: StorageSpec, start=None, end=None) -> dict:
  """The encoded video fields of a jpeg record of the clip [start, end) of ``path``.

  Raises FileNotFoundError / video.VideoDecodeError / ValueError (bad bounds) like
  video.read_video."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video file {path} does not exist")
  import av
  try:
    count, fps = video_lib.probe(path)
  except (av.error.FFmpegError, IndexError) as e:
    raise video_lib.VideoDecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
  if count < 1:
    raise video_lib.VideoDecodeError(f"{path}: no decodable video frames")
  first, stop = video_lib.clip_bounds(count, fps, start, end)
  k = stored_count(stop - first, fps, s)
  side = s.jpeg_short_side or int(image_size)
  frames = video_lib.read_frames(path, path, k, "middle", None, start=start, end=end,
                                 convert=lambda f: _short_side_rgb(f, side))
  indices = video_lib.sample_frame_indices(count, k, "middle", start=start, end=end, fps=fps)
  blobs = [encode_jpeg(f, s.jpeg_quality) for f in frames]
  offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  return dict(video=np.frombuffer(b"".join(blobs), np.uint8), video_format="jpeg",
              frame_offsets=offsets, frame_indices=indices.astype(np.int32),
              clip_start=np.float64(-1), clip_end=np.float64(-1))


def source_record(path: str, s: StorageSpec, start=None, end=None) -> dict:
  """The encoded video fields of a source record: the file's bytes (not decoded here).
  ValueError naming the file when it is larger than data.source_max_mb."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"video file {path} does not exist")
  size = os.path.getsize(path)
  if size > s.source_max_bytes:
    raise SourceTooLarge(f"video file {path} has {size / 2 ** 20:.1f} MB, more than "
                     f"data.source_max_mb = {s.source_max_bytes / 2 ** 20:g} MB for "
                     f"data.storage='source'; raise the cap, cut the video, or store it as "
                     f"data.storage='jpeg'")
  with open(path, "rb") as f:
    data = f.read()
  return dict(video=np.frombuffer(data, np.uint8), video_format="source",
              frame_offsets=np.zeros(0, np.int64), frame_indices=np.zeros(0, np.int32),
              clip_start=np.float64(-1 if start is None else start),
              clip_end=np.float64(-1 if end is None else end))


# ------------------------------------------------------------------------------ reading

@dataclasses.dataclass
class EncodedClip:
  """A record's encoded video, decoded on demand by ``frames``."""
  format: str
  data: np.ndarray  # uint8 [n]
  offsets: np.ndarray  # int64 [K + 1] (jpeg)
  start: float | None
  end: float | None
  name: str  # the record, for errors

  def frames(self, num_frames: int, mode: str, size: int,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [num_frames, size, size, 3]: the VideoChat2 rule (``mode``, ``rng``) over
    the stored frames (jpeg) or the clip's frames (source), shorter side to ``size``,
    centre crop. CorruptRecord naming the record when it cannot be decoded."""
    if self.format == "jpeg":
      return jpeg_frames(self.data, self.offsets, num_frames, mode, size, rng, self.name)
    if self.format == "source":
      try:
        return video_lib.read_frames(self.data.tobytes(), f"record {self.name}", num_frames,
                                     mode, size, rng=rng, start=self.start, end=self.end)
      except (video_lib.VideoDecodeError, ValueError) as e:
        raise CorruptRecord(f"record {self.name}: stored source video: {e}") from e
    raise CorruptRecord(f"record {self.name}: unknown video_format {self.format!r}; known: "
                        f"{ENCODED}")


def stored_video(raw: dict):
  """A data-source record's ``video``: uint8 [T, H, W, 3] (raw) or an EncodedClip."""
  fmt = raw.get("video_format")
  if fmt is None:
    return np.asarray(raw["video"])
  fmt = fmt.decode("utf-8") if isinstance(fmt, bytes) else str(fmt)
  name = raw.get("id", b"?")
  name = name.decode("utf-8") if isinstance(name, bytes) else str(name)

  def bound(key):
    value = float(raw.get(key, -1))
    return None if value < 0 else value
  return EncodedClip(fmt, np.asarray(raw["video"], np.uint8),
                     np.asarray(raw.get("frame_offsets", ()), np.int64),
                     bound("clip_start"), bound("clip_end"), name)


def model_frames(video, num_frames: int, mode: str, size: int,
                 rng: np.random.Generator | None = None):
  """An EncodedClip's frames at the model's shape; a raw array unchanged."""
  if isinstance(video, EncodedClip):
    return video.frames(num_frames, mode, size, rng)
  return video


def centre_fit(image, size: int) -> np.ndarray:
  """A PIL image with its shorter side scaled to ``size`` (bicubic, as PyAV does for the
  raw format), centre-cropped to uint8 [size, size, 3] at integer offsets."""
  from PIL import Image
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(image.convert("RGB"))[top:top + size, left:left + size]


def jpeg_frames(data: np.ndarray, offsets: np.ndarray, num_frames: int, mode: str,
                size: int, rng=None, name: str = "?") -> np.ndarray:
  """uint8 [num_frames, size, size, 3] of a jpeg record: sample_frame_indices over its K
  stored JPEGs; only the picked ones are decoded, at full size (JPEG DCT scaling,
  PIL's ``draft``, aliases fine texture: 29-32 dB against the raw frames where a full
  decode gives 47, so store near ``size`` instead: data.jpeg.short_side)."""
  from PIL import Image
  k = len(offsets) - 1
  if k < 1 or offsets[0] != 0 or offsets[-1] != len(data) or np.any(np.diff(offsets) <= 0):
    raise CorruptRecord(f"record {name}: frame_offsets {offsets[:4].tolist()}... do not "
                        f"cut the {len(data)} stored bytes into JPEGs")
  picked = video_lib.sample_frame_indices(k, num_frames, mode, rng=rng)
  decoded = {}
  for i in sorted(set(picked.tolist())):
    try:
      image = Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes()))
      image.load()
      decoded[i] = centre_fit(image, size)
    except (OSError, ValueError, SyntaxError) as e:
      raise CorruptRecord(f"record {name}: stored JPEG {i} of {k}: {e}") from e
  return np.stack([decoded[i] for i in picked.tolist()])


class SkipCorrupt(grain.MapDataset):
  """``parent`` (the transformed stream) with each undecodable position replaced by the
  next position that decodes; every row gains ``read_failures`` (int32, the positions
  skipped before it). ReadFailureError once more than ``max_share`` of this process's
  reads failed (after READ_FAILURE_MIN_READS reads), or when nothing decodes."""

  def __init__(self, parent: grain.MapDataset, max_share: float,
               min_reads: int = READ_FAILURE_MIN_READS):
    super().__init__(parent)
    self._max_share, self._min_reads = float(max_share), int(min_reads)
    self._reads = self._failures = 0

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"SkipCorrupt(max_share={self._max_share})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    for k in range(len(self._parent)):
      self._reads += 1
      try:
        row = self._parent[index + k]
      except CorruptRecord as e:
        self._failures += 1
        if self._failures <= 20 or self._failures % 1000 == 0:
          log.warning("skipping %s (%d of %d reads failed in this process)", e,
                      self._failures, self._reads)
        if (self._reads >= self._min_reads
            and self._failures > self._max_share * self._reads):
          raise ReadFailureError(
              f"{self._failures} of {self._reads} records read in this process could not be "
              f"decoded ({self._failures / self._reads:.1%} > "
              f"data.max_read_failure_share = {self._max_share:.1%}); last: {e}") from e
        continue
      row["read_failures"] = np.int32(k)
      return row
    raise ReadFailureError(f"no record of the {len(self._parent)} in the stream decodes")


# ------------------------------------------------------------------------------ workers

def ram_budget_mb(config) -> int:
  """data.ram_budget_mb, or (0) half of this machine's physical memory."""
  given = int(config.data.get("ram_budget_mb", 0) or 0)
  if given > 0:
    return given
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20 / 2)


def auto_performance(config, probe_dataset, rows_per_batch: int = 1) -> tuple[int, int]:
  """(num_workers, prefetch_buffer_size) for data.num_workers="auto": Grain's own
  ``grain.experimental.pick_performance_config`` over ``probe_dataset`` (the pipeline
  without workers, batched by one row), within ram_budget_mb and at most one worker per
  CPU core and data.prefetch_buffer_size; logged. Grain divides the budget by the size of
  an element, so the budget handed to it is ram_budget_mb / ``rows_per_batch``: the same
  choice as over the real batches, for rows_per_batch times fewer rows decoded."""
  if not hasattr(grain.experimental, "pick_performance_config"):
    raise ValueError(f"data.num_workers='auto' uses grain.experimental."
                     f"pick_performance_config, which grain {grain.__version__} lacks; "
                     f"install the grain of constraints.txt or set data.num_workers to a "
                     f"number")
  budget = ram_budget_mb(config)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  chosen = grain.experimental.pick_performance_config(
      probe_dataset, ram_budget_mb=budget / max(1, int(rows_per_batch)), max_workers=cores,
      max_buffer_size=int(config.data.prefetch_buffer_size))
  workers = max(1, int(chosen.multiprocessing_options.num_workers))
  buffer = max(1, int(chosen.read_options.prefetch_buffer_size))
  log.info("data.num_workers='auto': grain.experimental.pick_performance_config chose %d "
           "worker processes and a prefetch buffer of %d batches (RAM budget %d MB, %d CPU "
           "cores)", workers, buffer, budget, cores)
  return workers, buffer
