"""The synthetic UNSCENE generator: determinism, class balance, typical share, scene-only
clips without an actor, actions visible only in motion, and the question formats."""
import collections

import numpy as np
import pytest

from mashvlm_jax.data import builders, synthetic
from mashvlm_jax.data import tasks
from mashvlm_jax.data.tasks import open_ended, train_mix, unscene_binary

# Independent statement of the intended pairing (the generator's own table is not used).
TYPICAL = {"skiing": "snowy mountain", "boxing": "boxing ring", "jumping": "basketball court",
           "swimming": "swimming pool", "running": "beach", "climbing": "forest",
           "walking": "library", "falling": "ice rink"}


def test_classes_and_typical_pairs():
  assert len(set(synthetic.ACTIONS)) >= 8 and len(set(synthetic.SCENES)) >= 8
  for action, scene in TYPICAL.items():
    assert synthetic.kind_of(action, scene) == "typical"
    assert synthetic.kind_of(action, "library" if scene != "library" else "beach") == "unusual"
  assert synthetic.kind_of("", "beach") == "scene_only"


def test_specs_and_frames_are_deterministic():
  a = synthetic.clip_specs("train", 200, seed=3)
  assert a == synthetic.clip_specs("train", 200, seed=3)
  assert [s.scene for s in a] != [s.scene for s in synthetic.clip_specs("train", 200, seed=4)]
  for spec in a[:: 50]:
    first = synthetic.render_clip(spec, 6, 40, 48)
    assert first.dtype == np.uint8 and first.shape == (6, 40, 48, 3)
    np.testing.assert_array_equal(first, synthetic.render_clip(spec, 6, 40, 48))
  other = synthetic.clip_specs("train", 200, seed=4)[50]
  assert not np.array_equal(synthetic.render_clip(a[50], 6, 40, 48),
                            synthetic.render_clip(other, 6, 40, 48))


@pytest.mark.parametrize("split,size", [("train", 203), ("test_typical", 37),
                                        ("test_unusual", 117), ("test_scene_only", 21)])
def test_class_balance_per_split(split, size):
  specs = synthetic.clip_specs(split, size, seed=0, scene_only_share=0.1)
  assert len(specs) == size and len({s.id for s in specs}) == size
  acting = [s for s in specs if s.action]
  empty = [s for s in specs if not s.action]
  for group, key in ((acting, "action"), (empty, "scene")):
    if group:
      counts = collections.Counter(getattr(s, key) for s in group)
      labels = synthetic.ACTIONS if key == "action" else synthetic.SCENES
      assert max(counts[x] for x in labels) - min(counts[x] for x in labels) <= 1, counts
  if split == "test_typical":
    assert all(TYPICAL[s.action] == s.scene and s.kind == "typical" for s in specs)
  if split == "test_unusual":
    assert all(TYPICAL[s.action] != s.scene and s.kind == "unusual" for s in specs)
    pairs = collections.Counter((s.action, s.scene) for s in specs)
    assert len(pairs) == 56 and max(pairs.values()) - min(pairs.values()) <= 1
  if split == "test_scene_only":
    assert not acting and all(s.kind == "scene_only" for s in specs)
  if split == "train":
    assert len(empty) == round(0.1 * size)


def test_typical_share_in_train():
  specs = [s for s in synthetic.clip_specs("train", 4000, seed=0, typical_prob=0.9,
                                           scene_only_share=0.05) if s.action]
  share = np.mean([TYPICAL[s.action] == s.scene for s in specs])
  sigma = np.sqrt(0.9 * 0.1 / len(specs))
  assert abs(share - 0.9) < 4 * sigma, share
  atypical = collections.Counter(s.scene for s in specs if TYPICAL[s.action] != s.scene)
  assert len(atypical) == 8  # every scene also appears in an atypical pair
  all_typical = synthetic.clip_specs("train", 100, typical_prob=1.0, scene_only_share=0.0)
  assert all(s.kind == "typical" for s in all_typical)


def _actor_mask(spec, frames=8, size=64):
  """Pixels that differ from the same clip rendered without the actor."""
  clip = synthetic.render_clip(spec, frames, size, size).astype(int)
  empty = synthetic.ClipSpec(spec.split, spec.index, "", spec.scene, "scene_only", spec.seed)
  background = synthetic.render_clip(empty, frames, size, size).astype(int)
  return np.abs(clip - background).sum(-1) > 0


def test_scene_only_clips_have_no_actor():
  for spec in synthetic.clip_specs("test_scene_only", 16):
    clip = synthetic.render_clip(spec, 8, 64, 64)
    assert spec.action == ""
    assert (clip == clip[:1]).all(), "a scene-only clip must be static: nothing moves"
  for spec in synthetic.clip_specs("test_typical", 8):
    clip = synthetic.render_clip(spec, 8, 64, 64)
    assert not (clip == clip[:1]).all(), f"{spec.action}: the actor must move"


def _centroids(spec):
  mask = _actor_mask(spec)
  ys, xs = np.indices(mask.shape[1:])
  return np.array([(xs[m].mean(), ys[m].mean()) for m in mask]) / 64  # [T, (x, y)]


def test_actions_differ_in_motion_not_appearance():
  """The actor's trajectory (centroid from pixels) shows the action; its look does not."""
  motions = {}
  for index in range(3):
    for action in synthetic.ACTIONS:
      spec = synthetic.ClipSpec("train", index, action, "beach", "typical", 0)
      c = _centroids(spec)
      dx, dy = np.diff(c[:, 0]), np.diff(c[:, 1])
      motions[action] = (dx, dy)
      if action == "skiing":
        assert (dy > 0.02).all() and (np.abs(dx) > 0.02).all()
      if action == "climbing":
        assert (dy < -0.02).all() and (np.abs(dx) < 0.01).all()
      if action == "falling":
        assert (dy > 0).all() and dy[-1] > 3 * dy[0]
      if action == "boxing":
        assert (np.sign(dx[1:]) == -np.sign(dx[:-1])).all() and np.abs(dy).max() < 0.01
      if action == "jumping":
        assert np.abs(dx).max() < 0.01 and (dy > 0.02).any() and (dy < -0.02).any()
      if action == "swimming":
        assert np.abs(dx).min() > 0.02 and (dy > 0.02).any() and (dy < -0.02).any()
      if action in ("running", "walking"):
        assert np.abs(dy).max() < 0.01 and len(set(np.sign(dx))) == 1
    assert np.abs(motions["running"][0]).mean() > 2.5 * np.abs(motions["walking"][0]).mean()
    # Same clip index, different action: the same actor colours (drawn independently).
    colors = []
    for action in synthetic.ACTIONS:
      spec = synthetic.ClipSpec("train", index, action, "beach", "typical", 0)
      clip = synthetic.render_clip(spec, 8, 64, 64)
      colors.append({tuple(p) for p in clip[0][_actor_mask(spec)[0]]})
    assert all(c == colors[0] for c in colors)


def test_unscene_binary_duals():
  rng = np.random.default_rng(0)
  qs = unscene_binary.questions("skiing", "library", rng)
  assert [(q["aspect"], q["pair"], q["a"]) for q in qs] == [
      ("action", 0, "Yes"), ("action", 0, "No"), ("scene", 1, "Yes"), ("scene", 1, "No")]
  assert "skiing" in qs[0]["q"] and "walking" in qs[1]["q"]  # the library's typical action
  assert "library" in qs[2]["q"] and "snowy mountain" in qs[3]["q"]
  empty = unscene_binary.questions("", "boxing ring", rng)
  assert [q["a"] for q in empty] == ["No", "Yes"] and "boxing" in empty[0]["q"]
  assert "only a boxing ring" in empty[1]["q"] and "no one" in empty[1]["q"]
  typical = unscene_binary.questions("running", "beach", rng)
  assert "running" not in typical[1]["q"] and "beach" not in typical[3]["q"]


def test_open_ended_and_training_mix():
  (desc,) = open_ended.questions("boxing", "forest")
  assert desc["q"] == "Describe the video in detail."
  assert "boxing" in desc["a"] and "forest" in desc["a"]
  assert "no one" in open_ended.questions("", "beach")[0]["a"].lower()
  mix = train_mix.questions("swimming", "beach", np.random.default_rng(0))
  answers = {q["q"]: q["a"] for q in mix}
  assert answers["What is the person doing?"] == "Swimming."
  assert answers["Is the person running?"] == "No"  # the beach's typical action
  assert answers["Is there only a beach, with no one in it?"] == "No"
  assert {q["a"] for q in mix if q["task"] == "yes_no"} == {"Yes", "No"}
  empty = train_mix.questions("", "beach", np.random.default_rng(0))
  assert {q["q"]: q["a"] for q in empty}["Is there only a beach, with no one in it?"] == "Yes"


def test_word_vocabulary_covers_every_generated_text():
  tok = builders.tokenizer.build_word_tokenizer(builders.vocabulary_texts())
  unk = tok.token_to_id("<unk>")
  for split in synthetic.SPLITS:
    for spec in synthetic.clip_specs(split, 120, scene_only_share=0.2):
      for q in builders.synthetic_questions(spec):
        for text in (q["q"], q["a"]):
          assert unk not in tok.encode(text, add_special_tokens=False).ids, text
  assert tok.get_vocab_size() <= 512


def test_every_synthetic_chat_fits_the_tiny_text_len():
  from conftest import load_config
  from mashvlm_jax.data import chat, tokenizer
  words = tokenizer.build_word_tokenizer(builders.vocabulary_texts())

  class Tok:  # the word tokenizer through the Tokenizer interface, without a file
    bos_id, eos_id, pad_id = words.token_to_id("<s>"), words.token_to_id("</s>"), 0
    encode = staticmethod(lambda text: words.encode(text, add_special_tokens=False).ids)

  text_len = load_config("tiny_synthetic").data.text_len
  longest = 0
  for split in synthetic.SPLITS:
    for spec in synthetic.clip_specs(split, 64, scene_only_share=0.25):
      for q in builders.synthetic_questions(spec):
        _, report = chat.encode_example(Tok, chat.ChatTemplate(), [q], text_len)
        assert not any(report.values()), (q, report)
        head, turns = chat.encode_turns(Tok, chat.ChatTemplate(), [q])
        longest = max(longest, len(head) + len(turns[0]))
  assert longest <= text_len


def _no_labels(spec, negatives):
  """(action, scene) named by the clip's training "No" questions."""
  rows = builders.synthetic_questions(spec, negatives)
  no = [r for r in rows if r["task"] == "yes_no" and r["a"] == train_mix.NO]
  action = [r["q"] for r in no if r["aspect"] == "action" and "only" not in r["q"]]
  scene = [r["q"] for r in no if r["aspect"] == "scene"]
  return action, scene


def test_training_negatives_typical_or_uniform():
  specs = [s for s in synthetic.clip_specs("train", 4000, seed=1, typical_prob=0.125)
           if s.action]
  question_of = {a: tasks.action_question(a) for a in synthetic.ACTIONS}
  scene_question_of = {s: tasks.scene_question(synthetic.SCENE_PHRASES[s])
                       for s in synthetic.SCENES}
  typical_named = collections.Counter()
  drawn = collections.Counter()
  for spec in specs:
    typical_scene_action = {s: a for a, s in TYPICAL.items()}[spec.scene]
    (action,), (scene,) = _no_labels(spec, "typical")
    if spec.action != typical_scene_action:  # the hallucination candidate, always
      assert action == question_of[typical_scene_action]
      typical_named["typical"] += 1
    (action,), (scene,) = _no_labels(spec, "uniform")
    named = next(a for a, q in question_of.items() if q == action)
    assert named != spec.action and scene != scene_question_of[spec.scene]
    drawn[named == typical_scene_action] += 1
  # uniform: the scene's typical action is one of the 7 other actions, about 1/7 of the time
  share = drawn[True] / sum(drawn.values())
  assert abs(share - 1 / 7) < 4 * (1 / 7 * 6 / 7 / sum(drawn.values())) ** 0.5, share
  assert typical_named["typical"] > 0.8 * len(specs)


def test_training_negatives_name_the_data_and_are_checked():
  typical = builders.synthetic_config("tiny", 2, 8)
  uniform = builders.synthetic_config("tiny", 2, 8, train_negatives="uniform")
  assert "_neguniform_v" in uniform.name and "_neg" not in typical.name
  with pytest.raises(ValueError, match="train_negatives must be one of"):
    builders.synthetic_config("tiny", 2, 8, train_negatives="hard")
