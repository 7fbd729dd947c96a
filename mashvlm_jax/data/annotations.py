"""Reading users' annotation files into one item format, with per-record validation.

These layouts are recognised per record (a JSON file holds a list of records):
  * VideoChat2-IT: {"video": rel path, "QA": [{"i", "q", "a"}, ...], "start"?, "end"?}
  * MVBench (one JSON per task, the task named by the file stem):
    {"video", "question", "candidates": [...], "answer", "start"?, "end"?}
  * UNSCENE (this project's layout):
    {"video", "kind": "unusual" | "scene_only", "scene": str, "action": str (not for
     scene_only), "binary": [{"q", "a": "Yes"|"No", "aspect": "action"|"scene",
     "pair": int}, ...] (optional: generated from the dual rules of
     tasks/unscene_binary.py when the labels are known synthetic classes),
     "open_ended": {"q", "a"} (optional), "start"?, "end"?}
  * VideoCon-style (training, HACA): {"video", "caption", "contrast_caption",
    "contrast_type"?, "start"?, "end"?} -> a positive and a negative row, plus a masking
    row for haca_mask (``haca_family``, tasks/haca.py pair_rows)
  * VELOCITI-style (evaluation, entailment pairs): {"video", "positive_caption",
    "negative_caption", "type"?} -> two tasks/haca.PAIR rows ("Yes" / "No", ``aspect`` =
    the type) sharing ``pair``; a video with several pairs is one record per pair
  * SSv2-style (evaluation, text-to-video retrieval): {"video", "label"} -> one
    tasks/haca.RETRIEVAL row holding the label text (the query this clip is relevant to)
A record that breaks its layout becomes a ``Failure`` naming the file, the record and the
field (expected vs found); the caller decides how many failures are acceptable.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import haca, mvbench, qa, unscene_binary

UNSCENE_KINDS = ("unusual", "scene_only")


@dataclasses.dataclass
class Item:
  """One video and its questions, ready to decode. ``video`` is an absolute path."""
  key: str
  video: str
  source: str  # the record's "video" field as written
  qa: list
  task: str
  kind: str = ""
  action: str = ""
  scene: str = ""
  candidates: list = dataclasses.field(default_factory=list)
  start: float | None = None
  end: float | None = None


@dataclasses.dataclass
class Failure:
  where: str  # "file.json record 12 (video path)"
  reason: str
  category: str = "bad record"  # | "missing video" | "undecodable video" | "bad bounds"

  def __str__(self):
    return f"{self.where}: {self.reason}"


class RecordError(ValueError):
  """A record that does not follow its layout."""


def _field(record: dict, name: str, kind, layout: str):
  if name not in record:
    raise RecordError(f"missing field {name!r} ({layout} layout expects it)")
  value = record[name]
  if not isinstance(value, kind):
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise RecordError(f"field {name!r} should be {names}, found {type(value).__name__} "
                      f"{value!r:.60}")
  return value


def _bound(record: dict, name: str):
  value = record.get(name)
  if value is None:
    return None
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    raise RecordError(f"field {name!r} should be seconds (a number), found {value!r:.60}")
  return float(value)


def layout_of(record: dict) -> str:
  """"instruct" | "mvbench" | "unscene", from the fields the record has."""
  if "QA" in record:
    return "instruct"
  if "candidates" in record or "question" in record:
    return "mvbench"
  if "kind" in record or "binary" in record:
    return "unscene"
  if "contrast_caption" in record:
    return "videocon"
  if "positive_caption" in record or "negative_caption" in record:
    return "velociti"
  if "label" in record:
    return "ssv2"
  raise RecordError(f"unknown layout: fields {sorted(record)[:8]} match none of "
                    f"VideoChat2-IT (QA), MVBench (question, candidates, answer), "
                    f"UNSCENE (kind, scene, action), VideoCon (caption, contrast_caption), "
                    f"VELOCITI (positive_caption, negative_caption) or SSv2 (label)")


def _text_field(record: dict, name: str, layout: str) -> str:
  """A non-empty string field (RecordError naming it otherwise)."""
  value = _field(record, name, str, layout)
  if not value.strip():
    raise RecordError(f"field {name!r} is empty ({layout} layout expects text)")
  return value.strip()


def _haca_qa(record: dict, layout: str, haca_family: str) -> tuple[str, list]:
  """(item task, QA rows) of a VideoCon, VELOCITI or SSv2 record."""
  if layout == "videocon":
    positive = _text_field(record, "caption", "VideoCon")
    negative = _text_field(record, "contrast_caption", "VideoCon")
    kind = _field(record, "contrast_type", str, "VideoCon") if "contrast_type" in record else ""
    return "videocon", haca.pair_rows(positive, negative, haca_family, kind)
  if layout == "velociti":
    positive = _text_field(record, "positive_caption", "VELOCITI")
    negative = _text_field(record, "negative_caption", "VELOCITI")
    kind = _field(record, "type", str, "VELOCITI") if "type" in record else ""
    return "velociti", [qa(positive, "Yes", task=haca.PAIR, aspect=kind, pair=0),
                        qa(negative, "No", task=haca.PAIR, aspect=kind, pair=0)]
  return "ssv2", [qa(_text_field(record, "label", "SSv2"), "", task=haca.RETRIEVAL)]


def _instruct_qa(record):
  turns = _field(record, "QA", list, "VideoChat2-IT")
  if not turns:
    raise RecordError("field 'QA' is an empty list")
  out = []
  for k, turn in enumerate(turns):
    if not isinstance(turn, dict):
      raise RecordError(f"QA[{k}] should be an object, found {type(turn).__name__}")
    q, a = (_field(turn, f, str, "VideoChat2-IT QA") for f in ("q", "a"))
    instruction = _field(turn, "i", str, "VideoChat2-IT QA") if turn.get("i") else ""
    out.append(qa(q, a, task="instruct", i=instruction))
  return out


def _unscene_qa(record, rng):
  kind = _field(record, "kind", str, "UNSCENE")
  if kind not in UNSCENE_KINDS:
    raise RecordError(f"field 'kind' should be one of {UNSCENE_KINDS}, found {kind!r}")
  scene = _field(record, "scene", str, "UNSCENE")
  action = "" if kind == "scene_only" else _field(record, "action", str, "UNSCENE")
  if "binary" in record:
    binary = []
    for k, item in enumerate(_field(record, "binary", list, "UNSCENE")):
      if not isinstance(item, dict):
        raise RecordError(f"binary[{k}] should be an object, found {type(item).__name__}")
      aspect = _field(item, "aspect", str, "UNSCENE binary") if "aspect" in item else ""
      pair = _field(item, "pair", int, "UNSCENE binary") if "pair" in item else -1
      binary.append(qa(_field(item, "q", str, "UNSCENE binary"),
                       _field(item, "a", str, "UNSCENE binary"), task=unscene_binary.TASK,
                       aspect=aspect, pair=pair))
  elif scene in synthetic.SCENES and (not action or action in synthetic.ACTIONS):
    binary = unscene_binary.questions(action, scene, rng)
  else:
    raise RecordError("field 'binary' is missing and the labels are not synthetic classes "
                      "the dual questions could be generated for")
  if "open_ended" in record:
    item = _field(record, "open_ended", dict, "UNSCENE")
    binary.append(qa(_field(item, "q", str, "UNSCENE open_ended"),
                     _field(item, "a", str, "UNSCENE open_ended"), task="open_ended"))
  return kind, action, scene, binary


def file_layout(records: list) -> str | None:
  """The layout most records of a file follow (None when none follows any)."""
  found = collections.Counter()
  for record in records:
    if isinstance(record, dict):
      try:
        found[layout_of(record)] += 1
      except RecordError:
        pass
  return found.most_common(1)[0][0] if found else None


def parse_record(record, *, key: str, task: str, video_root: str,
                 rng: np.random.Generator, layout: str | None = None,
                 haca_family: str = "haca") -> Item:
  """One record -> Item; raises RecordError naming the field (expected vs found).

  ``layout``: the file's layout (``file_layout``); None = decided by this record's fields.
  ``haca_family``: the rows of VideoCon-style records (tasks/haca.py FAMILIES).
  """
  if not isinstance(record, dict):
    raise RecordError(f"record should be an object, found {type(record).__name__}")
  video = _field(record, "video", str, "every")
  path = video if os.path.isabs(video) else os.path.join(video_root, video)
  start, end = _bound(record, "start"), _bound(record, "end")
  layout = layout or layout_of(record)
  if layout == "instruct":
    return Item(key, path, video, _instruct_qa(record), task, start=start, end=end)
  if layout == "mvbench":
    question = _field(record, "question", str, "MVBench")
    candidates = _field(record, "candidates", list, "MVBench")
    answer = _field(record, "answer", str, "MVBench")
    if not candidates or not all(isinstance(c, str) for c in candidates):
      raise RecordError(f"field 'candidates' should be a non-empty list of strings, found "
                        f"{candidates!r:.80}")
    try:
      turns = mvbench.questions(question, candidates, answer)
    except ValueError as e:
      raise RecordError(f"field 'answer': {e}") from e
    return Item(key, path, video, turns, f"mvbench/{task}", candidates=list(candidates),
                start=start, end=end)
  if layout in ("videocon", "velociti", "ssv2"):
    item_task, turns = _haca_qa(record, layout, haca_family)
    return Item(key, path, video, turns, item_task, start=start, end=end)
  kind, action, scene, turns = _unscene_qa(record, rng)
  return Item(key, path, video, turns, "unscene", kind=kind, action=action, scene=scene,
              start=start, end=end)


def json_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """A JSON file, or every *.json in a directory (sorted); error when there are none."""
  path = pathlib.Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.json"))
    if not files:
      raise FileNotFoundError(f"annotation directory {path} holds no *.json files")
    return files
  if not path.is_file():
    raise FileNotFoundError(f"annotation file {path} does not exist")
  return [path]


def read_items(path: str | os.PathLike, video_root: str, seed: int = 0,
               haca_family: str = "haca") -> tuple[list[Item], list[Failure]]:
  """Items and record failures of one annotation file (or directory of task files).

  A file that is not valid JSON or not a list raises (it is a configuration error, not a
  bad record).
  """
  items, failures = [], []
  for file in json_files(path):
    try:
      records = json.loads(file.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"annotation file {file} is not valid JSON: {e}") from e
    if not isinstance(records, list):
      raise ValueError(f"annotation file {file} should hold a JSON list of records, found "
                       f"{type(records).__name__}")
    layout = file_layout(records)
    for index, record in enumerate(records):
      key = f"{file.stem}/{index:06d}"
      rng = np.random.default_rng([seed, index, len(file.stem)])
      try:
        items.append(parse_record(record, key=key, task=file.stem, video_root=video_root,
                                  rng=rng, layout=layout, haca_family=haca_family))
      except RecordError as e:
        video = record.get("video", "?") if isinstance(record, dict) else "?"
        failures.append(Failure(f"{file} record {index} (video {video})", str(e)))
  return items, failures
