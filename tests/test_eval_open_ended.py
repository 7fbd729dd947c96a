"""Open-ended evaluation: judge prompts, parsing judge replies, and the imported table."""
import json

import pytest

from mashvlm_jax.eval import open_ended


@pytest.mark.parametrize("reply,score,pred", [
    ("{'pred': 'yes', 'score': 4}", 4.0, "yes"),
    ('Here you go: {"score": 3}', 3.0, None),
    ('{"pred": "no", "score": 0}', 0.0, "no"),
    ("Score: 5. The prediction is correct. pred: yes", 5.0, "yes"),
])
def test_parse_judgment(reply, score, pred):
  assert open_ended.parse_judgment(reply) == {"score": score, "pred": pred}


@pytest.mark.parametrize("reply", ["I think it is fine.", '{"score": 7}'])
def test_parse_judgment_rejects(reply):
  with pytest.raises(ValueError, match="judge's reply"):
    open_ended.parse_judgment(reply)


def unscene_rows():
  base = dict(question="Describe the video in detail.", instruction="", answer="")
  return [
      dict(base, key="v1", id="v1", kind="unusual", action="skiing", scene="beach",
           prediction="A person skis on a beach."),
      dict(base, key="v2", id="v2", kind="unusual", action="boxing", scene="forest",
           prediction="A person boxes in a ring."),
      dict(base, key="v3", id="v3", kind="scene_only", action="", scene="library",
           prediction="An empty library."),
  ]


def test_unscene_prompts_and_import(tmp_path):
  requests = [q for row in unscene_rows() for q in open_ended.judge_requests(row, "unscene")]
  # scene-only videos are judged on the action only, against "no action"
  assert [q["key"] for q in requests] == ["v1:action", "v1:scene", "v2:action", "v2:scene",
                                          "v3:action"]
  assert "Ground-truth action: no action" in requests[-1]["messages"][1]["content"]
  assert "Ground-truth scene: beach" in requests[1]["messages"][1]["content"]
  (tmp_path / "judge_prompts.jsonl").write_text(
      "".join(json.dumps(q) + "\n" for q in requests))
  replies = {"v1:action": '{"score": 5}', "v1:scene": "{'score': 4}",
             "v2:action": '{"score": 4}', "v2:scene": 'Score: 1', "v3:action": '{"score": 3}'}
  judgments = tmp_path / "judgments.jsonl"
  judgments.write_text("".join(json.dumps({"key": k, "response": v}) + "\n"
                               for k, v in replies.items()))
  result = open_ended.import_judgments(tmp_path, judgments)
  assert result["columns"] == {"Scene-only Action": 3.0, "Unusual Action": 4.5,
                               "Unusual Scene": 2.5}
  assert result["average"] == pytest.approx(10 / 3)
  assert result["missing"] == 0
  assert "| model | 3.00 | 4.50 | 2.50 | 3.33 |" in (tmp_path / "result.md").read_text()


def test_qa_import_and_unknown_keys(tmp_path):
  rows = [dict(key=f"q{k}", id=f"q{k}", kind="", action="", scene="", question="What?",
               instruction="", answer="a dog", prediction=p)
          for k, p in enumerate(["a dog", "a cat", "dog"])]
  requests = [q for row in rows for q in open_ended.judge_requests(row, "qa")]
  (tmp_path / "judge_prompts.jsonl").write_text(
      "".join(json.dumps(q) + "\n" for q in requests))
  judgments = tmp_path / "j.jsonl"
  judgments.write_text("".join(json.dumps({"key": k, "response": r}) + "\n" for k, r in [
      ("q0:qa", "{'pred': 'yes', 'score': 5}"), ("q1:qa", "{'pred': 'no', 'score': 1}")]))
  result = open_ended.import_judgments(tmp_path, judgments)
  assert result["accuracy"] == 50.0 and result["score"] == 3.0 and result["missing"] == 1
  judgments.write_text(json.dumps({"key": "nope", "response": "{'score': 1}"}) + "\n")
  with pytest.raises(ValueError, match="not in"):
    open_ended.import_judgments(tmp_path, judgments)
