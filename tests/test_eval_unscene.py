"""The UNSCENE binary scorer on hand-made predictions (dual rule, Table 2 columns)."""
import json

import pytest

from mashvlm_jax.eval import common, unscene

# video id -> (kind, [(aspect, pair, gold answer), ...]) in the UNSCENE layout
VIDEOS = {
    "u1": ("unusual", [("action", 0, "Yes"), ("action", 0, "No"),
                       ("scene", 1, "Yes"), ("scene", 1, "No")]),
    "u2": ("unusual", [("action", 0, "Yes"), ("action", 0, "No"),
                       ("scene", 1, "Yes"), ("scene", 1, "No")]),
    "s1": ("scene_only", [("action", 0, "No"), ("action", 0, "Yes")]),
    "t1": ("typical", [("action", 0, "Yes"), ("action", 0, "No"),
                       ("scene", 1, "Yes"), ("scene", 1, "No")]),
}


def predictions(answer_fn):
  """Rows for every question; answer_fn(video, question index, gold) -> prediction text."""
  rows = []
  for vid, (kind, questions) in VIDEOS.items():
    for k, (aspect, pair, gold) in enumerate(questions):
      rows.append({"key": f"{vid}:{k}", "id": vid, "kind": kind, "aspect": aspect,
                   "pair": pair, "answer": gold, "prediction": answer_fn(vid, k, gold)})
  return rows


@pytest.mark.parametrize("constant", ["Yes", "yes, there is someone skiing.", "No", "no."])
def test_constant_answer_scores_zero(constant):
  result = unscene.score_binary(predictions(lambda v, k, gold: constant))
  assert result["columns"] == {"Scene-only Action": 0.0, "Unusual Action": 0.0,
                               "Unusual Scene": 0.0}
  assert result["average"] == 0.0
  assert result["controls"] == {"Typical Action": 0.0, "Typical Scene": 0.0}
  assert result["question_accuracy"] == 50.0  # half the answers are right, no dual is


def test_perfect_answers_score_100():
  result = unscene.score_binary(predictions(lambda v, k, gold: f"{gold}, indeed."))
  assert result["average"] == 100.0
  assert result["counts"] == {"Scene-only Action": 1, "Unusual Action": 2,
                              "Unusual Scene": 2, "Typical Action": 1, "Typical Scene": 1}


def test_mixed_answers_hand_computed():
  """u1: action dual right, scene dual one wrong; u2: action one wrong, scene right; s1
  right; t1 all wrong. -> Scene-only 100, Unusual Action 50, Unusual Scene 50,
  Avg (100 + 50 + 50) / 3."""
  flip = {"Yes": "No", "No": "Yes"}
  wrong = {("u1", 3), ("u2", 0), ("t1", 0), ("t1", 1), ("t1", 2), ("t1", 3)}
  rows = predictions(lambda v, k, gold: flip[gold] if (v, k) in wrong else gold)
  result = unscene.score_binary(rows)
  assert result["columns"] == {"Scene-only Action": 100.0, "Unusual Action": 50.0,
                               "Unusual Scene": 50.0}
  assert result["average"] == pytest.approx(200.0 / 3)
  assert result["controls"] == {"Typical Action": 0.0, "Typical Scene": 0.0}
  assert result["question_accuracy"] == pytest.approx(100.0 * 8 / 14)
  table = unscene.binary_table({"mixed": result})
  assert "| mixed | 100.00 | 50.00 | 50.00 | 66.67 | 0.00 | 0.00 |" in table


def test_unparseable_answer_is_wrong_and_single_questions_are_left_out():
  rows = predictions(lambda v, k, gold: gold)
  rows[0]["prediction"] = "I cannot tell."  # u1 action dual now fails
  rows = [r for r in rows if r["key"] != "s1:1"]  # scene-only dual incomplete
  result = unscene.score_binary(rows)
  assert result["columns"]["Unusual Action"] == 50.0
  assert result["columns"]["Scene-only Action"] is None and result["average"] is None
  assert result["incomplete_pairs"] == 1


@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("yes.", "yes"), ("No, there is no one skiing in the video.", "no"),
    ("Yes, there is someone skiing in the snowy field.", "yes"),
    ("The answer is no.", "no"), ("Maybe", None), ("", None), ("Maybe yes, maybe no.", None),
    ("yes and no", "yes"),  # the first word decides
])
def test_parse_yes_no(text, want):
  assert unscene.parse_yes_no(text) == want


def test_prediction_log_resumes_and_drops_a_torn_line(tmp_path):
  path = tmp_path / "predictions.jsonl"
  path.write_text(json.dumps({"key": "a", "x": 1}) + "\n" + '{"key": "b", "x"')
  log = common.PredictionLog(path)
  assert "a" in log and "b" not in log
  log.add([{"key": "b", "x": 2}])
  assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]
  assert "a" not in common.PredictionLog(path, resume=False)
