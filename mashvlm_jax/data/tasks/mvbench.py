"""MVBench multiple choice (one JSON per task: video, question, candidates, answer).

The question lists the candidates as "(A) ...", the answer is "(X) <answer text>", and the
instruction asks for the best option, the usual MVBench prompt.
"""
from __future__ import annotations

from mashvlm_jax.data.tasks import qa, vocabulary

TASK = "mvbench"
INSTRUCTION = ("Carefully watch the video and pay attention to the cause and sequence of "
               "events, the detail and movement of objects, and the action and pose of "
               "persons. Based on your observations, select the best option that accurately "
               "addresses the question.")


MAX_OPTIONS = 26  # lettered (A) .. (Z)


def option_letter(index: int) -> str:
  """"A" for 0 ... "Z" for 25; ValueError outside."""
  if not 0 <= index < MAX_OPTIONS:
    raise ValueError(f"option index {index} has no letter: at most {MAX_OPTIONS} options "
                     f"(A-Z)")
  return chr(ord("A") + index)


def questions(question: str, candidates: list[str], answer: str) -> list[dict]:
  """One QA; raises ValueError when ``answer`` is not among ``candidates``."""
  if len(candidates) > MAX_OPTIONS:
    raise ValueError(f"{len(candidates)} candidates: at most {MAX_OPTIONS} can be lettered "
                     f"(A-Z)")
  if answer not in candidates:
    raise ValueError(f"answer {answer!r} is not one of the candidates {candidates!r}")
  lines = [f"Question: {question}", "Options:"]
  lines += [f"({option_letter(k)}) {c}" for k, c in enumerate(candidates)]
  target = f"({option_letter(candidates.index(answer))}) {answer}"
  return [qa("\n".join(lines), target, task=TASK, i=INSTRUCTION)]


@vocabulary.register
def texts() -> list[str]:
  """None: MVBench questions come only from users' annotations (local_video_qa), which
  take the model's own tokenizer (registry.load_tokenizer refuses the word tokenizer
  there), so they add nothing to the synthetic vocabulary."""
  return []
