"""LLaVAction's multiple-choice action QA (MQA), temporal detection and prior-action
prompts (issue 18; paper: LLaVAction, Sec. 3.1-3.2 and Appendix 9).

Labels of the synthetic set: verb = action (8, synthetic.ACTIONS), noun = scene (8,
synthetic.SCENES), action class = the (verb, scene) pair, id ``verb * 8 + noun`` (64,
verb-major: 0 = skiing on a snowy mountain, 1 = skiing in a boxing ring, ..., 63 = falling
on an ice rink), narration "running on a beach". Scene-only clips have no action label
and no multiple-choice row.

Options (K = 5): ``mqa_options`` takes a recognizer's ranked classes (the top K if they
hold the ground truth, else the top K-1 plus the ground truth), ``random_options`` K-1
uniform other classes, ``pool_options`` K-1 uniform draws from the recognizer's top 2K.
The caller shuffles them at every visit (``shuffled``). The question lists the lettered
options one per line; the answer is the letter and the narration, "(C) running on a beach".

Temporal detection: ``temporal_window`` widens the action [start, end] by ``delta``
seconds split by ``rho`` (start - rho*delta, end + (1-rho)*delta, clamped at 0); the
answer is the action's start and end relative to the window, "1.50, 4.46".

Word tokenizer: lower-cased, split into runs of word characters and runs of punctuation
(tokenizer.split_words), so "(C)" is the three words "(", "c", ")" and "1.50," is "1",
".", "50", ",". Letters, numbers 0..MAX_SECONDS and every two-digit fraction are
registered (``texts``), so every text this module writes tokenizes without <unk>.
"""
from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import qa, vocabulary
from mashvlm_jax.data.tasks.mvbench import option_letter

TASK = "mqa"
TEMPORAL_TASK = "temporal_detection"
K = 5  # options per question (the paper's benchmark)
VERBS = synthetic.ACTIONS
NOUNS = synthetic.SCENES
NUM_CLASSES = len(VERBS) * len(NOUNS)
# Largest whole number of seconds a temporal prompt or answer can write (the numbers
# 0..MAX_SECONDS are words of the synthetic vocabulary).
MAX_SECONDS = 99

QUESTION = "What is the person doing? Choose one option."
PRIOR = "Earlier the person was {first}, then {second}."
TEMPORAL_QUESTION = ("The person is {narration} for {duration} seconds of this video. "
                     "When does it start and end, in seconds?")


# ------------------------------------------------------------------------------ labels

def action_class(action: str, scene: str) -> int | None:
  """The action class id ``verb * 8 + noun`` of a synthetic clip; None for a scene-only
  clip (action ""). ValueError naming an unknown action or scene."""
  if scene not in NOUNS:
    raise ValueError(f"unknown synthetic scene {scene!r}; known: {NOUNS}")
  if not action:
    return None
  if action not in VERBS:
    raise ValueError(f"unknown synthetic action {action!r}; known: {VERBS}")
  return VERBS.index(action) * len(NOUNS) + NOUNS.index(scene)


def clip_labels(action: str, scene: str) -> tuple[int, int, int] | None:
  """(verb id, noun id, action class id) of a synthetic clip; None for a scene-only clip
  (no action label, no multiple-choice row)."""
  cls = action_class(action, scene)
  if cls is None:
    return None
  return cls // len(NOUNS), cls % len(NOUNS), cls


def _class_id(cls) -> int:
  if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
    raise TypeError(f"an action class id must be an integer, found {cls!r}")
  if not 0 <= cls < NUM_CLASSES:
    raise ValueError(f"action class id {cls} is outside [0, {NUM_CLASSES})")
  return int(cls)


def class_labels(cls: int) -> tuple[str, str]:
  """(action, scene) of an action class id in [0, 64)."""
  cls = _class_id(cls)
  return VERBS[cls // len(NOUNS)], NOUNS[cls % len(NOUNS)]


def narration(cls: int) -> str:
  """The class's narration: "running on a beach"."""
  action, scene = class_labels(cls)
  return f"{action} {synthetic.SCENE_PHRASES[scene]}"


NARRATIONS = tuple(narration(c) for c in range(NUM_CLASSES))


# ------------------------------------------------------------------------------ options

def _distinct(name: str, classes: Sequence[Hashable]) -> list:
  """``classes`` as a list; ValueError naming a class it holds twice."""
  classes = list(classes)
  seen = set()
  for position, c in enumerate(classes):
    if c in seen:
      raise ValueError(f"{name} holds class {c!r} twice (again at position {position})")
    seen.add(c)
  return classes


def _check_gt(gt) -> None:
  if gt is None:
    raise ValueError("the ground truth class is None: a scene-only clip has no action "
                     "label and no multiple-choice row")


def mqa_options(gt: Hashable, ranked: Sequence[Hashable], k: int = K) -> list:
  """The recognizer options of one clip: ``ranked[:k]`` when it holds ``gt``, else
  ``ranked[:k-1] + [gt]`` (rank order, gt last). ValueError when ``ranked`` holds a class
  twice or fewer than ``k`` classes."""
  _check_gt(gt)
  ranked = _distinct("ranked", ranked)
  if k < 2:
    raise ValueError(f"multiple choice needs k >= 2 options, found k={k}")
  if len(ranked) < k:
    raise ValueError(f"ranked holds {len(ranked)} classes, fewer than k={k}")
  top = ranked[:k]
  return top if gt in top else top[:k - 1] + [gt]


def random_options(gt: Hashable, classes: Sequence[Hashable], k: int,
                   rng: np.random.Generator) -> list:
  """[gt] + k-1 distinct classes of ``classes`` other than gt, drawn uniformly."""
  _check_gt(gt)
  classes = _distinct("classes", classes)
  others = [c for c in classes if c != gt]
  if len(others) < k - 1:
    raise ValueError(f"classes holds {len(others)} classes other than the ground truth "
                     f"{gt!r}, fewer than k-1={k - 1}")
  return [gt] + [others[i] for i in rng.choice(len(others), k - 1, replace=False)]


def pool_options(gt: Hashable, ranked: Sequence[Hashable], k: int,
                 rng: np.random.Generator) -> list:
  """[gt] + k-1 distinct classes drawn uniformly from ``ranked[:2k]`` minus gt (the
  allowed training variant). ValueError when ``ranked`` has fewer than 2k classes."""
  ranked = _distinct("ranked", ranked)
  if len(ranked) < 2 * k:
    raise ValueError(f"ranked holds {len(ranked)} classes, fewer than 2k={2 * k}")
  return random_options(gt, ranked[:2 * k], k, rng)


def shuffled(options: Sequence[Hashable], gt: Hashable,
             rng: np.random.Generator) -> tuple[list, int]:
  """(options in a uniformly random order, index of gt in it); gt must occur once."""
  options = _distinct("options", options)
  if gt not in options:
    raise ValueError(f"the ground truth {gt!r} is not among the options {options!r}")
  order = [options[i] for i in rng.permutation(len(options))]
  return order, order.index(gt)


# ------------------------------------------------------------------------------ texts

def _lines(options: Sequence[str]) -> list[str]:
  if not options:
    raise ValueError("a multiple-choice question needs options, found none")
  if len(options) > 26:
    raise ValueError(f"at most 26 lettered options, found {len(options)}")
  return [f"({option_letter(i)}) {text}" for i, text in enumerate(options)]


def question(options: Sequence[str], previous: Sequence[str] | None = None) -> str:
  """The multiple-choice question over option narrations, one lettered option a line;
  with ``previous`` = (the action two clips back, the one just before) the prior-action
  sentence comes first. The synthetic vocabulary holds the letters of K = 5 options."""
  head = [QUESTION]
  if previous is not None:
    head = [prior_sentence(previous), QUESTION]
  return "\n".join([" ".join(head)] + _lines(options))


def prior_sentence(previous: Sequence[str]) -> str:
  """"Earlier the person was <two back>, then <one back>." (ValueError unless two
  non-empty narrations)."""
  previous = list(previous)
  if len(previous) != 2 or not all(isinstance(p, str) and p.strip() for p in previous):
    raise ValueError(f"the prior-action prompt needs the two previous narrations, found "
                     f"{previous!r}")
  return PRIOR.format(first=previous[0], second=previous[1])


def answer(options: Sequence[str], index: int) -> str:
  """"(C) running on a beach": the letter and narration of option ``index``."""
  lines = _lines(options)
  if not 0 <= index < len(lines):
    raise ValueError(f"answer index {index} is outside the {len(lines)} options")
  return lines[index]


def mqa_qa(options: Sequence[str], index: int, previous: Sequence[str] | None = None) -> dict:
  """The QA dict (tasks.qa) of one multiple-choice row: options already shuffled, the
  ground truth at ``index``."""
  return qa(question(options, previous), answer(options, index), task=TASK, aspect="action")


_LETTER = re.compile(r"\(\s*([A-Za-z])\s*\)")


def answer_index(text: str, options: Sequence[str]) -> int | None:
  """The option a generated answer picks: its first "(X)" letter (spacing as the word
  tokenizer decodes it, "( c )", is accepted), else an option narration it equals
  (case and surrounding space ignored); None when it names no option."""
  match = _LETTER.search(text)
  if match:
    index = ord(match.group(1).upper()) - ord("A")
    return index if index < len(options) else None
  said = " ".join(text.lower().split())
  for i, option in enumerate(options):
    if said == " ".join(option.lower().split()):
      return i
  return None


# ------------------------------------------------------------------------------ temporal

def seconds_text(value: float) -> str:
  """Seconds with two decimals, "1.50" (ValueError below 0 or above MAX_SECONDS, the
  numbers the synthetic vocabulary holds)."""
  text = f"{value:.2f}"
  if value < 0 or float(text) >= MAX_SECONDS + 1:
    raise ValueError(f"{value} seconds is outside [0, {MAX_SECONDS + 1}) that temporal "
                     f"texts can write")
  return text


def temporal_window(start: float, end: float, delta: float, rho: float,
                    clip_end: float | None = None) -> tuple[float, float, str]:
  """(window start, window end, answer) in seconds for an action over [start, end].

  The window is [start - rho*delta, end + (1 - rho)*delta], its start clamped at 0 (and its
  end at ``clip_end`` when given); the answer is the action's start and end relative to
  the window start, two decimals each: "1.50, 4.46".
  """
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], found {rho}")
  if not delta >= 0:
    raise ValueError(f"delta must be >= 0 seconds, found {delta}")
  if not 0.0 <= start <= end:
    raise ValueError(f"the action must satisfy 0 <= start <= end, found start={start}, "
                     f"end={end}")
  if clip_end is not None and clip_end < end:
    raise ValueError(f"the action ends at {end} s, after the clip's end {clip_end} s")
  window_start = max(0.0, start - rho * delta)
  window_end = end + (1.0 - rho) * delta
  if clip_end is not None:
    window_end = min(window_end, clip_end)
  text = f"{seconds_text(start - window_start)}, {seconds_text(end - window_start)}"
  return window_start, window_end, text


def temporal_question(narration_text: str, duration: float) -> str:
  """"The person is running on a beach for 2.96 seconds of this video. When does it start
  and end, in seconds?" (the paper's prompt, Appendix 9.3, in the synthetic words)."""
  return TEMPORAL_QUESTION.format(narration=narration_text, duration=seconds_text(duration))


def temporal_qa(narration_text: str, start: float, end: float, delta: float,
                rho: float, clip_end: float | None = None) -> tuple[float, float, dict]:
  """(window start, window end, QA dict) of one temporal-detection row."""
  window_start, window_end, text = temporal_window(start, end, delta, rho, clip_end)
  return window_start, window_end, qa(temporal_question(narration_text, end - start), text,
                                      task=TEMPORAL_TASK, aspect="action")


# ------------------------------------------------------------------------------ vocabulary

@vocabulary.register
def texts() -> list[str]:
  """Strings whose words cover every text this module can write (the texts themselves are
  combinatorial: 64 narrations in 5 shuffled slots): each lettered option line, the
  question, the prior-action and temporal prompts for every narration, and every number
  "i.ii" for i in 0..MAX_SECONDS (whole seconds and two-digit fractions)."""
  letters = range(K)
  out = [QUESTION]
  for text in NARRATIONS:
    out += [f"({option_letter(i)}) {text}" for i in letters]
    out += [PRIOR.format(first=text, second=text), temporal_question(text, 1.5)]
  out += [f"{i}.{i:02d}, {i}.{i:02d}" for i in range(MAX_SECONDS + 1)]
  return out
