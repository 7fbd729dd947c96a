"""UTR's bidirectional trajectory queries (issue 16; paper: Video-UTR, Sec. 3.2 eqs. 7-9 and
Appendix B).

A subject is a label ("person"), an appearance phrase ("in a red shirt"), an action phrase
("skiing", optional for users' tracks) and its box in every stored frame. A query row
names the subject by ONE attribute in ONE frame, both drawn uniformly:

  location    "Track the person at 12 30 45 80 in frame 3."
  appearance  "Track the person in a red shirt in frame 3."
  action      "Track the person skiing in frame 3."

and the answer gives the other attributes and the box in every frame:

  "The person in a red shirt skiing. Boxes: 12 30 45 80 13 31 46 81 ..."

(for a location query both other attributes, for an appearance query the action, for an
action query the appearance). Frames are numbered from 1. Boxes are (x1, y1, x2, y2) of
the stored frame quantised to ``bins`` (100) bins per axis: x1 = floor(x1 * bins / W),
x2 = ceil(x2 * bins / W) - 1, so bin range [x1, x2] covers every pixel of the pixel box
(``dequantize`` gives the covering pixel box back); four numbers per frame, frames in
order, all space-separated. Subjects smaller than 1/32 of the frame in any frame (or
absent from one) are dropped (Appendix B step 3).

Families of the synthetic training split (families.py): ``utr`` adds ``rows_per_clip``
query rows (3 on even clip indices, 4 on odd ones) to every clip with an actor, beside its
8 ordinary rows: with one row drawn per visit that is 0.95 * (3/11 + 4/12) / 2 = 28.8% of
the samples, as UTR-Data in Table 8's stage-II mix (29%); ``utr_notask`` the same
trajectories as often without a query ("Where is the person in every frame?", all
attributes and boxes: Table 3's "- task modeling"); ``more`` as many extra ordinary rows,
redrawn from train_mix ("+ more data").

Word tokenizer: numbers are single words, so a box is 4 tokens and a trajectory of T
frames 4T tokens; numbers 0..max(bins, MAX_FRAMES) are registered (``texts``).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import families, qa, train_mix, vocabulary

TASK = "utr"
NOTASK = "utr_notask"
FAMILIES = ("utr", "utr_notask")  # families whose answers hold boxes (augmentation rule)
QUERY_TYPES = ("location", "appearance", "action")
BINS = 100
MIN_AREA_SHARE = 1 / 32
ROWS_PER_CLIP = (3, 4)  # UTR rows of a clip with an actor: by clip index parity
MAX_FRAMES = 64  # frame numbers the synthetic vocabulary holds (1..MAX_FRAMES)
LABEL = "person"  # the synthetic subject's category
SHIRT_NAMES = dict(zip(synthetic.SHIRTS, ("red", "green", "blue", "yellow", "purple",
                                          "orange", "cyan", "pink", "black", "white")))
BOXES = "Boxes:"


@dataclasses.dataclass(frozen=True)
class Subject:
  """One tracked subject: ``boxes`` float [T, 4] pixel (x1, y1, x2, y2) per stored frame."""
  label: str
  appearance: str  # a phrase after the label, e.g. "in a red shirt"
  action: str  # a phrase after the label, e.g. "skiing"; "" when unknown
  boxes: np.ndarray


# ------------------------------------------------------------------------------ boxes

def quantize(boxes: np.ndarray, height: int, width: int, bins: int = BINS) -> np.ndarray:
  """int64 [..., 4] bin indices in 0..bins-1 of pixel boxes [..., 4] (x1, y1, x2, y2 edges):
  first bins floored, last bins ceiled, so the bins cover the whole pixel box."""
  boxes = np.asarray(boxes, np.float64)
  # edge * bins / size (not edge / (size / bins)): an edge on a bin boundary gives an
  # exact integer, so floor and ceil never move it to the neighbouring bin.
  scaled = boxes * bins / np.array([width, height, width, height], np.float64)
  lo, hi = np.floor(scaled[..., :2]), np.ceil(scaled[..., 2:]) - 1
  return np.clip(np.concatenate([lo, hi], axis=-1), 0, bins - 1).astype(np.int64)


def dequantize(bins_box: np.ndarray, height: int, width: int, bins: int = BINS) -> np.ndarray:
  """float64 [..., 4] pixel box covered by quantised boxes [..., 4] (inverse of quantize
  up to the bin size: x1 = q1 * W / bins, x2 = (q2 + 1) * W / bins)."""
  q = np.asarray(bins_box, np.float64)
  edges = np.concatenate([q[..., :2], q[..., 2:] + 1], axis=-1)
  return edges * np.array([width, height, width, height], np.float64) / bins


def box_text(bins_box) -> str:
  """"12 30 45 80" for one box, or every box of [T, 4] in frame order."""
  return " ".join(str(int(v)) for v in np.asarray(bins_box).reshape(-1))


def parse_boxes(answer: str, num_frames: int | None = None, bins: int = BINS) -> np.ndarray:
  """int64 [T, 4] boxes read back from an answer's "Boxes: ..." part; ValueError naming the
  problem (no "Boxes:", a word that is not a number, a count that is not 4 per frame or
  not ``num_frames`` frames, a value outside 0..bins-1, x2 < x1 or y2 < y1)."""
  head, sep, tail = answer.partition(BOXES)
  if not sep:
    raise ValueError(f"answer has no {BOXES!r} part: {answer!r:.80}")
  words = tail.split()
  bad = [w for w in words if not re.fullmatch(r"\d+", w)]
  if bad:
    raise ValueError(f"box answer holds non-numbers {bad[:5]} after {BOXES!r}")
  if not words or len(words) % 4:
    raise ValueError(f"box answer has {len(words)} numbers, expected 4 per frame")
  out = np.array([int(w) for w in words], np.int64).reshape(-1, 4)
  if num_frames is not None and len(out) != num_frames:
    raise ValueError(f"box answer has {len(out)} frames, expected {num_frames}")
  if out.max() >= bins:
    raise ValueError(f"box answer has value {out.max()} outside 0..{bins - 1}")
  if (out[:, 2] < out[:, 0]).any() or (out[:, 3] < out[:, 1]).any():
    raise ValueError("box answer has a box with x2 < x1 or y2 < y1")
  return out


def large_enough(boxes: np.ndarray, height: int, width: int,
                 min_share: float = MIN_AREA_SHARE) -> bool:
  """True when the subject is present (finite box) and covers at least ``min_share`` of
  the frame area in every frame (pixel boxes [T, 4])."""
  boxes = np.asarray(boxes, np.float64)
  if not np.isfinite(boxes).all():
    return False
  area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0,
                                                                 None)
  return bool((area >= min_share * height * width).all())


# ------------------------------------------------------------------------------ rows

def _frame_text(t: int) -> str:
  return f"frame {t + 1}"


def query_text(kind: str, subject: Subject, bins_boxes: np.ndarray, t: int) -> str:
  """The question naming ``subject`` by attribute ``kind`` in frame t (0-based)."""
  attribute = {"location": f"at {box_text(bins_boxes[t])}", "appearance": subject.appearance,
               "action": subject.action}[kind]
  return f"Track the {subject.label} {attribute} in {_frame_text(t)}."


def answer_text(subject: Subject, bins_boxes: np.ndarray, omit: str = "") -> str:
  """"The <label> <appearance> <action>. Boxes: <4T numbers>", without attribute ``omit``
  ("appearance" | "action" | "" for none)."""
  words = [subject.label] + [getattr(subject, k) for k in ("appearance", "action")
                             if k != omit and getattr(subject, k)]
  return f"The {' '.join(words)}. {BOXES} {box_text(bins_boxes)}"


def query_types(subject: Subject) -> tuple[str, ...]:
  """The query types a subject supports (action only when it has one)."""
  return tuple(k for k in QUERY_TYPES if k != "action" or subject.action)


def query_row(subject: Subject, bins_boxes: np.ndarray, rng: np.random.Generator) -> dict:
  """One query row: type uniform over ``query_types``, frame uniform over the T frames."""
  kinds = query_types(subject)
  kind = kinds[int(rng.integers(len(kinds)))]
  t = int(rng.integers(len(bins_boxes)))
  return qa(query_text(kind, subject, bins_boxes, t),
            answer_text(subject, bins_boxes, omit="" if kind == "location" else kind),
            task=TASK, aspect=kind)


def notask_row(subject: Subject, bins_boxes: np.ndarray) -> dict:
  """The trajectory without a query: every attribute and every box."""
  return qa(f"Where is the {subject.label} in every frame?", answer_text(subject, bins_boxes),
            task=NOTASK)


def subject_rows(subjects: list[Subject], height: int, width: int, rng: np.random.Generator,
                 rows_per_subject: int = 1, bins: int = BINS) -> list[dict]:
  """Query rows of every subject large enough in every frame (others dropped)."""
  out = []
  for subject in subjects:
    if large_enough(subject.boxes, height, width):
      q = quantize(subject.boxes, height, width, bins)
      out += [query_row(subject, q, rng) for _ in range(rows_per_subject)]
  return out


# ------------------------------------------------------------------------------ synthetic

def clip_subject(spec: synthetic.ClipSpec, num_frames: int, size: int) -> Subject | None:
  """The clip's actor as a Subject (exact renderer boxes), or None for scene-only clips."""
  if not spec.action:
    return None
  shirt = SHIRT_NAMES[synthetic.actor_look(spec).shirt]
  return Subject(LABEL, f"in a {shirt} shirt", spec.action,
                 synthetic.actor_boxes(spec, num_frames, size, size))


def rows_per_clip(spec: synthetic.ClipSpec) -> int:
  """How many rows each family adds to a clip with an actor (ROWS_PER_CLIP by the parity
  of its index: the same count for utr, utr_notask and more)."""
  return ROWS_PER_CLIP[spec.index % 2]


def _kept(spec, ctx) -> Subject | None:
  subject = clip_subject(spec, ctx.num_frames, ctx.size)
  if subject is None or not large_enough(subject.boxes, ctx.size, ctx.size):
    return None
  return subject


@families.train_family(TASK)
def query_rows(spec, rng, ctx) -> list[dict]:
  """``rows_per_clip`` query rows for a clip whose actor is large enough; else none."""
  subject = _kept(spec, ctx)
  if subject is None:
    return []
  q = quantize(subject.boxes, ctx.size, ctx.size)
  return [query_row(subject, q, rng) for _ in range(rows_per_clip(spec))]


@families.train_family(NOTASK)
def notask_rows(spec, rng, ctx) -> list[dict]:
  """The same trajectory without a query, ``rows_per_clip`` times (``utr``'s share)."""
  del rng
  subject = _kept(spec, ctx)
  if subject is None:
    return []
  return [notask_row(subject, quantize(subject.boxes, ctx.size, ctx.size))] * rows_per_clip(
      spec)


@families.train_family("more")
def more_rows(spec, rng, ctx) -> list[dict]:
  """``rows_per_clip`` extra ordinary rows (a fresh train_mix draw, rows picked without
  replacement) for the clips ``utr`` adds rows to: the "+ more data" control."""
  if _kept(spec, ctx) is None:
    return []
  rows = train_mix.questions(spec.action, spec.scene, rng, ctx.train_negatives)
  picked = rng.choice(len(rows), rows_per_clip(spec), replace=False)
  return [rows[int(k)] for k in sorted(picked)]


@vocabulary.register
def texts() -> list[str]:
  """Every word this module writes for the synthetic set (numbers as one text)."""
  subject = Subject(LABEL, "", "", np.zeros((1, 4)))
  out = [query_text("location", subject, np.zeros((1, 4)), 0),
         notask_row(subject, np.zeros((1, 4)))["q"], f"The {LABEL}. {BOXES}",
         " ".join(str(n) for n in range(max(BINS, MAX_FRAMES + 1)))]
  out += [f"in a {name} shirt" for name in SHIRT_NAMES.values()]
  return out + list(synthetic.ACTIONS)


# ------------------------------------------------------------------------------ users' tracks

def stored_boxes(points, indices, fps: float, width: int, height: int,
                 size: int) -> np.ndarray:
  """float64 [T, 4] pixel boxes of a track on the stored frames.

  ``points``: a Track's sorted (frame, time, box) entries in pixels of the decoded video
  (``width`` x ``height``); ``indices``: the decoded frame index of each stored frame
  (video.read_video's meta). A time t is frame t * fps. A stored frame between two
  annotated frames gets the linear interpolation of their boxes; one outside the
  annotated span gets NaN (the subject is absent, so ``large_enough`` drops it). Boxes
  then follow the resize and centre crop to ``size`` (video.resize_geometry), clipped to
  the frame.
  """
  from mashvlm_jax.data import video
  at = np.array([p[0] if p[0] is not None else p[1] * fps for p in points], np.float64)
  boxes = np.array([p[2] for p in points], np.float64)
  idx = np.asarray(indices, np.float64)
  out = np.stack([np.interp(idx, at, boxes[:, k]) for k in range(4)], axis=-1)
  out[(idx < at[0] - 1e-6) | (idx > at[-1] + 1e-6)] = np.nan
  new_w, new_h, left, top = video.resize_geometry(width, height, size)
  out = out * np.array([new_w / width, new_h / height] * 2) - np.array([left, top] * 2)
  return np.clip(out, 0, size)


def track_rows(tracks, meta: dict, size: int, seed: int, bins: int = BINS) -> list[dict]:
  """One query row per track that is present and large enough in every stored frame.
  ``meta``: video.read_video's (indices, fps, width, height)."""
  subjects = [Subject(t.label, t.appearance, t.action,
                      stored_boxes(t.points, meta["indices"], meta["fps"], meta["width"],
                                   meta["height"], size)) for t in tracks]
  return subject_rows(subjects, size, size, np.random.default_rng(seed), bins=bins)


# ------------------------------------------------------------------------------ config rules

def longest_text(tok, template, num_frames: int, bins: int = BINS) -> int:
  """Chat-text tokens (chat.encode_example's text_mask count) of the longest synthetic UTR
  row of ``num_frames`` frames: every query type and the no-query row, every shirt colour
  and action, every box number and the frame number at their widest (bins - 1, T)."""
  from mashvlm_jax.data import chat
  boxes = np.full((num_frames, 4), bins - 1)
  longest = 0
  for colour in SHIRT_NAMES.values():
    for action in synthetic.ACTIONS:
      subject = Subject(LABEL, f"in a {colour} shirt", action, boxes)
      rows = [qa(query_text(k, subject, boxes, num_frames - 1),
                 answer_text(subject, boxes, "" if k == "location" else k), task=TASK)
              for k in QUERY_TYPES] + [notask_row(subject, boxes)]
      for row in rows:
        ids, _ = chat.encode_example(tok, template, [row], 100_000)
        longest = max(longest, int(ids["text_mask"].sum()))
  return longest


def check_config(config, augment: bool) -> None:
  """Start-of-training rules for UTR rows in the train split: ``augment_rule`` (when
  augmenting), and for the synthetic families a data.text_len that holds the longest row
  (chat.fit would otherwise cut the query from the question's start or fail mid-run)."""
  from mashvlm_jax.data import chat, registry
  if augment:
    augment_rule(config)
  d = config.data
  where = utr_rows_in(config)
  if not where:
    return
  frames = registry.stored_shape(config)[0]
  if frames != int(config.model.num_frames):
    raise ValueError(f"{where} write one box per stored frame, but data.stored_frames="
                     f"{frames} differs from model.num_frames={config.model.num_frames}: "
                     f"the pipeline would resample the frames and not the boxes; set "
                     f"data.stored_frames=0 (the model's)")
  if d.name != "synthetic_unscene":
    return
  names = families.check_train_tasks(d.get("train_tasks", ()))
  redrawn = [n for n in names if n in families.CLIP_RENDERERS]
  if redrawn:
    raise ValueError(f"{where} hold the boxes of the ordinary render, but data.train_tasks "
                     f"also names {redrawn}, which redraw some training clips (e.g. held "
                     f"still for temporal detection): train them in separate runs")
  need = longest_text(registry.load_tokenizer(config), chat.ChatTemplate(**dict(d.template)),
                      frames)
  if need > int(d.text_len):
    raise ValueError(f"data.train_tasks={tuple(d.train_tasks)} writes UTR rows of up to "
                     f"{need} tokens for {frames} stored frames, but data.text_len="
                     f"{d.text_len}; set data.text_len >= {need} (docs/design.md, UTR "
                     f"trajectory queries)")


def utr_rows_in(config) -> str:
  """Where the train split gets rows with boxes: "data.train_tasks=(...) (families [...])"
  or "data.annotations['train'] tracks records in [files]"; "" when it has none."""
  d = config.data
  if d.name == "synthetic_unscene":
    named = [n for n in d.get("train_tasks", ()) if n in FAMILIES]
    where = f"data.train_tasks={tuple(d.get('train_tasks', ()))} (families {named})"
  else:
    from mashvlm_jax.data import annotations, registry
    sources = [s for s in registry.sources(config) if s[0] == d.train_split]
    named = [path for _, path, _ in sources if annotations.has_tracks(path)]
    where = f"data.annotations[{d.train_split!r}] tracks records in {named}"
  return where if named else ""


def augment_rule(config) -> None:
  """ValueError naming the keys when the training split has UTR rows (a utr family in
  data.train_tasks, or a tracks record in data.annotations) and data.augment enables
  random_resized_crop or flip: the pipeline moves frames, not the boxes in the answers."""
  aug = dict(config.data.get("augment", {}) or {})
  on = [f"data.augment.{k}" for k in ("random_resized_crop", "flip") if aug.get(k)]
  where = utr_rows_in(config) if on else ""
  if where:
    raise ValueError(
        f"{where} write boxes into their answers, but {' and '.join(on)} move the frames "
        f"and not those boxes; set {'=False and '.join(on)}=False for UTR training "
        f"(docs/design.md, UTR trajectory queries)")
