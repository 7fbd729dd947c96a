"""(video, caption) annotation files for caption pretraining (tasks/caption.py).

Two layouts, chosen by the file's suffix:
  .csv    a header row, then one row per clip. The video is the ``video`` column (a path
          relative to the video root), or WebVid's ``videoid`` (+ ``page_dir``: the file
          ``<page_dir>/<videoid>.mp4``); the caption is ``caption`` or WebVid's ``name``;
          optional ``start`` / ``end`` seconds.
  .jsonl  one JSON object per line with the same fields.
A row that breaks the layout becomes an annotations.Failure naming the file, the row and
the field; a file without a usable header is a configuration error (ValueError).
"""
from __future__ import annotations

import csv
import json
import os
import pathlib

from mashvlm_jax.data import annotations
from mashvlm_jax.data.tasks import caption

SUFFIXES = (".csv", ".jsonl")
VIDEO_FIELDS, CAPTION_FIELDS = ("video", "videoid"), ("caption", "name")


def _rows(file: pathlib.Path):
  """(row number, dict) of a CSV or JSON-lines file; ValueError for a bad header."""
  if file.suffix == ".csv":
    with file.open(newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      header = reader.fieldnames or []
      if not set(header) & set(VIDEO_FIELDS) or not set(header) & set(CAPTION_FIELDS):
        raise ValueError(f"caption file {file}: the header {header} needs a video column "
                         f"(one of {VIDEO_FIELDS}) and a caption column (one of "
                         f"{CAPTION_FIELDS})")
      yield from enumerate(reader)
    return
  with file.open(encoding="utf-8") as f:
    for index, line in enumerate(f):
      if not line.strip():
        continue
      try:
        yield index, json.loads(line)
      except json.JSONDecodeError as e:
        yield index, e


def _seconds(row: dict, name: str):
  value = row.get(name)
  if value in (None, ""):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    raise annotations.RecordError(f"field {name!r} should be seconds, found {value!r:.60}")


def parse_row(row, *, key: str, task: str, video_root: str) -> annotations.Item:
  """One caption row -> Item (task caption.TASK); RecordError naming the field."""
  if isinstance(row, json.JSONDecodeError):
    raise annotations.RecordError(f"not valid JSON: {row}")
  if not isinstance(row, dict):
    raise annotations.RecordError(f"row should be an object, found {type(row).__name__}")
  if row.get("video"):
    video = str(row["video"])
  elif row.get("videoid"):
    video = f"{row['videoid']}.mp4"
    if row.get("page_dir"):
      video = f"{row['page_dir']}/{video}"
  else:
    raise annotations.RecordError(f"missing field 'video' (or WebVid's 'videoid'); found "
                                  f"{sorted(row)[:8]}")
  text = row.get("caption", row.get("name"))
  if not isinstance(text, str):
    raise annotations.RecordError(f"field 'caption' (or WebVid's 'name') should be text, "
                                  f"found {text!r:.60}")
  try:
    turns = caption.questions(text)
  except ValueError as e:
    raise annotations.RecordError(f"field 'caption': {e}") from e
  path = video if os.path.isabs(video) else os.path.join(video_root, video)
  return annotations.Item(key, path, video, turns, task, start=_seconds(row, "start"),
                          end=_seconds(row, "end"))


def read_items(path, video_root: str) -> tuple[list, list]:
  """Items and row failures of one caption file (.csv or .jsonl)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"caption file {file} does not exist")
  items, failures = [], []
  for index, row in _rows(file):
    try:
      items.append(parse_row(row, key=f"{file.stem}/{index:06d}", task=caption.TASK,
                             video_root=video_root))
    except annotations.RecordError as e:
      video = row.get("video", row.get("videoid", "?")) if isinstance(row, dict) else "?"
      failures.append(annotations.Failure(f"{file} row {index} (video {video})", str(e)))
  return items, failures
