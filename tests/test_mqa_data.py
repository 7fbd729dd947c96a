"""LLaVAction's rows in the synthetic training set (data/tasks/mqa_train.py): stored options
against the option rule over an independently fitted recognizer A, the answer letter
uniform over visits through the pipeline's transform (chi-square), prior actions, and
temporal clips that hold still outside the action window read back from the pixels."""
import collections
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from conftest import run_cli, user_config_file
from test_data_video import write_indexed_mp4
from test_mqa import CHI2_999, chi_square, word_tokenizer  # noqa: F401 (fixture)
from test_vocabulary import assert_known
from mashvlm_jax.data import (annotations, builders, chat, pipeline, recognizer, registry,
                              synthetic)
from mashvlm_jax.data import tokenizer as tokenizer_lib
from mashvlm_jax.data.tasks import families, mqa, mqa_train

FAMILIES = ("mqa", "mqa_pool", "mqa_random", "mqa_prior", "temporal")
CONFIG = builders.synthetic_config("tiny", train_size=40, test_size=8, train_tasks=FAMILIES)
CTX = families.BuildContext(num_frames=8, size=64, seed=0, config=CONFIG)
TRAIN = synthetic.clip_specs("train", 40)
LINE = re.compile(r"^\(([A-E])\) (.+)$")


def family_rows(name, spec):
  return families.family_rows((name,), spec, spec.rng(synthetic.TASKS), CTX)


def options_of(row):
  """(option classes in the stored order, the answer's class) of a multiple-choice row."""
  names = [LINE.match(line).group(2) for line in row["q"].split("\n")[1:]]
  classes = [mqa.NARRATIONS.index(n) for n in names]
  letter, said = LINE.match(row["a"]).groups()
  assert names["ABCDE".index(letter)] == said
  return classes, mqa.NARRATIONS.index(said)


@pytest.fixture(scope="module")
def ranked_a():
  """Recognizer A's rankings of the train clips, fitted here through fit_synthetic and
  synthetic_predictions (not the families' cached path)."""
  data = recognizer.SyntheticSet.from_config(CONFIG)
  model = recognizer.fit_synthetic(data, ["A"])["A"]
  return recognizer.synthetic_predictions(model, data, "train")


def test_stored_rows_hold_the_ground_truth_once_and_k_distinct_classes(ranked_a):
  branches = collections.Counter()
  for spec in TRAIN:
    gt = mqa.action_class(spec.action, spec.scene) if spec.action else None
    for name in ("mqa", "mqa_pool", "mqa_random", "mqa_prior"):
      rows = family_rows(name, spec)
      if gt is None:
        assert rows == []  # scene-only clips: no action label, no multiple-choice row
        continue
      (row,) = rows
      assert row["task"] == "mqa" and row["aspect"] == "action"
      classes, said = options_of(row)
      assert said == gt and classes.count(gt) == 1 and len(set(classes)) == mqa.K
      assert classes == sorted(classes)  # canonical order; visits shuffle
      top = ranked_a[spec.id]
      if name in ("mqa", "mqa_prior"):  # the rule, by hand: top 5, or top 4 + gt
        expected = top[:5] if gt in top[:5] else top[:4] + [gt]
        assert set(classes) == set(expected)
        branches[gt in top[:5]] += 1
      elif name == "mqa_pool":
        assert set(classes) - {gt} <= set(top[:10])
  assert branches[True] > 0  # (the other branch is checked by hand in test_mqa.py)


def test_distractors_are_hard_for_recognizer_rows_and_not_for_random_rows():
  """Recognizer A's options share the clip's scene far more often than random ones."""
  same_scene = collections.Counter()
  for spec in TRAIN:
    if not spec.action:
      continue
    for name in ("mqa", "mqa_random"):
      classes, gt = options_of(family_rows(name, spec)[0])
      same_scene[name] += sum(c % 8 == gt % 8 for c in classes if c != gt)
  assert same_scene["mqa"] > 2 * same_scene["mqa_random"]


def test_prior_rows_state_the_two_previous_clips_of_the_video():
  for spec in TRAIN:
    if not spec.action:
      continue
    (row,) = family_rows("mqa_prior", spec)
    begin = spec.index - spec.index % mqa_train.VIDEO_CLIPS
    earlier = [s for s in TRAIN[begin:spec.index] if s.action]
    if len(earlier) < 2:
      assert row["q"].startswith(mqa.QUESTION)
      continue
    two, one = earlier[-2:]
    assert row["q"].startswith(f"Earlier the person was {two.action} "
                               f"{synthetic.SCENE_PHRASES[two.scene]}, then {one.action} "
                               f"{synthetic.SCENE_PHRASES[one.scene]}. {mqa.QUESTION}\n")


def test_answer_letter_uniform_over_visits_through_the_pipeline(word_tokenizer):  # noqa: F811
  """2500 visits of one stored row through ExampleTransform.text (render, chat, tokens):
  the answer tokens name the ground truth's narration under a letter whose counts pass a
  chi-square bound; the prior sentence shows on about 30% of the visits."""
  spec = next(s for s in TRAIN if s.action and s.index % 8 >= 4)
  (row,) = family_rows("mqa_prior", spec)
  assert row["q"].startswith("Earlier")
  gt_name = mqa.narration(mqa.action_class(spec.action, spec.scene))
  transform = pipeline.ExampleTransform(word_tokenizer, chat.ChatTemplate(), 128, 8, 64)
  record = {"id": spec.id, "qa": [row]}
  letters, priors, visits = collections.Counter(), 0, 2500
  for seed in range(visits):
    rng = np.random.default_rng(seed)
    (shown,) = transform.turns([row], np.random.default_rng(seed))
    text, report = transform.text(record, rng)
    assert not any(report.values())
    answer = word_tokenizer.decode(
        [int(t) for t, m in zip(text["labels"], text["label_mask"]) if m][:-1])
    match = re.match(r"^\( ([a-e]) \) (.+)$", answer)
    assert match and match.group(2) == gt_name, answer
    assert LINE.match(shown["a"]).group(1).lower() == match.group(1)
    options = [LINE.match(x).group(2) for x in shown["q"].split("\n")[1:]]
    assert sorted(options) == sorted(LINE.match(x).group(2) for x in row["q"].split("\n")[1:])
    assert options["abcde".index(match.group(1))] == gt_name
    letters[match.group(1)] += 1
    priors += shown["q"].startswith("Earlier")
  assert chi_square(letters, "abcde") < CHI2_999[4], letters
  sd = np.sqrt(visits * 0.3 * 0.7)
  assert abs(priors - 0.3 * visits) < 4 * sd, priors
  assert row == family_rows("mqa_prior", spec)[0]  # the stored row never changes


def test_every_row_text_tokenizes_and_the_vocabulary_is_unchanged(word_tokenizer):  # noqa: F811
  for spec in TRAIN:
    for row in builders.synthetic_questions(spec, train_tasks=FAMILIES, ctx=CTX):
      assert_known(word_tokenizer, row["q"])
      assert_known(word_tokenizer, row["a"])
  plain = builders.synthetic_config("tiny", train_size=40, test_size=8)
  assert CONFIG.vocabulary == plain.vocabulary  # no new words: older runs still load
  assert CONFIG.name.endswith(f"_tasks-mqa-mqa_pool-mqa_random-mqa_prior-temporal_v"
                              f"{plain.vocabulary}")
  assert builders.synthetic_config("tiny", train_tasks=("mqa",)).name != (
      builders.synthetic_config("tiny", train_tasks=("mqa_pool",)).name)


def test_families_need_the_build_config():
  spec = next(s for s in TRAIN if s.action)
  with pytest.raises(ValueError, match="SyntheticConfig"):
    families.family_rows(("mqa",), spec, spec.rng(synthetic.TASKS),
                         families.BuildContext(num_frames=8, size=64))


def test_parse_row_round_trip_and_errors():
  row = mqa_train.stored_row(36, [36, 3, 60, 12, 20], ["skiing on a beach", "boxing in a forest"])
  options, index, previous = mqa_train.parse_row(row)
  assert options == [mqa.narration(c) for c in (3, 12, 20, 36, 60)] and index == 3
  assert previous == ["skiing on a beach", "boxing in a forest"]
  with pytest.raises(ValueError, match="answer"):
    mqa_train.parse_row(dict(row, a="(E) running on a beach"))
  with pytest.raises(ValueError, match="option line 2"):
    mqa_train.parse_row(dict(row, q=row["q"].replace("(B)", "(C)")))
  with pytest.raises(ValueError, match="first line"):
    mqa_train.parse_row(dict(row, q="Tell me.\n" + row["q"].split("\n", 1)[1]))


# ------------------------------------------------------------------------------ temporal

def moving_pairs(frames):
  """bool [T-1]: frame t+1 differs from frame t anywhere."""
  return np.array([(a != b).any() for a, b in zip(frames[:-1], frames[1:])])


def test_temporal_clips_hold_still_outside_the_window_and_the_answer_matches():
  held = 0
  for spec in TRAIN:
    segment = mqa_train.held_segment(spec, 8)
    rows = family_rows("temporal", spec)
    example = builders.synthetic_example(spec, 8, 64, train_tasks=("temporal",), config=CONFIG)
    if segment is None:
      assert rows == []
      np.testing.assert_array_equal(example["video"], synthetic.render_clip(spec, 8, 64, 64))
      continue
    held += 1
    first, last = segment
    assert last - first + 1 >= synthetic.MIN_MOVING_FRAMES and 0 <= first < last <= 7
    frames = example["video"]
    np.testing.assert_array_equal(frames, synthetic.render_held_clip(spec, 8, 64, 64, first,
                                                                     last))
    moving = moving_pairs(frames)
    # still outside [first, last]; moving as it starts and as it ends
    assert not moving[:first].any() and not moving[last:].any()
    assert moving[first] and moving[last - 1]
    # the answer read back from the pixels: first and last frame of motion, 0.25 s apart
    start = np.flatnonzero(moving)[0] * 0.25
    end = (np.flatnonzero(moving)[-1] + 1) * 0.25
    (row,) = rows
    assert row["task"] == "temporal_detection"
    assert row["a"] == f"{start:.2f}, {end:.2f}"
    assert f"for {end - start:.2f} seconds" in row["q"] and spec.action in row["q"]
    # the same scene and actor as the plain clip: the first frame matches the plain clip's
    # when the action starts at frame 0
    if first == 0:
      np.testing.assert_array_equal(frames[0], synthetic.render_clip(spec, 8, 64, 64)[0])
  assert 3 <= held <= 20  # about TEMPORAL_SHARE of 38 clips with an actor


def test_still_segment_draws_every_split_and_rejects_short_clips():
  segments = collections.Counter(synthetic.still_segment(s, 8)
                                 for s in synthetic.clip_specs("train", 400) if s.action)
  assert {last - first for first, last in segments} == {3, 4, 5, 6}
  assert {first for first, _ in segments} == {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match="at least 5 frames"):
    synthetic.still_segment(TRAIN[5], 4)
  with pytest.raises(ValueError, match="first < last"):
    synthetic.held_trajectory("running", 8, 3, 3, np.random.default_rng(0))


# ------------------------------------------------------------------------------ EPIC

EPIC_CONFIG = """
def get_config(arg=None):
  config = tiny.get_config(arg)
  config.data.update(name="local_video_qa", data_dir="cache", stored_frames=4,
                     stored_size=32, annotations={"train": "epic.json"},
                     video_root="videos", mqa_predictions="predictions.jsonl",
                     max_failure_share=0.5)
  config.data.tokenizer.update(kind="hf", path="tokenizer.json")
  return config
"""


def test_epic_layout_builds_with_relative_paths_and_counts_bad_records(tmp_path):
  """`mashvlm make-data` in a user's directory: EPIC segments become multiple-choice rows
  with options from the predictions file by the rule, prior actions from the previous
  segments of the same video by start time; malformed records are counted and named."""
  (tmp_path / "videos").mkdir()
  for name in ("P01_01", "P01_02"):
    write_indexed_mp4(tmp_path / "videos" / f"{name}.mp4", 40, width=32, height=32)
  words = {(0, 3): ("take", "plate"), (1, 3): ("wash", "plate"), (2, 5): ("open", "fridge"),
           (0, 5): ("take", "fridge"), (4, 7): ("cut", "onion"), (1, 7): ("wash", "onion")}

  def seg(clip_id, video, start, stop, verb_class, noun_class):
    verb, noun = words[(verb_class, noun_class)]
    return {"id": clip_id, "video": video, "start": start, "stop": stop,
            "narration": f"{verb} the {noun}", "verb": verb, "verb_class": verb_class,
            "noun": noun, "noun_class": noun_class}
  records = [seg("P01_01_2", "P01_01.mp4", "00:00:02.00", "00:00:02.90", 2, 5),
             seg("P01_01_0", "P01_01.mp4", 0.0, 0.9, 0, 3),
             seg("P01_01_1", "P01_01.mp4", 1.0, 1.9, 1, 3),
             seg("P01_01_3", "P01_01.mp4", 3.0, 3.9, 4, 7),
             seg("P01_02_0", "P01_02.mp4", 0.5, 2.5, 0, 5),
             dict(seg("P01_02_1", "P01_02.mp4", 1.0, 2.0, 1, 7), verb_class="one"),
             dict(seg("P01_02_2", "P01_02.mp4", 3.0, 1.0, 1, 7))]
  (tmp_path / "epic.json").write_text(json.dumps(records))
  ids = {k: annotations.epic_action_id(*k) for k in words}
  order = [ids[k] for k in sorted(words)] + [999_999]  # an id the file does not name
  rankings = {r["id"]: [order[(i + j) % len(order)] for j in range(len(order))]
              for i, r in enumerate(records)}
  (tmp_path / "predictions.jsonl").write_text(
      "".join(json.dumps({"id": k, "ranked": v}) + "\n" for k, v in rankings.items()))
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(builders.vocabulary_texts()),
                            tmp_path / "tokenizer.json")  # the user's tokenizer
  (tmp_path / "epic_config.py").write_text(user_config_file(EPIC_CONFIG))
  out = run_cli("make-data", "--config=epic_config.py", cwd=tmp_path, timeout=300)
  assert "skipped 2 of 7 records" in out.stdout
  assert "epic.json record 5 (video P01_02.mp4): field 'verb_class' should be int" in out.stdout
  assert "epic.json record 6 (video P01_02.mp4): field 'stop'" in out.stdout

  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    loader = importlib.util.spec_from_file_location("epic_config", "epic_config.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    config = module.get_config()
    stored = {r["id"]: r for r in map(pipeline.decode_record,
                                      registry.data_source(config, "train"))}
  finally:
    os.chdir(cwd)
  assert sorted(stored) == ["P01_01_0", "P01_01_1", "P01_01_2", "P01_01_3", "P01_02_0"]
  # (1, 7) "wash onion" is named only by the two bad records: never an option
  names = {ids[k]: f"{v} {n}" for k, (v, n) in words.items() if k != (1, 7)}
  for clip_id, record in stored.items():
    (row,) = record["qa"]
    seg_ = next(r for r in records if r["id"] == clip_id)
    gt = annotations.epic_action_id(seg_["verb_class"], seg_["noun_class"])
    named = [c for c in rankings[clip_id] if c in names]  # by hand: top 5 or top 4 + gt
    expected = named[:5] if gt in named[:5] else named[:4] + [gt]
    options, index, previous = mqa_train.parse_row(row)
    assert options == [names[c] for c in sorted(expected)]
    assert options[index] == names[gt] and record["action"] == seg_["narration"]
    assert len(record["video"]) == 4
  # by start time: P01_01_0, _1, _2, _3; P01_02 has one usable segment
  assert mqa_train.parse_row(stored["P01_01_2"]["qa"][0])[2] == ["take plate", "wash plate"]
  assert mqa_train.parse_row(stored["P01_01_3"]["qa"][0])[2] == ["wash plate", "open fridge"]
  assert mqa_train.parse_row(stored["P01_01_1"]["qa"][0])[2] is None
  assert mqa_train.parse_row(stored["P01_02_0"]["qa"][0])[2] is None


def test_epic_predictions_file_errors_name_the_file(tmp_path):
  from conftest import load_config
  (tmp_path / "epic.json").write_text(json.dumps([{
      "id": "a", "video": "v.mp4", "start": 0, "stop": 1, "narration": "take plate",
      "verb": "take", "verb_class": 0, "noun": "plate", "noun_class": 3}]))
  config = load_config("tiny_synthetic")
  config.data.update(name="local_video_qa", data_dir=str(tmp_path / "cache"),
                     annotations={"train": str(tmp_path / "epic.json")},
                     mqa_predictions=str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match="data.mqa_predictions names .*missing.jsonl"):
    registry.ensure_built(config)
  (tmp_path / "bad.jsonl").write_text('{"id": "a", "ranked": [3, 3, 4, 5, 6]}\n')
  config.data.mqa_predictions = str(tmp_path / "bad.jsonl")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'ranked'\[1\]: class 3 is listed "
                                       r"twice"):
    registry.ensure_built(config)
