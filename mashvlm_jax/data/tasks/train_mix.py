"""The training mixture for one synthetic clip: captions, action/scene questions and
yes/no questions whose "No" side is a hallucination negative.

Per clip with an actor (8 QAs): a caption, "What is the person doing?", "Where does this
video take place?", action Yes/No (ground truth vs the scene's typical action), scene
Yes/No (ground truth vs the action's typical scene) and "only <scene>, no one in it?" ->
No. Per scene-only clip (5 QAs): a caption, "What is the person doing?" -> no one is
there, the scene question, the scene's typical action -> No, "only <scene>?" -> Yes.
The pipeline samples one QA per visit (``data.qa_mode="sample"``).

``negatives`` picks the labels of the "No" questions. "typical" (the default, as the
UNSCENE test duals): the hallucination candidates above. In every regime they teach a rule
that needs no motion: "is the person <the scene's typical action>?" is No whenever the
clip is not typical. "uniform": a uniformly drawn other action and scene, so the Yes/No
questions can only be answered by reading the action and the scene.
"""
from __future__ import annotations

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import NO, YES, action_question, open_ended, qa
from mashvlm_jax.data.tasks import scene_only_question, scene_question, unscene_binary
from mashvlm_jax.data.tasks import vocabulary

WHAT = "What is the person doing?"
WHERE = "Where does this video take place?"
NOBODY = "No one is in the video."


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:] + "."


NEGATIVES = ("typical", "uniform")


def questions(action: str, scene: str, rng: np.random.Generator,
              negatives: str = "typical") -> list[dict]:
  if negatives not in NEGATIVES:
    raise ValueError(f"training negatives must be one of {NEGATIVES}, found {negatives!r}")
  phrase = synthetic.SCENE_PHRASES[scene]
  out = [qa(open_ended.QUESTION, open_ended.describe(action, scene, rng), task="caption"),
         qa(WHAT, _sentence(action) if action else NOBODY, task="action", aspect="action"),
         qa(WHERE, _sentence(phrase), task="scene", aspect="scene")]
  if not action:
    absent = (synthetic.TYPICAL_ACTION[scene] if negatives == "typical"
              else synthetic.ACTIONS[int(rng.integers(len(synthetic.ACTIONS)))])
    return out + [qa(action_question(absent), NO, task="yes_no", aspect="action"),
                  qa(scene_only_question(scene), YES, task="yes_no", aspect="action")]
  if negatives == "typical":
    wrong_action, wrong_scene = unscene_binary.hallucination_labels(action, scene, rng)
  else:
    wrong_action = unscene_binary.other_label(synthetic.ACTIONS, action, rng)
    wrong_scene = unscene_binary.other_label(synthetic.SCENES, scene, rng)
  return out + [
      qa(action_question(action), YES, task="yes_no", aspect="action"),
      qa(action_question(wrong_action), NO, task="yes_no", aspect="action"),
      qa(scene_question(phrase), YES, task="yes_no", aspect="scene"),
      qa(scene_question(synthetic.SCENE_PHRASES[wrong_scene]), NO, task="yes_no",
         aspect="scene"),
      qa(scene_only_question(scene), NO, task="yes_no", aspect="action")]


@vocabulary.register
def texts() -> list[str]:
  """Every string this module can emit (for the word-level vocabulary)."""
  out = [WHAT, WHERE, NOBODY, YES, NO]
  for scene in synthetic.SCENES:
    out += [_sentence(synthetic.SCENE_PHRASES[scene]), scene_only_question(scene),
            scene_question(synthetic.SCENE_PHRASES[scene])]
  for action in synthetic.ACTIONS:
    out += [_sentence(action), action_question(action)]
  return out + open_ended.texts()
