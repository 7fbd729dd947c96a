"""LLaVAction's training rows in the synthetic set (issue 18): multiple-choice action QA,
temporal detection and prior actions, as task families of ``data.train_tasks``
(families.py).

Families (rows on train clips with an actor; scene-only clips get none):
  "mqa"         options from recognizer A's ranked classes of the clip (mqa.mqa_options)
  "mqa_pool"    the ground truth + K-1 uniform draws from recognizer A's top 2K (pool_options)
  "mqa_random"  the ground truth + K-1 uniform other classes (random_options)
  "mqa_prior"   as "mqa", and the stored question states the clip's two previous actions
                (``previous_labels``); each visit shows them with probability PRIOR_PROB
  "temporal"    on a TEMPORAL_SHARE of the clips (picked by the clip's HOLD_PICK stream):
                the clip is rendered holding still before and after the action
                (synthetic.render_held_clip) and gets one temporal-detection row

Recognizer A is fitted at build time on the plain renders of the train split's clips
with an actor (recognizer.fit), once per process and data set (cached by the clips'
parameters), and ranks those same clips; a clip the temporal family holds still is ranked
on its plain render, so a clip's options do not depend on the other families.

A stored multiple-choice row keeps its options in canonical order (class id), the answer
naming the ground truth's letter there; ``render_mqa`` (the visit renderer of task "mqa")
shuffles them at every visit, the answer's letter following the ground truth, and keeps a
stored prior-action sentence with probability PRIOR_PROB. It reads only the row's text, so
it serves rows of any narrations (users' data too).

Previous clips on the synthetic set: a split is cut into "videos" of VIDEO_CLIPS
consecutive clip indices (index // VIDEO_CLIPS); a clip's previous actions are those of
the two nearest preceding clips with an actor in the same video (two back, then one
back). A clip with fewer than two gets no prior sentence.
"""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

from mashvlm_jax.data import recognizer, synthetic
from mashvlm_jax.data.tasks import families, mqa, vocabulary

PRIOR_PROB = 0.3  # visits whose multiple-choice prompt states the two previous actions
TEMPORAL_SHARE = 0.25  # training clips with an actor that hold still (temporal rows)
VIDEO_CLIPS = 8  # consecutive clip indices that make one synthetic "video"
RECOGNIZER = "A"  # the training distractors' recognizer (B gives the evaluation options)


# ------------------------------------------------------------------------------ recognizer

_RANKED: dict[str, dict[str, list[int]]] = {}


def _clips(ctx: families.BuildContext) -> recognizer.SyntheticSet:
  if ctx is None or ctx.config is None:
    raise ValueError("the multiple-choice families need the build's SyntheticConfig "
                     "(families.BuildContext.config) to fit recognizer A on its train split")
  return recognizer.SyntheticSet.from_config(ctx.config)


def train_rankings(data: recognizer.SyntheticSet, name: str = RECOGNIZER) -> dict:
  """{train clip id: its 64 classes ranked by recognizer ``name``} for the train clips
  with an actor, the recognizer fitted on those clips (rendered once; cached per process
  and clip parameters)."""
  key = json.dumps([name, dataclasses.asdict(data)], sort_keys=True)
  if key not in _RANKED:
    specs, raw = recognizer.split_features(data, "train", [name])
    y = recognizer.labels(specs)
    model = recognizer.fit(name, raw[name], y[:, 0], y[:, 1])
    ranked = model.ranked(raw[name])
    _RANKED[key] = {s.id: [int(c) for c in row] for s, row in zip(specs, ranked)}
  return _RANKED[key]


# ------------------------------------------------------------------------------ prior

def previous_labels(specs, index: int, video_clips: int = VIDEO_CLIPS) -> list[str] | None:
  """The (two back, one back) actions' narrations of clip ``index`` of a split's ``specs``
  (stored order): the two nearest preceding clips with an actor in its video of
  ``video_clips`` indices; None when there are fewer than two."""
  begin = index - index % video_clips
  found = [s for s in specs[begin:index] if s.action][-2:]
  if len(found) < 2:
    return None
  return [mqa.narration(mqa.action_class(s.action, s.scene)) for s in found]


# ------------------------------------------------------------------------------ rows

def stored_row(gt: int, options, previous=None, names: dict | None = None) -> dict:
  """The stored multiple-choice row: options in canonical (class id) order, the answer
  naming the ground truth there; ``previous`` (two narrations) states the prior actions.
  ``names``: {class id: narration} (default: the synthetic narrations)."""
  options = sorted(options)
  texts = [names[c] if names is not None else mqa.narration(c) for c in options]
  return mqa.mqa_qa(texts, options.index(gt), previous)


def _gt(spec) -> int | None:
  return mqa.action_class(spec.action, spec.scene)


def _ranked(spec, ctx) -> list[int]:
  return train_rankings(_clips(ctx))[spec.id]


@families.train_family("mqa")
def mqa_rows(spec, rng, ctx) -> list[dict]:
  """Recognizer A's options (top K, or top K-1 + the ground truth)."""
  gt = _gt(spec)
  return [] if gt is None else [stored_row(gt, mqa.mqa_options(gt, _ranked(spec, ctx)))]


@families.train_family("mqa_pool")
def mqa_pool_rows(spec, rng, ctx) -> list[dict]:
  """The ground truth + K-1 uniform draws from recognizer A's top 2K."""
  gt = _gt(spec)
  if gt is None:
    return []
  return [stored_row(gt, mqa.pool_options(gt, _ranked(spec, ctx), mqa.K, rng))]


@families.train_family("mqa_random")
def mqa_random_rows(spec, rng, ctx) -> list[dict]:
  """The ground truth + K-1 uniform other classes (no recognizer)."""
  gt = _gt(spec)
  if gt is None:
    return []
  return [stored_row(gt, mqa.random_options(gt, range(mqa.NUM_CLASSES), mqa.K, rng))]


@families.train_family("mqa_prior")
def mqa_prior_rows(spec, rng, ctx) -> list[dict]:
  """As "mqa", the stored question stating the two previous actions (when the clip has
  them); the visit renderer shows them with probability PRIOR_PROB."""
  gt = _gt(spec)
  if gt is None:
    return []
  previous = previous_labels(_clips(ctx).specs(spec.split), spec.index)
  return [stored_row(gt, mqa.mqa_options(gt, _ranked(spec, ctx)), previous)]


# ------------------------------------------------------------------------------ temporal

def held_segment(spec, num_frames: int) -> tuple[int, int] | None:
  """(first, last) action frame of a training clip the temporal family holds still, or
  None: clips with an actor, picked with probability TEMPORAL_SHARE by their HOLD_PICK
  stream; the segment is synthetic.still_segment."""
  if spec.split != "train" or not spec.action:
    return None
  if spec.rng(synthetic.HOLD_PICK).random() >= TEMPORAL_SHARE:
    return None
  return synthetic.still_segment(spec, num_frames)


def temporal_row(spec, num_frames: int, first: int, last: int) -> dict:
  """The temporal-detection row of a held clip: the action over [first, last] x 0.25 s;
  the stored clip is the widened window (delta = its still seconds, rho = the share
  before the action), so the answer is the action's start and end in the clip."""
  step = synthetic.FRAME_SECONDS
  start, end, clip_end = first * step, last * step, (num_frames - 1) * step
  delta = clip_end - (end - start)
  _, _, row = mqa.temporal_qa(mqa.narration(_gt(spec)), start, end, delta, start / delta,
                              clip_end)
  return row


@families.train_family("temporal")
def temporal_rows(spec, rng, ctx) -> list[dict]:
  """One temporal-detection row on the clips ``held_segment`` picks."""
  segment = held_segment(spec, ctx.num_frames)
  return [] if segment is None else [temporal_row(spec, ctx.num_frames, *segment)]


@families.clip_renderer("temporal")
def held_frames(spec, ctx):
  """The picked clips held still around the action; None for the others."""
  segment = held_segment(spec, ctx.num_frames)
  if segment is None:
    return None
  return synthetic.render_held_clip(spec, ctx.num_frames, ctx.size, ctx.size, *segment)


# ------------------------------------------------------------------------------ visits

_OPTION_LINE = re.compile(r"^\(([A-Z])\) (.+)$")


def parse_row(row: dict) -> tuple[list[str], int, list[str] | None]:
  """(option narrations, index of the answer, previous narrations or None) of a stored
  multiple-choice row (mqa.mqa_qa's texts); ValueError naming what does not parse."""
  lines = row["q"].split("\n")
  head, option_lines = lines[0], lines[1:]
  options = []
  for k, line in enumerate(option_lines):
    match = _OPTION_LINE.match(line)
    if not match or match.group(1) != mqa.option_letter(k):
      raise ValueError(f"multiple-choice row: option line {k + 1} {line!r} is not "
                       f"'({mqa.option_letter(k)}) <narration>'")
    options.append(match.group(2))
  match = _OPTION_LINE.match(row["a"])
  index = ord(match.group(1)) - ord("A") if match else -1
  if not 0 <= index < len(options) or options[index] != match.group(2):
    raise ValueError(f"multiple-choice row: answer {row['a']!r} is not one of the options "
                     f"{option_lines}")
  previous = None
  if head != mqa.QUESTION:
    prior = re.fullmatch(r"Earlier the person was (.+), then (.+)\. " + re.escape(mqa.QUESTION),
                         head)
    if not prior:
      raise ValueError(f"multiple-choice row: first line {head!r} is neither the question "
                       f"nor the prior-action sentence and the question")
    previous = [prior.group(1), prior.group(2)]
  return options, index, previous


@families.visit_renderer(mqa.TASK)
def render_mqa(row: dict, rng: np.random.Generator) -> dict:
  """The row as shown at one visit: options in a fresh uniform order (the answer's letter
  follows the ground truth), a stored prior sentence kept with probability PRIOR_PROB."""
  options, index, previous = parse_row(row)
  order = rng.permutation(len(options))
  shown = [options[i] for i in order]
  if previous is not None and rng.random() >= PRIOR_PROB:
    previous = None
  fresh = mqa.mqa_qa(shown, int(np.flatnonzero(order == index)[0]), previous)
  return dict(row, q=fresh["q"], a=fresh["a"])


@vocabulary.register
def texts() -> list[str]:
  """The texts these families write beyond mqa.texts' templates: the temporal answers
  and durations of held clips up to 32 frames (multiples of 0.25 s; words mqa.texts
  already holds, so the vocabulary does not change)."""
  times = [synthetic.FRAME_SECONDS * i for i in range(32)]
  return [f"{a:.2f}, {b:.2f}" for a in times for b in times if a < b]
