"""Open-ended "Describe the video in detail." with template answers (paper Sec. 4.1).

The answer names the action and the scene; scene-only videos say no one is in them
(the paper scores those with the label "no action").
"""
from __future__ import annotations

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import qa, vocabulary

TASK = "open_ended"
QUESTION = "Describe the video in detail."
ACTOR_TEMPLATES = ("A person is {action} {phrase}.",
                   "The video shows a person {action} {phrase}.")
EMPTY_TEMPLATES = ("The video shows an empty {scene}. No one is in the video.",
                   "There is no one in the video, only an empty {scene}.")


def describe(action: str, scene: str, rng: np.random.Generator | None = None) -> str:
  """Template caption; the first template when ``rng`` is None, else a random one."""
  templates = ACTOR_TEMPLATES if action else EMPTY_TEMPLATES
  k = 0 if rng is None else int(rng.integers(len(templates)))
  return templates[k].format(action=action, scene=scene,
                             phrase=synthetic.SCENE_PHRASES[scene])


def questions(action: str, scene: str, rng: np.random.Generator | None = None) -> list[dict]:
  return [qa(QUESTION, describe(action, scene, rng), task=TASK,
             aspect="action" if not action else "")]


@vocabulary.register
def texts() -> list[str]:
  """Every string this module can emit (for the word-level vocabulary)."""
  out = [QUESTION]
  for scene in synthetic.SCENES:
    out += [t.format(scene=scene) for t in EMPTY_TEMPLATES]
    for action in synthetic.ACTIONS:
      out += [t.format(action=action, phrase=synthetic.SCENE_PHRASES[scene])
              for t in ACTOR_TEMPLATES]
  return out
