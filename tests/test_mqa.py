"""LLaVAction's multiple-choice options, temporal windows, prompts and the synthetic
recognizers (issue 18): the option rule, uniform shuffles, hand-computed windows, texts the
word tokenizer holds, recognizers against chance and a least-squares reference, and the
predictions file's errors."""
import collections
import itertools
import json

import numpy as np
import pytest

from test_vocabulary import assert_known
from mashvlm_jax.data import builders, recognizer, synthetic
from mashvlm_jax.data import tokenizer as tokenizer_lib
from mashvlm_jax.data.tasks import mqa

# Chi-square critical values at p = 0.001 (scipy.stats.chi2.ppf(0.999, dof)).
CHI2_999 = {4: 18.47, 62: 102.17, 119: 172.42}


def chi_square(counts, cells):
  """Pearson's statistic of ``counts`` (a Counter) against a uniform law over ``cells``."""
  total = sum(counts.values())
  expected = total / len(cells)
  return sum((counts.get(c, 0) - expected) ** 2 / expected for c in cells)


# ------------------------------------------------------------------------------ labels

def test_labels_narrations_and_class_order():
  assert mqa.action_class("running", "beach") == 4 * 8 + 4 == 36
  assert mqa.action_class("skiing", "snowy mountain") == 0
  assert mqa.action_class("falling", "ice rink") == 63
  assert mqa.action_class("skiing", "boxing ring") == 1  # verb-major
  assert mqa.clip_labels("boxing", "beach") == (1, 4, 12)
  assert mqa.narration(36) == "running on a beach"
  assert mqa.narration(63) == "falling on an ice rink"
  assert len(set(mqa.NARRATIONS)) == mqa.NUM_CLASSES == 64
  for cls in range(64):
    assert mqa.action_class(*mqa.class_labels(cls)) == cls
  assert mqa.action_class("", "beach") is None and mqa.clip_labels("", "forest") is None
  with pytest.raises(ValueError, match="unknown synthetic action 'dancing'"):
    mqa.action_class("dancing", "beach")
  with pytest.raises(ValueError, match="unknown synthetic scene 'moon'"):
    mqa.action_class("running", "moon")
  with pytest.raises(ValueError, match=r"64 is outside \[0, 64\)"):
    mqa.narration(64)
  with pytest.raises(ValueError, match="scene-only clip has no action label"):
    mqa.mqa_options(None, list(range(10)))


# ------------------------------------------------------------------------------ options

def test_mqa_options_both_branches_by_hand():
  ranked = [7, 3, 9, 1, 4, 8, 2]
  assert mqa.mqa_options(9, ranked) == [7, 3, 9, 1, 4]  # gt in the top 5: the top 5
  assert mqa.mqa_options(4, ranked) == [7, 3, 9, 1, 4]  # gt at rank 5 still in
  assert mqa.mqa_options(8, ranked) == [7, 3, 9, 1, 8]  # rank 6: top 4 + gt
  assert mqa.mqa_options(60, ranked) == [7, 3, 9, 1, 60]  # unranked gt
  assert mqa.mqa_options(3, ranked, k=3) == [7, 3, 9]
  assert mqa.mqa_options(1, ranked, k=3) == [7, 3, 1]


def test_mqa_options_errors():
  with pytest.raises(ValueError, match=r"ranked holds class 3 twice \(again at position 4\)"):
    mqa.mqa_options(9, [7, 3, 9, 1, 3, 8])
  with pytest.raises(ValueError, match="ranked holds 4 classes, fewer than k=5"):
    mqa.mqa_options(9, [7, 3, 9, 1])
  with pytest.raises(ValueError, match="k >= 2"):
    mqa.mqa_options(9, [7, 3, 9, 1], k=1)


def test_every_option_set_holds_the_ground_truth_once_and_k_distinct_classes():
  rng = np.random.default_rng(0)
  branches = collections.Counter()
  for _ in range(300):
    gt = int(rng.integers(64))
    ranked = [int(c) for c in rng.permutation(64)]
    options = mqa.mqa_options(gt, ranked)
    branches[gt in ranked[:5]] += 1
    for opts in (options, mqa.random_options(gt, range(64), 5, rng),
                 mqa.pool_options(gt, ranked, 5, rng)):
      assert len(opts) == len(set(opts)) == 5
      assert opts.count(gt) == 1
  assert branches[True] > 10 and branches[False] > 200  # both branches were exercised


def test_answer_letter_is_uniform_over_shuffles():
  """5000 per-visit shuffles of one option set: the gt's letter and the whole order are
  uniform (chi-square, p = 0.001), and the option set never changes."""
  rng = np.random.default_rng(1)
  options, gt = [12, 4, 36, 20, 28], 36
  letters, orders = collections.Counter(), collections.Counter()
  for _ in range(5000):
    order, index = mqa.shuffled(options, gt, rng)
    assert order[index] == gt and sorted(order) == sorted(options)
    letters[index] += 1
    orders[tuple(order)] += 1
  assert chi_square(letters, range(5)) < CHI2_999[4]
  assert chi_square(orders, list(itertools.permutations(options))) < CHI2_999[119]
  with pytest.raises(ValueError, match="ground truth 5 is not among the options"):
    mqa.shuffled(options, 5, rng)


def test_random_options_draw_only_other_classes_uniformly():
  rng = np.random.default_rng(2)
  drawn = collections.Counter()
  for _ in range(2000):
    opts = mqa.random_options(36, range(64), 5, rng)
    assert opts[0] == 36 and 36 not in opts[1:]
    drawn.update(opts[1:])
  others = [c for c in range(64) if c != 36]
  assert set(drawn) == set(others)
  assert chi_square(drawn, others) < CHI2_999[62]
  with pytest.raises(ValueError, match="fewer than k-1=4"):
    mqa.random_options(0, range(4), 5, rng)
  with pytest.raises(ValueError, match="classes holds class 2 twice"):
    mqa.random_options(0, [0, 1, 2, 2, 3, 4], 5, rng)


def test_pool_options_draw_only_from_the_top_2k():
  rng = np.random.default_rng(3)
  ranked = [int(c) for c in np.random.default_rng(4).permutation(64)]
  for gt, pool in ((ranked[2], set(ranked[:10]) - {ranked[2]}),  # gt inside the top 10
                   (ranked[30], set(ranked[:10]))):  # gt outside it
    drawn = collections.Counter()
    for _ in range(600):
      opts = mqa.pool_options(gt, ranked, 5, rng)
      assert opts[0] == gt
      drawn.update(opts[1:])
    assert set(drawn) == pool
  with pytest.raises(ValueError, match="fewer than 2k=10"):
    mqa.pool_options(ranked[0], ranked[:9], 5, rng)


# ------------------------------------------------------------------------------ temporal

def test_temporal_window_hand_computed():
  # delta 2 s split 0.25 / 0.75: window [2 - 0.5, 4.96 + 1.5] = [1.5, 6.46]; the action
  # sits at 0.5 .. 3.46 s from the window start.
  start, end, text = mqa.temporal_window(2.0, 4.96, 2.0, 0.25)
  assert (start, end, text) == (pytest.approx(1.5), pytest.approx(6.46), "0.50, 3.46")
  assert mqa.temporal_window(3.0, 5.5, 1.0, 1.0) == (2.0, 5.5, "1.00, 3.50")
  assert mqa.temporal_window(3.0, 5.5, 1.0, 0.0) == (3.0, 6.5, "0.00, 2.50")
  assert mqa.temporal_window(3.0, 5.5, 0.0, 0.5) == (3.0, 5.5, "0.00, 2.50")


def test_temporal_window_clamps_at_zero_and_clip_end():
  # 0.5 - 0.75 * 2 = -1 -> 0; the end widens by 0.25 * 2.
  assert mqa.temporal_window(0.5, 1.75, 2.0, 0.75) == (0.0, 2.25, "0.50, 1.75")
  assert mqa.temporal_window(0.5, 1.75, 2.0, 0.25, clip_end=2.0) == (0.0, 2.0, "0.50, 1.75")
  with pytest.raises(ValueError, match=r"rho must be in \[0, 1\], found 1.5"):
    mqa.temporal_window(1.0, 2.0, 1.0, 1.5)
  with pytest.raises(ValueError, match="start=2.0, end=1.0"):
    mqa.temporal_window(2.0, 1.0, 1.0, 0.5)
  with pytest.raises(ValueError, match="delta must be >= 0"):
    mqa.temporal_window(1.0, 2.0, -1.0, 0.5)
  with pytest.raises(ValueError, match="after the clip's end 1.5"):
    mqa.temporal_window(1.0, 2.0, 1.0, 0.5, clip_end=1.5)
  with pytest.raises(ValueError, match="outside"):
    mqa.temporal_window(1.0, 120.0, 1.0, 0.5)


def test_temporal_qa():
  start, end, row = mqa.temporal_qa("running on a beach", 2.0, 4.96, 2.0, 0.25)
  assert (start, end) == (pytest.approx(1.5), pytest.approx(6.46))
  assert row["q"] == ("The person is running on a beach for 2.96 seconds of this video. "
                      "When does it start and end, in seconds?")
  assert (row["a"], row["task"], row["aspect"]) == ("0.50, 3.46", "temporal_detection",
                                                    "action")


# ------------------------------------------------------------------------------ texts

def test_question_answer_and_prior_prompt_texts():
  options = [mqa.narration(c) for c in (12, 4, 36)]
  assert mqa.question(options) == ("What is the person doing? Choose one option.\n"
                                   "(A) boxing on a beach\n(B) skiing on a beach\n"
                                   "(C) running on a beach")
  assert mqa.answer(options, 2) == "(C) running on a beach"
  prior = mqa.question(options, previous=["skiing on a snowy mountain", "boxing on a beach"])
  assert prior.splitlines()[0] == ("Earlier the person was skiing on a snowy mountain, then "
                                   "boxing on a beach. What is the person doing? Choose one "
                                   "option.")
  assert prior.splitlines()[1:] == mqa.question(options).splitlines()[1:]
  row = mqa.mqa_qa(options, 1)
  assert (row["a"], row["task"], row["aspect"]) == ("(B) skiing on a beach", "mqa", "action")
  with pytest.raises(ValueError, match="two previous narrations"):
    mqa.question(options, previous=["skiing on a snowy mountain"])
  with pytest.raises(ValueError, match="answer index 3 is outside the 3 options"):
    mqa.answer(options, 3)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
  """The synthetic word tokenizer of today's registered vocabulary."""
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(builders.vocabulary_texts()),
                            path)
  return tokenizer_lib.Tokenizer(str(path), kind="word")


def test_every_text_tokenizes_without_unknown_words(word_tokenizer):
  """Random option sets, orders, prior actions and windows: every question and answer is
  made of registered words ("(C)" is the three words "(", "c", ")")."""
  tok = word_tokenizer
  assert [tok.impl.id_to_token(i) for i in tok.encode("(C) 1.50, 4.46")] == [
      "(", "c", ")", "1", ".", "50", ",", "4", ".", "46"]
  rng = np.random.default_rng(5)
  texts = set()
  for _ in range(200):
    gt = int(rng.integers(64))
    ranked = [int(c) for c in rng.permutation(64)]
    for opts in (mqa.mqa_options(gt, ranked), mqa.random_options(gt, range(64), 5, rng)):
      order, index = mqa.shuffled(opts, gt, rng)
      names = [mqa.narration(c) for c in order]
      previous = [mqa.narration(int(c)) for c in rng.integers(64, size=2)]
      texts |= {mqa.question(names), mqa.question(names, previous), mqa.answer(names, index)}
    start = float(rng.uniform(0, 20))
    _, _, row = mqa.temporal_qa(mqa.narration(gt), start, start + float(rng.uniform(0, 10)),
                                float(rng.uniform(0, 5)), float(rng.random()))
    texts |= {row["q"], row["a"]}
  texts |= {f"{i}.{j:02d}" for i in range(mqa.MAX_SECONDS + 1) for j in (0, 7, 99)}
  assert len(texts) > 1000
  for text in sorted(texts):
    assert_known(tok, text)
  assert set(mqa.texts()) <= set(builders.vocabulary_texts())


def test_answer_index_reads_letters_and_narrations(word_tokenizer):
  options = [mqa.narration(c) for c in (12, 4, 36, 20, 28)]
  for index in range(5):
    target = mqa.answer(options, index)
    assert mqa.answer_index(target, options) == index
    decoded = word_tokenizer.decode(word_tokenizer.encode(target))  # "( c ) running ..."
    assert decoded != target and mqa.answer_index(decoded, options) == index
  assert mqa.answer_index(" Running on a beach ", options) == 2
  assert mqa.answer_index("(F) something", options) is None
  assert mqa.answer_index("dancing in a library", options) is None


# ------------------------------------------------------------------------------ recognizers

# 800 train clips (760 with an actor) and 112 per test split at 8 frames of 32x32.
DATA = recognizer.SyntheticSet({"train": 800, "test_typical": 112, "test_unusual": 112},
                               size=32)


@pytest.fixture(scope="module")
def fitted():
  """(recognizers, train features, train labels, {split: (ranked by name, labels)})."""
  specs, raw = recognizer.split_features(DATA, "train")
  y = recognizer.labels(specs)
  models = {name: recognizer.fit(name, raw[name], y[:, 0], y[:, 1])
            for name in recognizer.NAMES}
  tests = {}
  for split in recognizer.TEST_SPLITS:
    test_specs, test_raw = recognizer.split_features(DATA, split)
    tests[split] = ({n: m.ranked(test_raw[n]) for n, m in models.items()},
                    recognizer.labels(test_specs))
  return models, raw, y, tests


def test_grid_means_and_resample_by_hand():
  x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  assert recognizer.grid_means(x, 2, 2)[..., 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
  assert recognizer.grid_means(x, 1, 1)[..., 0].tolist() == [[7.5]]
  clips = np.arange(4)[None, :, None, None, None] * np.ones((1, 4, 2, 2, 1))
  # 8 evenly spaced of 4 frames: indices rint(3 k / 7) = 0 0 1 1 2 2 3 3.
  assert recognizer.resample(clips, 8)[0, :, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  with pytest.raises(ValueError, match="smaller than the 16x16 feature grid"):
    recognizer.features_b(np.zeros((1, 4, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r"clips \[n, T>=2, H, W, 3\], found shape \(4, 8, 8, 3\)"):
    recognizer.features_a(np.zeros((4, 8, 8, 3), np.uint8))


def test_features_do_not_depend_on_frame_count_or_size_in_shape():
  spec = DATA.specs("train")[100]
  small = synthetic.render_clip(spec, 8, 32, 32)[None]
  large = synthetic.render_clip(spec, 16, 48, 64)[None]
  for name in recognizer.NAMES:
    assert recognizer.raw_features(name, small).shape == \
        recognizer.raw_features(name, large).shape


def test_ridge_matches_least_squares_reference():
  """The normal equations (primal n >= d and dual n < d) against numpy's least squares on
  the augmented system [x 1; sqrt(s n) I 0] w = [y; 0]."""
  rng = np.random.default_rng(6)
  for n, d in ((40, 7), (6, 15)):
    x, y, strength = rng.normal(size=(n, d)), rng.normal(size=(n, 3)), 0.3
    w, b = recognizer.ridge(x, y, strength)
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(strength * n) * np.eye(d), np.zeros((d, 1))]])
    reference = np.linalg.lstsq(a, np.concatenate([y, np.zeros((d, 3))]), rcond=None)[0]
    np.testing.assert_allclose(w, reference[:d], atol=1e-10)
    np.testing.assert_allclose(b, reference[d], atol=1e-10)


def test_recognizers_are_deterministic(fitted):
  models, raw, y, _ = fitted
  for name, model in models.items():
    again = recognizer.fit(name, raw[name], y[:, 0], y[:, 1])
    np.testing.assert_array_equal(again.weights, model.weights)
    np.testing.assert_array_equal(again.ranked(raw[name][:50]), model.ranked(raw[name][:50]))
  clips = DATA.render(DATA.labelled("test_unusual")[:6])
  np.testing.assert_array_equal(models["A"].rank_clips(clips), models["A"].rank_clips(clips))


def test_ranked_classes_combine_the_verb_and_noun_heads(fitted):
  models, raw, _, _ = fitted
  verb, noun = models["B"].heads(raw["B"][:20])
  ranked = models["B"].ranked(raw["B"][:20])
  assert ranked.shape == (20, 64)
  assert (np.sort(ranked, 1) == np.arange(64)).all()
  assert (ranked[:, 0] == verb.argmax(1) * 8 + noun.argmax(1)).all()


def test_recognizers_beat_chance_clearly(fitted):
  """Measured at this size: A / B top-1 99.1 / 100% and top-5 99.1 / 100% on
  test_typical, top-1 39.3 / 50.9% and top-5 93.8 / 94.6% on test_unusual; chance is 1/64
  = 1.6% (top-1) and 5/64 = 7.8% (top-5). Accuracy computed here by hand, and by
  evaluate_synthetic, agree."""
  models, _, _, tests = fitted
  table = recognizer.evaluate_synthetic(models, DATA)
  floors = {"test_typical": (0.9, 0.9), "test_unusual": (0.25, 0.8)}
  for split, (ranked, y) in tests.items():
    for name in recognizer.NAMES:
      top1 = np.mean([row[0] == c for row, c in zip(ranked[name], y[:, 2])])
      top5 = np.mean([c in row[:5] for row, c in zip(ranked[name], y[:, 2])])
      assert table[name][split] == {"top1": pytest.approx(top1), "top5": pytest.approx(top5),
                                    "clips": 112}
      assert top1 >= floors[split][0] and top5 >= floors[split][1], (name, split, top1, top5)


def test_recognizers_disagree(fitted):
  """Measured at this size: their five options differ as sets on 99.1% (test_typical) /
  97.3% (test_unusual) of the clips, their top-1 on 0.9% / 31.3%."""
  _, _, _, tests = fitted
  for split, (ranked, _) in tests.items():
    a, b = ranked["A"][:, :5], ranked["B"][:, :5]
    differ = np.mean([set(p) != set(q) for p, q in zip(a, b)])
    assert differ >= 0.5, (split, differ)
  a, b = tests["test_unusual"][0]["A"], tests["test_unusual"][0]["B"]
  assert np.mean(a[:, 0] != b[:, 0]) >= 0.1


# ------------------------------------------------------------------------------ files

def test_predictions_file_round_trip(tmp_path):
  data = recognizer.SyntheticSet({"train": 40}, size=16)
  models = recognizer.fit_synthetic(data, ["A"])
  predictions = recognizer.synthetic_predictions(models["A"], data, "train", k=10)
  assert list(predictions) == [s.id for s in data.labelled("train")]
  assert all(len(r) == 10 for r in predictions.values())
  path = tmp_path / "out" / "predictions.jsonl"
  recognizer.write_predictions(path, predictions)
  assert json.loads(path.read_text().splitlines()[0]) == {
      "id": "train/000002", "ranked": predictions["train/000002"]}
  assert recognizer.read_predictions(path) == predictions


@pytest.mark.parametrize("line,message", [
    ('{"id": "v/1", "ranked": [1, 2, 3, 4, 64]}',
     r":2: field 'ranked'\[4\]: unknown class 64; expected an id in \[0, 64\)"),
    ('{"id": "v/1", "ranked": [1, 2, 3, 2, 5]}',
     r":2: field 'ranked'\[3\]: class 2 is listed twice \(first at 1\)"),
    ('{"id": "v/1", "ranked": [1, 2, 3, 4]}',
     r":2: field 'ranked': expected at least 5 class ids, found 4"),
    ('{"id": "v/1", "ranked": [1, 2, "3", 4, 5]}',
     r":2: field 'ranked'\[2\]: expected an integer class id, found '3'"),
    ('{"id": "v/1", "ranked": 7}', r":2: field 'ranked': expected a list"),
    ('{"id": "v/0", "ranked": [1, 2, 3, 4, 5]}', r":2: field 'id': clip 'v/0' is listed twice"),
    ('{"ranked": [1, 2, 3, 4, 5]}', r":2: field 'id': expected a non-empty string"),
    ('[1, 2]', r":2: expected an object with 'id' and 'ranked', found list"),
    ('{"id": "v/1", ', r":2: not valid JSON"),
])
def test_predictions_reader_errors(tmp_path, line, message):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"id": "v/0", "ranked": [0, 1, 2, 3, 4]}\n' + line + "\n")
  with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + message):
    recognizer.read_predictions(path)


def test_predictions_reader_for_users_classes(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": "P01_01/3", "ranked": [3805, 17, 2]}\n\n')
  assert recognizer.read_predictions(path, num_classes=None, k=3) == {"P01_01/3": [3805, 17, 2]}
  with pytest.raises(ValueError, match="unknown class 3805"):
    recognizer.read_predictions(path, num_classes=3806 - 1, k=3)
