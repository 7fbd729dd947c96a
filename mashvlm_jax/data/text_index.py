"""A built split's records without their video: what the bucket planner and record scans
read, so that they never fetch frames.

The text-length bucket planner (buckets.py) needs every row's token count, on every
process, and reading a record's text from the data set itself reads its stored video
bytes too (an ArrayRecord record is read whole): on a pod that multiplied the video reads
by the process count. The index holds the same records with the video left out.

Files, in the built data set's directory (``builder.data_path``), per split:
  text_index.<split>.array_record  record i = JSON of record i of the split's data source
                                   (every feature but ``video``; bytes as UTF-8 text)
  text_index.<split>.json          {"version", "records", "shards": [[file name, bytes]]}
The header is written last, each file by an atomic rename, so a header means a complete
index. An index whose header does not match the split's shards (the data set was rebuilt)
or record count is not used.

``write`` makes them (``registry.ensure_built`` and ``mashvlm make-data`` do, once per
data set); ``open_source`` returns a data source whose items equal the data set's own
source read with ``video=False``, except ``video`` = b"", or None when there is no
usable index.
"""
from __future__ import annotations

import json
import logging
import os
import uuid

import grain
import numpy as np
from etils import epath

log = logging.getLogger("mashvlm.data")

VERSION = 1
CHUNK = 512  # records read per call while writing


def index_path(data_path, split: str) -> epath.Path:
  return epath.Path(data_path) / f"text_index.{split}.array_record"


def header_path(data_path, split: str) -> epath.Path:
  return epath.Path(data_path) / f"text_index.{split}.json"


def shards(builder, split: str) -> list[list]:
  """[[file name, bytes], ...] of the split's ArrayRecord shards: what the index is of."""
  return [[epath.Path(p).name, int(epath.Path(p).stat().length)]
          for p in builder.info.splits[split].filepaths]


def _to_json(value):
  """A data-source feature value as JSON: bytes -> str, numpy scalars and arrays -> lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.ndarray):
    return _to_json(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value


def _from_json(value):
  """Inverse of ``_to_json`` as the data source gives it: text as bytes, numbers as such."""
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, dict):
    return {k: _from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json(v) for v in value]
  return value


def encode_record(raw: dict) -> bytes:
  """One data-source record (video left out) as the index stores it."""
  return json.dumps({k: _to_json(v) for k, v in raw.items() if k != "video"},
                    sort_keys=True).encode("utf-8")


def decode_record(data: bytes) -> dict:
  """An index record as the data source gives the record, with ``video`` = b""."""
  return {**{k: _from_json(v) for k, v in json.loads(data).items()}, "video": b""}


class TextIndexSource:
  """Random-access source over one split's index (len, [i], __getitems__; picklable for
  Grain's workers): the split's records without their video, in the data set's order."""

  def __init__(self, path: epath.Path, records: int):
    self.path, self.records = epath.Path(path), int(records)
    self._source = grain.sources.ArrayRecordDataSource([os.fspath(self.path)])
    if len(self._source) != self.records:
      raise ValueError(f"{self.path} holds {len(self._source)} records, its header says "
                       f"{self.records}")

  def __len__(self) -> int:
    return self.records

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._source[int(index)])

  def __getitems__(self, indices) -> list[dict]:
    return [decode_record(d) for d in self._source.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    return f"TextIndexSource({self.path}, {self.records} records)"


def _publish(final: epath.Path, tag: str, write) -> None:
  """``write(tmp)`` into a private temporary file beside ``final``, then a rename onto it;
  the temporary file never outlives the call, also when ``write`` fails."""
  tmp = final.parent / (final.name + tag)
  try:
    write(tmp)
    tmp.replace(final)
  finally:
    tmp.unlink(missing_ok=True)


def write(builder, split: str, source) -> epath.Path:
  """Writes the index of ``split`` from ``source`` (the split's data source read with
  ``video=False``); returns its header path. Safe to run from several processes at once:
  each writes private temporary files and renames them into place."""
  from array_record.python.array_record_module import ArrayRecordWriter
  data_path = epath.Path(builder.data_path)
  tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

  def write_records(tmp):
    writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    try:
      for start in range(0, len(source), CHUNK):
        for raw in source.__getitems__(list(range(start, min(start + CHUNK, len(source))))):
          writer.write(encode_record(raw))
    finally:
      writer.close()

  _publish(index_path(data_path, split), tag, write_records)
  record = {"version": VERSION, "records": len(source), "shards": shards(builder, split)}
  header = header_path(data_path, split)
  _publish(header, tag, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))
  return header


def stale_reason(builder, split: str) -> str | None:
  """Why the split has no usable index (missing, other version, other shards, other
  record count), or None when it has one."""
  header = header_path(builder.data_path, split)
  if not header.exists():
    return f"{header} does not exist"
  try:
    found = json.loads(header.read_text())
  except ValueError as e:
    return f"{header} is not JSON ({e})"
  if found.get("version") != VERSION:
    return f"{header} has version {found.get('version')}, this code reads {VERSION}"
  wanted = shards(builder, split)
  if found.get("shards") != wanted:
    return f"{header} indexes shards {found.get('shards')}, the split has {wanted}"
  if found.get("records") != builder.info.splits[split].num_examples:
    return (f"{header} indexes {found.get('records')} records, the split has "
            f"{builder.info.splits[split].num_examples}")
  if not index_path(builder.data_path, split).exists():
    return f"{index_path(builder.data_path, split)} does not exist"
  return None


def open_source(builder, split: str) -> TextIndexSource | None:
  """The split's index as a data source, or None (with the reason logged) when it has none
  that matches the data set."""
  reason = stale_reason(builder, split)
  if reason is not None:
    log.warning("no text index for split %r of %s: %s; reading the text from the data set "
                "(its video bytes too). `mashvlm make-data` with the same config writes it.",
                split, builder.data_path, reason)
    return None
  return TextIndexSource(index_path(builder.data_path, split),
                         builder.info.splits[split].num_examples)
