"""Video captioning for stage-1 (projector alignment) pretraining on (video, caption)
pairs, e.g. WebVid: the stored row asks the first prompt and answers with the caption; at
every visit the prompt is drawn afresh from ``PROMPTS`` (a visit renderer), so the
projector is not tied to one wording.
"""
from __future__ import annotations

import numpy as np

from mashvlm_jax.data.tasks import families, qa, vocabulary

TASK = "caption_pretrain"  # not train_mix's "caption" rows, which keep their prompt
PROMPTS = ("Describe this video briefly.",
           "Write a short caption for this video.",
           "What is happening in this video? Answer in one sentence.",
           "Summarize the video in a few words.")


def questions(caption: str) -> list[dict]:
  """One QA row: the first prompt, the caption (stripped) as the answer. ValueError when
  the caption is empty."""
  caption = str(caption).strip()
  if not caption:
    raise ValueError("the caption is empty")
  return [qa(PROMPTS[0], caption, task=TASK)]


@families.visit_renderer(TASK)
def render(row: dict, rng: np.random.Generator) -> dict:
  """The row with this visit's prompt (uniform over PROMPTS)."""
  row["q"] = PROMPTS[int(rng.integers(len(PROMPTS)))]
  return row


@vocabulary.register
def texts() -> list[str]:
  """The prompts (captions themselves come only from users' annotations)."""
  return list(PROMPTS)
