"""MVBench answer extraction on the formats models produce, and per-task scoring."""
import pytest

from mashvlm_jax.eval import mvbench


@pytest.mark.parametrize("response,want", [
    ("(B) a cat", "B"),
    ("B.", "B"),
    ("Best option:(C)", "C"),
    ("Best option: (A) the man opens the door", "A"),
    ("(c) a dog", "C"),
    ("  (D)", "D"),
    ("A) walking", "A"),
    ("B: the red one", "B"),
    ("(E) too far", None),  # only 4 options
    ("(", None),
    ("", None),
    ("The answer is B", None),  # first token is not an option
    ("(B)a", None),
])
def test_extract_option(response, want):
  assert mvbench.extract_option(response, num_options=4) == want


def test_answer_letter_and_errors():
  assert mvbench.answer_letter("(C) the third one") == "C"
  with pytest.raises(ValueError, match="option like"):
    mvbench.answer_letter("the third one")


def test_score_per_task_and_average():
  rows = [
      # action_sequence: 2 of 3 right
      dict(task="mvbench/action_sequence", answer="(A) x", response="(A) x", num_options=4),
      dict(task="mvbench/action_sequence", answer="(B) y", response="B.", num_options=4),
      dict(task="mvbench/action_sequence", answer="(C) z", response="(D) w", num_options=4),
      # object_shuffle: 1 of 1 right
      dict(task="mvbench/object_shuffle", answer="(C) z", response="(C)", num_options=3),
  ]
  result = mvbench.score(rows)
  assert result["per_task"] == pytest.approx({"action_sequence": 200 / 3,
                                              "object_shuffle": 100.0})
  assert result["average"] == pytest.approx((200 / 3 + 100) / 2)
  assert result["overall"] == pytest.approx(75.0)
  table = mvbench.table({"m": result})
  assert table.splitlines()[0] == "| Model | Avg | AS | OS | Overall |"


@pytest.mark.slow
def test_evaluate_reads_the_mvbench_json_layout(tmp_path):
  """Two MVBench task files -> local_video_qa split -> generated answers of a random tiny
  model, scored per task; a rerun resumes from predictions.jsonl."""
  import json

  import flax.linen as nn
  import jax

  from conftest import load_config
  from mashvlm_jax.data import registry, tokenizer
  from mashvlm_jax.model import mashvlm
  from mashvlm_jax.model.config import ModelConfig
  from test_data_video import write_indexed_mp4
  videos, bench = tmp_path / "videos", tmp_path / "mvbench"
  videos.mkdir()
  bench.mkdir()
  for k in range(3):
    write_indexed_mp4(videos / f"v{k}.mp4", 12, width=32, height=32)
  items = {"action_sequence": [("What happened?", ["sat", "ran", "hid"], "ran"),
                               ("Then?", ["slept", "ate"], "slept")],
           "object_shuffle": [("Where is it?", ["left", "right", "middle"], "middle")]}
  for task, rows in items.items():
    (bench / f"{task}.json").write_text(json.dumps([
        {"video": f"v{k}.mp4", "question": q, "candidates": c, "answer": a}
        for k, (q, c, a) in enumerate(rows)]))
  tok_path = tmp_path / "tokenizer.json"
  tokenizer.save_atomic(tokenizer.build_word_tokenizer(
      ["USER: ASSISTANT: Question Options Best option Only give the best", "sat ran hid"]),
      tok_path)
  config = load_config("tiny_synthetic")
  config.data.update(name="local_video_qa", data_dir=str(tmp_path / "cache"),
                     video_root=str(videos), annotations={"mvbench": str(bench)},
                     stored_frames=8, stored_size=64)
  config.data.tokenizer.update(kind="hf", path=str(tok_path))
  registry.ensure_built(config)
  params = nn.unbox(mashvlm.init_params(ModelConfig.from_dict(config.model),
                                        jax.random.PRNGKey(0)))
  result = mvbench.evaluate(config, params, tmp_path / "out", split="mvbench",
                            max_new_tokens=3, show_progress=False)
  assert result["counts"] == {"action_sequence": 2, "object_shuffle": 1}
  rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").open()]
  assert all(r["response"].startswith("(") for r in rows)
  assert {r["num_options"] for r in rows} == {2, 3}
  again = mvbench.evaluate(config, params, tmp_path / "out", split="mvbench",
                           max_new_tokens=3, show_progress=False)
  assert again["per_task"] == result["per_task"]
