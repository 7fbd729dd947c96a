"""HACA (hallucination correction) rows: entailment questions, corrections and masking.

Prompts and answers as the paper states them (docs/design.md "HACA"):
  entailment question  "Does this caption accurately describe the video? Caption: {W}"
  HACA answers         "Yes, the caption accurately describes the video." (W true)
                       "No. This caption shall be corrected as: {Ŵ}" (W a contrast caption)
  entailment baseline  "Yes" / "No"
  masking              "Please correct this caption to accurately describe the video.
                       Caption: {W̄}" -> Ŵ, where W̄ is Ŵ with content words masked.

Masking replaces k = max(1, round-half-up(rate * n)) of the n content words (rate 0.45),
drawn uniformly without replacement, each by its own ``[MASK]``. A content word is one
whose part of speech is not AUX, SYM, DET or PUNCT; the tagger is a closed-class word
list (exact on the synthetic vocabulary), or spaCy through ``spacy_tagger`` when the user
has installed it and a model (never required, never downloaded).

Synthetic contrast captions (``contrasts``): "action" swaps the action for the scene's
typical one (the hallucination label), "scene" swaps the scene for the action's typical
one, "person" adds a person to an empty scene (doing the scene's typical action).

Training families (data.train_tasks, families.py), per training clip:
  entailment  a positive and a negative row answered "Yes" / "No"
  haca        a positive and a negative row with the HACA answers
  haca_mask   the haca rows plus one masking row (1:1:1); the masking row is stored
              unmasked and masked afresh at every visit (a visit renderer)
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import NO, YES, families, qa, unscene_binary, vocabulary

MASK = "[MASK]"
MASK_RATE = 0.45
QUESTION = "Does this caption accurately describe the video? Caption: {caption}"
YES_ANSWER = "Yes, the caption accurately describes the video."
NO_ANSWER = "No. This caption shall be corrected as: {caption}"
MASK_QUESTION = ("Please correct this caption to accurately describe the video. "
                 "Caption: {caption}")

# Row tasks (the QA dicts' ``task``).
ENTAILMENT, HACA, HACA_MASK = "entailment", "haca", "haca_mask"
FAMILIES = (ENTAILMENT, HACA, HACA_MASK)
# Evaluation rows: a caption and its gold "Yes"/"No" (``aspect`` = contrast type).
PAIR = "haca_pair"
RETRIEVAL = "retrieval_label"
CONTRAST_TYPES = ("action", "scene", "person")

# Closed-class words by part of speech (the tagger's list): determiners, auxiliaries.
DETERMINERS = frozenset(
    "a an the this that these those some any no every each either neither all both "
    "another such what which whatever whichever my your his her its our their".split())
AUXILIARIES = frozenset(
    "am is are was were be been being do does did have has had having will would shall "
    "should can could may might must 's 're 've 'm 'd 'll".split())
_SYMBOL = re.compile(r"^[$%&*+<=>@#^~|\\/`]+$")
_PUNCT = re.compile(r"^[^\w\s]+$")
# A word, a contraction clitic, or one punctuation/symbol character.
_WORDS = re.compile(r"\[MASK\]|\w+|'\w+|[^\w\s]")


# ------------------------------------------------------------------------------ captions

def caption(action: str, scene: str) -> str:
  """What the clip shows: "A person is {action} {phrase}." or "There is no one {phrase}."."""
  phrase = synthetic.SCENE_PHRASES[scene]
  return f"A person is {action} {phrase}." if action else f"There is no one {phrase}."


def action_query(action: str) -> str:
  """A retrieval query naming only the action: "A person is {action}."."""
  return f"A person is {action}."


def contrasts(action: str, scene: str, rng: np.random.Generator) -> list[tuple[str, str]]:
  """(contrast type, caption that does not describe the clip) for every type that applies:
  action and scene swaps for clips with an actor (the hallucination labels of
  unscene_binary.hallucination_labels), a person added and a scene swap for empty
  scenes."""
  wrong_action, wrong_scene = unscene_binary.hallucination_labels(action, scene, rng)
  if not action:
    return [("person", caption(synthetic.TYPICAL_ACTION[scene], scene)),
            ("scene", caption("", wrong_scene))]
  return [("action", caption(wrong_action, scene)), ("scene", caption(action, wrong_scene))]


def entailment_question(text: str) -> str:
  return QUESTION.format(caption=text)


def correction_answer(text: str) -> str:
  return NO_ANSWER.format(caption=text)


def mask_question(text: str) -> str:
  return MASK_QUESTION.format(caption=text)


def pair_rows(positive: str, negative: str, family: str, contrast_type: str = "",
              with_mask: bool = False) -> list[dict]:
  """The rows a (true caption, contrast caption) pair trains with: positive, negative and,
  with ``with_mask``, one masking row stored unmasked (``render_mask_row`` masks it)."""
  if family not in FAMILIES:
    raise ValueError(f"HACA family must be one of {FAMILIES}, found {family!r}")
  if family == ENTAILMENT:
    yes, no = YES, NO
  else:
    yes, no = YES_ANSWER, correction_answer(positive)
  task = ENTAILMENT if family == ENTAILMENT else HACA
  rows = [qa(entailment_question(positive), yes, task=task),
          qa(entailment_question(negative), no, task=task, aspect=contrast_type)]
  if with_mask or family == HACA_MASK:
    rows.append(qa(mask_question(positive), positive, task=HACA_MASK))
  return rows


# ------------------------------------------------------------------------------ masking

def split_words(text: str) -> list[str]:
  """Words, contraction clitics, punctuation and ``[MASK]`` tokens of ``text``, in order."""
  return _WORDS.findall(text)


def word_list_pos(word: str) -> str:
  """"DET" | "AUX" | "SYM" | "PUNCT" from the closed-class lists, else "CONTENT"."""
  lower = word.lower()
  if lower in DETERMINERS:
    return "DET"
  if lower in AUXILIARIES:
    return "AUX"
  if _SYMBOL.match(word):
    return "SYM"
  if _PUNCT.match(word):
    return "PUNCT"
  return "CONTENT"


NON_CONTENT = ("AUX", "SYM", "DET", "PUNCT")


def content_word_positions(words: Sequence[str],
                           tagger: Callable[[list[str]], list[str]] | None = None) -> list[int]:
  """Indices of the content words of ``words`` (part of speech not AUX, SYM, DET, PUNCT).

  ``tagger``: words -> one universal POS tag per word (e.g. ``spacy_tagger()``); default
  the closed-class word list (``word_list_pos``). ``[MASK]`` is never a content word.
  """
  words = list(words)
  tags = [word_list_pos(w) for w in words] if tagger is None else list(tagger(words))
  if len(tags) != len(words):
    raise ValueError(f"tagger returned {len(tags)} tags for {len(words)} words")
  return [i for i, (w, t) in enumerate(zip(words, tags)) if t not in NON_CONTENT and w != MASK]


def spacy_tagger(model: str = "en_core_web_sm") -> Callable[[list[str]], list[str]]:
  """A tagger for ``content_word_positions`` from an installed spaCy model (the words are
  tagged as given, no re-tokenisation). ImportError/OSError naming what to install when
  spaCy or the model is absent: nothing is downloaded."""
  try:
    import spacy
    from spacy.tokens import Doc
  except ImportError as e:
    raise ImportError("the spaCy tagger needs spaCy: pip install spacy, then a model, e.g. "
                      "python -m spacy download en_core_web_sm; the default word-list "
                      "tagger needs neither") from e
  try:
    nlp = spacy.load(model)
  except OSError as e:
    raise OSError(f"spaCy model {model!r} is not installed (python -m spacy download "
                  f"{model}); nothing is downloaded at run time") from e

  def tag(words: list[str]) -> list[str]:
    doc = Doc(nlp.vocab, words=list(words))
    for _, proc in nlp.pipeline:
      doc = proc(doc)
    return [t.pos_ for t in doc]
  return tag


def round_half_up(x: float) -> int:
  """Nearest integer, halves up (4.5 -> 5), tolerant of float noise (0.45 * 10)."""
  return int(math.floor(x + 0.5 + 1e-9))


def num_masked(n: int, rate: float = MASK_RATE) -> int:
  """k = max(1, round-half-up(rate * n)) of n >= 1 content words (0 when n = 0)."""
  return 0 if n == 0 else min(n, max(1, round_half_up(rate * n)))


def mask_caption(text: str, rate: float, rng: np.random.Generator, mask_token: str = MASK,
                 tagger=None) -> str:
  """``text`` with k = max(1, round-half-up(rate * n)) of its n content words, drawn
  uniformly without replacement, each replaced by ``mask_token``; everything else
  (spacing, punctuation, other words) is kept. Unchanged when there is no content word."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"masking rate must be in [0, 1], found {rate}")
  spans = [m.span() for m in _WORDS.finditer(text)]
  words = [text[a:b] for a, b in spans]
  positions = content_word_positions(words, tagger)
  chosen = set(rng.choice(positions, num_masked(len(positions), rate), replace=False).tolist()
               ) if positions else set()
  out, last = [], 0
  for i, (a, b) in enumerate(spans):
    if i in chosen:
      out += [text[last:a], mask_token]
      last = b
  return "".join(out) + text[last:]


@families.visit_renderer(HACA_MASK)
def render_mask_row(row: dict, rng: np.random.Generator) -> dict:
  """The stored masking row (question built on the unmasked caption, answer = the caption)
  with the caption masked afresh for this visit."""
  return dict(row, q=mask_question(mask_caption(row["a"], MASK_RATE, rng)))


# ------------------------------------------------------------------------------ families

def clip_rows(spec, rng: np.random.Generator, family: str) -> list[dict]:
  """One positive and one negative row (contrast type drawn uniformly among those that
  apply) for a synthetic clip; plus the masking row for haca_mask."""
  options = contrasts(spec.action, spec.scene, rng)
  kind, negative = options[int(rng.integers(len(options)))]
  return pair_rows(caption(spec.action, spec.scene), negative, family, kind)


@families.train_family(ENTAILMENT)
def entailment_rows(spec, rng, ctx):
  del ctx
  return clip_rows(spec, rng, ENTAILMENT)


@families.train_family(HACA)
def haca_rows(spec, rng, ctx):
  del ctx
  return clip_rows(spec, rng, HACA)


@families.train_family(HACA_MASK)
def haca_mask_rows(spec, rng, ctx):
  del ctx
  return clip_rows(spec, rng, HACA_MASK)


def eval_pairs(action: str, scene: str, rng: np.random.Generator) -> list[dict]:
  """Evaluation rows of a synthetic clip: per contrast type, the true caption ("Yes") and
  the contrast caption ("No") sharing ``pair``; ``aspect`` is the contrast type."""
  positive = caption(action, scene)
  rows = []
  for k, (kind, negative) in enumerate(contrasts(action, scene, rng)):
    rows += [qa(positive, YES, task=PAIR, aspect=kind, pair=k),
             qa(negative, NO, task=PAIR, aspect=kind, pair=k)]
  return rows


@vocabulary.register
def texts() -> list[str]:
  """Every string this module can write (prompts built on every synthetic caption)."""
  captions = [caption(a, s) for s in synthetic.SCENES for a in ("",) + synthetic.ACTIONS]
  out = [YES_ANSWER, YES, NO]
  for text in captions + [action_query(a) for a in synthetic.ACTIONS]:
    out += [text, entailment_question(text), correction_answer(text), mask_question(text)]
  return out
