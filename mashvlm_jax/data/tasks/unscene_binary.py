"""UNSCENE binary dual questions (paper Sec. 4.1), for one labelled video.

Unusual-context videos get two duals: action (ground truth -> Yes, the scene's typical
action -> No) and scene (ground truth -> Yes, the action's typical scene -> No). Scene-only
videos get one: the scene's typical action -> No, "only <scene>, no one in it" -> Yes.
Typical videos (our extra control split) get the same two duals as unusual ones, with a
random other label as the "No" side since the typical label is the ground truth there.
A dual scores only when both of its questions are answered correctly (Sec. 4.2).
"""
from __future__ import annotations

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import NO, YES, action_question, qa, scene_only_question
from mashvlm_jax.data.tasks import scene_question, vocabulary

TASK = "unscene_binary"


def other_label(labels, exclude, rng):
  """A label of ``labels`` other than ``exclude``, uniformly."""
  choices = [x for x in labels if x != exclude]
  return choices[int(rng.integers(len(choices)))]


def hallucination_labels(action: str, scene: str, rng: np.random.Generator) -> tuple[str, str]:
  """(wrong action, wrong scene) most likely to be hallucinated for this pair.

  The scene's typical action and the action's typical scene; where that is the ground
  truth itself (typical pairs), a random other label.
  """
  wrong_action = synthetic.TYPICAL_ACTION[scene]
  if wrong_action == action:
    wrong_action = other_label(synthetic.ACTIONS, action, rng)
  wrong_scene = synthetic.TYPICAL_SCENE[action] if action else scene
  if wrong_scene == scene:
    wrong_scene = other_label(synthetic.SCENES, scene, rng)
  return wrong_action, wrong_scene


def questions(action: str, scene: str, rng: np.random.Generator) -> list[dict]:
  """The video's binary QAs (dual id in ``pair``); ``action`` is "" for scene-only."""
  phrase = synthetic.SCENE_PHRASES
  if not action:
    typical = synthetic.TYPICAL_ACTION[scene]
    return [qa(action_question(typical), NO, task=TASK, aspect="action", pair=0),
            qa(scene_only_question(scene), YES, task=TASK, aspect="action", pair=0)]
  wrong_action, wrong_scene = hallucination_labels(action, scene, rng)
  return [qa(action_question(action), YES, task=TASK, aspect="action", pair=0),
          qa(action_question(wrong_action), NO, task=TASK, aspect="action", pair=0),
          qa(scene_question(phrase[scene]), YES, task=TASK, aspect="scene", pair=1),
          qa(scene_question(phrase[wrong_scene]), NO, task=TASK, aspect="scene", pair=1)]


@vocabulary.register
def texts() -> list[str]:
  """Every string this module can emit (for the word-level vocabulary)."""
  out = [YES, NO]
  out += [action_question(action) for action in synthetic.ACTIONS]
  for scene in synthetic.SCENES:
    out += [scene_question(synthetic.SCENE_PHRASES[scene]), scene_only_question(scene)]
  return out
