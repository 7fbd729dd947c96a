"""Question/answer formats, one module each; every one returns a list of QA dicts.

A QA dict has the fields of the stored ``qa`` feature (builders.FEATURES):
  i: instruction (system-level text; "" for none), q: question, a: answer,
  task: the format's name, aspect: "action" | "scene" | "" (what the question probes),
  pair: dual-question group id within the video (-1 when the question is not in a pair).

Every module here registers the texts it can write into the synthetic set
(``@vocabulary.register``, vocabulary.py); their union is the synthetic word vocabulary,
so a new task adds its words in one place.
"""
from __future__ import annotations

YES, NO = "Yes", "No"


def qa(q: str, a: str, *, task: str, aspect: str = "", pair: int = -1, i: str = "") -> dict:
  """One question-answer record with every stored field present."""
  return {"i": i, "q": q, "a": a, "task": task, "aspect": aspect, "pair": int(pair)}


def action_question(action: str) -> str:
  return f"Is the person {action}?"


def scene_question(scene_phrase: str) -> str:
  return f"Does this video take place {scene_phrase}?"


def scene_only_question(scene: str) -> str:
  article = "an" if scene[0] in "aeiou" else "a"
  return f"Is there only {article} {scene}, with no one in it?"
