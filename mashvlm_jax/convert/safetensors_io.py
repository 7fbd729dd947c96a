"""Reading and writing checkpoints one tensor at a time.

Reading: ``open_checkpoint(directory)`` finds ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``, parses only the headers, and reads a tensor's bytes when
asked (numpy out; bfloat16 as ``ml_dtypes.bfloat16``). PyTorch pickles (``*.bin``/``*.pt``)
are refused unless ``allow_pickle``, and are then opened with ``torch.load(weights_only=True,
mmap=True)``.

Writing: ``write_checkpoint`` streams tensors produced one at a time into a single file, or
into shards ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` when
the total exceeds the shard size (HuggingFace's format, ``{"format": "pt"}`` metadata).
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import pickle
import re
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from mashvlm_jax.convert.param_map import ConversionError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SAFE_FILE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_FILE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_MAX_HEADER = 100 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: pathlib.Path
  dtype: str  # safetensors dtype name, e.g. "BF16"
  shape: tuple[int, ...]
  start: int  # absolute byte offset in the file (safetensors), unused for pickles
  stop: int


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
  """{name: TensorInfo} from a safetensors header, with offsets and sizes validated."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(_MAX_HEADER, size - 8):
      raise ConversionError(f"{path}: not a safetensors file (header length {header_len} "
                            f"does not fit a file of {size} bytes)")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  base = 8 + header_len
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
    if dtype not in DTYPES:
      raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize or base + end > size:
      raise ConversionError(f"{path}: tensor {name} ({dtype}{list(shape)}) has byte range "
                            f"[{begin}, {end}) inconsistent with its shape or the file size")
    out[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
  return out


def _index_files(index_path: pathlib.Path) -> list[pathlib.Path]:
  try:
    weight_map = json.loads(index_path.read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index_path}: not a valid shard index ({e!r})") from None
  files = sorted({index_path.parent / f for f in weight_map.values()})
  missing = [str(f) for f in files if not f.is_file()]
  if missing:
    raise ConversionError(f"{index_path} lists shard(s) that do not exist: {', '.join(missing)}")
  return files


class Checkpoint:
  """Lazy view of a checkpoint: names, shapes and dtypes up front, data on ``read``."""

  def __init__(self, infos: dict[str, TensorInfo], where: str, pickled=None):
    self.infos = infos
    self.where = where  # for messages: the directory or file
    self._pickled = pickled  # {name: torch tensor} (mmap'd) for pickle checkpoints

  def names(self) -> list[str]:
    return list(self.infos)

  def __contains__(self, name: str) -> bool:
    return name in self.infos

  def read(self, name: str) -> np.ndarray:
    """The tensor as a fresh numpy array in its stored dtype."""
    info = self.infos[name]
    if self._pickled is not None:
      return _torch_to_numpy(self._pickled[name])
    with open(info.file, "rb") as f:
      f.seek(info.start)
      data = bytearray(info.stop - info.start)
      f.readinto(data)
    return np.frombuffer(data, DTYPES[info.dtype]).reshape(info.shape)


def _merge(parts: Iterable[dict[str, TensorInfo]], where: str) -> dict[str, TensorInfo]:
  out = {}
  for part in parts:
    for name, info in part.items():
      if name in out:
        raise ConversionError(f"{where}: tensor {name} is stored twice "
                              f"({out[name].file.name} and {info.file.name})")
      out[name] = info
  return out


def open_checkpoint(directory, allow_pickle: bool = False) -> Checkpoint:
  """Opens the weights of a HuggingFace model directory (headers only).

  Looks for model.safetensors.index.json, model.safetensors, then (only with
  ``allow_pickle``) pytorch_model.bin.index.json / pytorch_model.bin.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise ConversionError(f"checkpoint directory {directory} does not exist")
  if (directory / SAFE_INDEX).is_file():
    files = _index_files(directory / SAFE_INDEX)
    return Checkpoint(_merge(map(read_header, files), str(directory)), str(directory))
  if (directory / SAFE_FILE).is_file():
    return Checkpoint(read_header(directory / SAFE_FILE), str(directory))
  pickles = [directory / n for n in (PICKLE_INDEX, PICKLE_FILE) if (directory / n).is_file()]
  if not pickles:
    raise ConversionError(f"no weights in {directory}: expected {SAFE_FILE} or {SAFE_INDEX}")
  if not allow_pickle:
    raise ConversionError(_pickle_refusal(pickles[0]))
  files = _index_files(pickles[0]) if pickles[0].name == PICKLE_INDEX else [pickles[0]]
  return _open_pickles(files, str(directory))


def open_file(path, allow_pickle: bool = False) -> Checkpoint:
  """Opens one weights file: .safetensors, or (with ``allow_pickle``) a .bin/.pt pickle."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"weights file {path} does not exist")
  if path.suffix == ".safetensors":
    return Checkpoint(read_header(path), str(path))
  if path.suffix in (".bin", ".pt", ".pth"):
    if not allow_pickle:
      raise ConversionError(_pickle_refusal(path))
    return _open_pickles([path], str(path))
  raise ConversionError(f"{path}: unknown weights format (expected .safetensors, or "
                        f".bin/.pt with allow_pickle)")


def _pickle_refusal(path) -> str:
  return (f"{path} is a PyTorch pickle, which can run code when loaded; refused. Convert it "
          f"to safetensors, or pass --allow_pickle to load it with "
          f"torch.load(weights_only=True)")


def _open_pickles(files: list[pathlib.Path], where: str) -> Checkpoint:
  import torch  # only for pickles
  tensors, infos = {}, []
  for path in files:
    try:
      try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ConversionError(f"{path}: refused by torch.load(weights_only=True), which only "
                            f"unpickles tensors and plain containers: {e}") from None
    if not isinstance(state, dict):
      raise ConversionError(f"{path}: expected a state dict of tensors, found "
                            f"{type(state).__name__}")
    part = {}
    for name, t in state.items():
      if not isinstance(t, torch.Tensor):
        raise ConversionError(f"{path}: entry {name} is a {type(t).__name__}, not a tensor")
      dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
      if dtype is None:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {t.dtype}")
      part[name] = TensorInfo(path, dtype, tuple(t.shape), 0, 0)
      tensors[name] = t
    infos.append(part)
  return Checkpoint(_merge(infos, where), where, pickled=tensors)


_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                 "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                 "bool": "BOOL"}


def _torch_to_numpy(t) -> np.ndarray:
  import torch
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
  return t.numpy().copy()


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """A tensor to write: produce() is called once, when its bytes are written."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  produce: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def parse_size(text: str | int) -> int:
  """"5GB", "500MB", "10KiB", "123" -> bytes (decimal units; KiB/MiB/GiB binary)."""
  if isinstance(text, int):
    return text
  match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
  if not match:
    raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB, 2GiB or 1000000")
  number, unit = float(match.group(1)), match.group(2).upper().rstrip("B")
  scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2 ** 10, "MI": 2 ** 20,
           "GI": 2 ** 30, "TI": 2 ** 40}[unit]
  if number * scale < 1:
    raise ValueError(f"size {text!r} must be at least one byte")
  return int(number * scale)


def shard(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
  """Greedy split in order; a tensor larger than ``max_bytes`` gets a shard of its own."""
  shards, current, size = [], [], 0
  for spec in specs:
    if current and size + spec.nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += spec.nbytes
  return shards + ([current] if current else [])


def write_file(path: pathlib.Path, specs: list[TensorSpec], metadata: dict | None = None):
  """Writes one safetensors file, producing and writing one tensor at a time."""
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for spec in specs:
    header[spec.name] = {"dtype": DTYPE_NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for spec in specs:
      array = np.ascontiguousarray(spec.produce())
      if array.shape != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
        raise AssertionError(f"{spec.name}: produced {array.dtype}{list(array.shape)}, "
                             f"planned {np.dtype(spec.dtype)}{list(spec.shape)}")
      f.write(memoryview(array.reshape(-1).view(np.uint8)))
      del array


def write_checkpoint(directory, specs: list[TensorSpec], max_shard_bytes: int,
                     basename: str = "model") -> list[str]:
  """HuggingFace layout: ``{basename}.safetensors`` or shards plus an index; file names out."""
  directory = pathlib.Path(directory)
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise AssertionError("duplicate tensor names in an export plan")
  groups = shard(specs, max_shard_bytes)
  if len(groups) <= 1:
    write_file(directory / f"{basename}.safetensors", specs, {"format": "pt"})
    return [f"{basename}.safetensors"]
  files = [f"{basename}-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
  weight_map = {}
  for file, group in zip(files, groups):
    write_file(directory / file, group, {"format": "pt"})
    weight_map.update({s.name: file for s in group})
  index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
  (directory / f"{basename}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return files + [f"{basename}.safetensors.index.json"]
