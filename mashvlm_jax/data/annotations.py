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
  * tracks (UTR trajectory queries, tasks/utr.py):
    {"video", "tracks": [{"label": str, "appearance": str, "action": str (optional),
     "boxes": [{"frame": int | "time": seconds, "box": [x1, y1, x2, y2]}, ...]}, ...],
     "start"?, "end"?}; boxes in pixels of the decoded video, frame indices counted from
    the video's first frame (times: frame = time * fps); the builder maps them onto the
    sampled, resized frames (utr.stored_boxes) and writes query rows (task "utr").
  * EPIC-KITCHENS-100 (LLaVAction, issue 18): one record per action segment,
    {"id"?, "video", "start", "stop" (seconds or "HH:MM:SS.ff"), "narration", "verb",
     "verb_class", "noun", "noun_class"}: a multiple-choice row whose options come from
    the predictions file (``read_items(predictions=...)``); see ``epic_items``.
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
  tracks: list = dataclasses.field(default_factory=list)  # tracks layout: Track objects
  seed: int = 0  # tracks layout: the seed of the record's query draws


@dataclasses.dataclass(frozen=True)
class Track:
  """One subject of a tracks record: ``points`` sorted ((frame index or None, time or
  None, (x1, y1, x2, y2) pixels), ...), each point with a frame or a time."""
  label: str
  appearance: str
  action: str
  points: tuple


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
  """"instruct" | "mvbench" | "unscene" | "tracks", from the fields the record has."""
  if "tracks" in record:
    return "tracks"
  if "QA" in record:
    return "instruct"
  if "narration" in record or "verb_class" in record:
    return "epic"
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
                    f"UNSCENE (kind, scene, action), tracks (tracks), VideoCon (caption, "
                    f"contrast_caption), VELOCITI (positive_caption, negative_caption) or "
                    f"SSv2 (label)")


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


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and \
      np.isfinite(value)


def _track_point(item, where: str):
  """(frame, time, box) of one boxes[] entry; RecordError naming ``where`` and the field."""
  if not isinstance(item, dict):
    raise RecordError(f"{where} should be an object, found {type(item).__name__}")
  frame, time = item.get("frame"), item.get("time")
  if (frame is None) == (time is None):
    raise RecordError(f"{where} needs exactly one of 'frame' (index) or 'time' (seconds), "
                      f"found {sorted(item)}")
  if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool)
                            or frame < 0):
    raise RecordError(f"{where}.frame should be a frame index >= 0, found {frame!r:.40}")
  if time is not None and (not _number(time) or time < 0):
    raise RecordError(f"{where}.time should be seconds >= 0, found {time!r:.40}")
  box = item.get("box")
  if not isinstance(box, list) or len(box) != 4 or not all(map(_number, box)):
    raise RecordError(f"{where}.box should be 4 numbers [x1, y1, x2, y2] in pixels, found "
                      f"{box!r:.60}")
  if box[2] <= box[0] or box[3] <= box[1]:
    raise RecordError(f"{where}.box should have x2 > x1 and y2 > y1, found {box}")
  return frame, None if time is None else float(time), tuple(float(v) for v in box)


def _tracks(record) -> list[Track]:
  tracks = _field(record, "tracks", list, "tracks")
  if not tracks:
    raise RecordError("field 'tracks' is an empty list")
  out = []
  for k, track in enumerate(tracks):
    where = f"tracks[{k}]"
    if not isinstance(track, dict):
      raise RecordError(f"{where} should be an object, found {type(track).__name__}")
    try:
      label, appearance = (_field(track, f, str, "tracks") for f in ("label", "appearance"))
      action = _field(track, "action", str, "tracks") if "action" in track else ""
      boxes = _field(track, "boxes", list, "tracks")
    except RecordError as e:
      raise RecordError(f"{where}: {e}") from e
    if not label.strip() or not boxes:
      raise RecordError(f"{where}: needs a non-empty 'label' and 'boxes'")
    points = [_track_point(item, f"{where}.boxes[{j}]") for j, item in enumerate(boxes)]
    kinds = {p[0] is None for p in points}
    if len(kinds) > 1:
      raise RecordError(f"{where}.boxes mixes 'frame' and 'time' entries; use one of them")
    keys = [p[1] if p[0] is None else p[0] for p in points]
    if len(set(keys)) != len(keys):
      raise RecordError(f"{where}.boxes gives a frame or time twice")
    order = np.argsort(keys, kind="stable")
    out.append(Track(label.strip(), appearance.strip(), action.strip(),
                     tuple(points[i] for i in order)))
  return out


def has_tracks(path: str | os.PathLike) -> bool:
  """True when an annotation file (or directory) holds a record of the tracks layout."""
  for file in json_files(path):
    try:
      records = json.loads(file.read_text())
    except json.JSONDecodeError:
      continue  # the build reports the file
    if isinstance(records, list) and any(isinstance(r, dict) and "tracks" in r
                                         for r in records):
      return True
  return False


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
    if len(candidates) > mvbench.MAX_OPTIONS:
      raise RecordError(f"field 'candidates' holds {len(candidates)} options, at most "
                        f"{mvbench.MAX_OPTIONS} can be lettered (A-Z)")
    try:
      turns = mvbench.questions(question, candidates, answer)
    except ValueError as e:
      raise RecordError(f"field 'answer': {e}") from e
    return Item(key, path, video, turns, f"mvbench/{task}", candidates=list(candidates),
                start=start, end=end)
  if layout == "tracks":
    return Item(key, path, video, [], "tracks", start=start, end=end, tracks=_tracks(record),
                seed=int(rng.integers(2 ** 31)))
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
               predictions: dict | None = None,
               haca_family: str = "haca") -> tuple[list[Item], list[Failure]]:
  """Items and record failures of one annotation file (or directory of task files).

  A file that is not valid JSON or not a list raises (it is a configuration error, not a
  bad record). A .csv or .jsonl file holds (video, caption) rows (captions.py).
  bad record). ``predictions`` ({clip id: ranked action ids}, recognizer.read_predictions)
  gives the options of EPIC-layout files.
  """
  if pathlib.Path(path).suffix in (".csv", ".jsonl"):
    from mashvlm_jax.data import captions
    return captions.read_items(path, video_root)
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
    if layout == "epic":
      got, failed = epic_items(records, file, video_root, predictions)
      items += got
      failures += failed
      continue
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


# ------------------------------------------------------------------------------ EPIC

# An EPIC action class id: verb_class * EPIC_NOUNS + noun_class (EPIC-KITCHENS-100 has 97
# verbs and 300 nouns); the predictions file ranks these ids.
EPIC_NOUNS = 1000


def epic_action_id(verb_class: int, noun_class: int) -> int:
  return verb_class * EPIC_NOUNS + noun_class


def _seconds(record: dict, name: str) -> float:
  """A time field as seconds: a number, or "HH:MM:SS(.ff)" as EPIC's CSVs write it."""
  value = _field(record, name, (int, float, str), "EPIC-KITCHENS")
  if isinstance(value, bool):
    raise RecordError(f"field {name!r} should be seconds or 'HH:MM:SS.ff', found {value!r}")
  if isinstance(value, str):
    parts = value.split(":")
    try:
      if len(parts) != 3:
        raise ValueError
      hours, minutes, secs = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
      raise RecordError(f"field {name!r} should be seconds or 'HH:MM:SS.ff', found "
                        f"{value!r:.40}") from None
    value = hours * 3600 + minutes * 60 + secs
  if value < 0:
    raise RecordError(f"field {name!r} should be >= 0 seconds, found {value}")
  return float(value)


def _class_id(record: dict, name: str) -> int:
  value = _field(record, name, int, "EPIC-KITCHENS")
  if isinstance(value, bool) or not 0 <= value < EPIC_NOUNS:
    raise RecordError(f"field {name!r} should be a class id in [0, {EPIC_NOUNS}), found "
                      f"{value!r}")
  return value


def _epic_segment(record) -> dict:
  """The checked fields of one EPIC record (RecordError naming the field)."""
  if not isinstance(record, dict):
    raise RecordError(f"record should be an object, found {type(record).__name__}")
  out = {"video": _field(record, "video", str, "EPIC-KITCHENS"),
         "start": _seconds(record, "start"), "stop": _seconds(record, "stop"),
         "narration": _field(record, "narration", str, "EPIC-KITCHENS"),
         "verb": _field(record, "verb", str, "EPIC-KITCHENS"),
         "noun": _field(record, "noun", str, "EPIC-KITCHENS"),
         "verb_class": _class_id(record, "verb_class"),
         "noun_class": _class_id(record, "noun_class")}
  if out["stop"] <= out["start"]:
    raise RecordError(f"field 'stop' ({out['stop']} s) should be after 'start' "
                      f"({out['start']} s)")
  if "id" in record and (not isinstance(record["id"], str) or not record["id"]):
    raise RecordError(f"field 'id' should be a non-empty string, found {record['id']!r:.40}")
  out["id"] = record.get("id")
  out["action"] = epic_action_id(out["verb_class"], out["noun_class"])
  return out


def _epic_where(file, index: int, record) -> str:
  video = record.get("video", "?") if isinstance(record, dict) else "?"
  return f"{file} record {index} (video {video})"


def epic_segments(records: list, file) -> tuple[dict, list[Failure]]:
  """({record index: checked segment fields}, failures) of an EPIC-layout file's records
  (``file`` names them in the failures)."""
  segments, failures = {}, []
  for index, record in enumerate(records):
    try:
      segments[index] = _epic_segment(record)
    except RecordError as e:
      failures.append(Failure(_epic_where(file, index, record), str(e)))
  return segments, failures


def epic_key(segment: dict, file, index: int) -> str:
  """A segment's clip id: its "id", else "<file stem>/<record index, 6 digits>"."""
  return segment["id"] or f"{pathlib.Path(file).stem}/{index:06d}"


def epic_names(segments: dict) -> dict[int, str]:
  """{action id: "verb noun"} of the classes ``segments`` name (the words of the first
  segment of each class, in record order)."""
  names = {}
  for seg in segments.values():
    names.setdefault(seg["action"], f"{seg['verb']} {seg['noun']}")
  return names


def epic_previous(segments: dict) -> dict:
  """{index: [index two back, index one back] or None} of ``segments`` ({index: fields
  with "video" and "start"}): the two previous segments of the same video by start time
  (earlier index on ties); None for a segment with fewer than two."""
  previous = {}
  for order in epic_video_order(segments).values():
    for position, index in enumerate(order):
      before = order[max(0, position - 2):position]
      previous[index] = before if len(before) == 2 else None
  return previous


def epic_video_order(segments: dict) -> dict[str, list]:
  """{video: its segments' indices by start time (earlier index on ties)}."""
  by_video = collections.defaultdict(list)
  for index, seg in sorted(segments.items(), key=lambda kv: (kv[1]["start"], kv[0])):
    by_video[seg["video"]].append(index)
  return dict(by_video)


def epic_items(records: list, file: pathlib.Path, video_root: str,
               predictions: dict | None) -> tuple[list[Item], list[Failure]]:
  """Items and failures of an EPIC-layout file.

  Each action segment becomes one item (the video trimmed to [start, stop]) with one
  multiple-choice row (tasks/mqa.py): its options are ``mqa_options(action, ranked)`` over
  the clip's ranked action ids in ``predictions`` (keyed by the record's "id", else
  "<file stem>/<index>"), keeping the ids this file names (an option is written "verb
  noun", the words of the first record of its class); stored in canonical order, shuffled
  per visit (mqa_train.render_mqa). The two previous segments of the same video (by start
  time, with earlier index on ties) give the prior actions. A record without a prediction
  or with fewer than K nameable ranked classes fails like a malformed one.
  """
  from mashvlm_jax.data.tasks import mqa, mqa_train
  segments, failures = epic_segments(records, file)
  names = epic_names(segments)
  previous = {index: None if before is None else [names[segments[i]["action"]]
                                                  for i in before]
              for index, before in epic_previous(segments).items()}
  items = []
  for index, seg in segments.items():
    key = epic_key(seg, file, index)
    try:
      if predictions is None:
        raise RecordError("EPIC-layout records need a predictions file "
                          "(data.mqa_predictions: clip id -> ranked action ids)")
      if key not in predictions:
        raise RecordError(f"no prediction for clip {key!r} in the predictions file")
      ranked = [c for c in predictions[key] if c in names]
      if len(ranked) < mqa.K:
        raise RecordError(f"the prediction of clip {key!r} ranks {len(ranked)} action ids "
                          f"this file names, fewer than K={mqa.K}")
      row = mqa_train.stored_row(seg["action"], mqa.mqa_options(seg["action"], ranked),
                                 previous[index], names=names)
    except RecordError as e:
      failures.append(Failure(_epic_where(file, index, records[index]), str(e)))
      continue
    path = seg["video"] if os.path.isabs(seg["video"]) else os.path.join(video_root,
                                                                        seg["video"])
    items.append(Item(key, path, seg["video"], [row], "epic", action=seg["narration"],
                      start=seg["start"], end=seg["stop"]))
  return items, failures
