"""MVBench answer extraction on the formats models produce, per-task scoring, and the
evaluator end to end on MVBench JSON files (values, table, resume)."""
import collections
import json
import types

import flax.linen as nn
import jax
import pytest

from conftest import load_config
from mashvlm_jax.data import pipeline, registry, tokenizer
from mashvlm_jax.data.tasks import mvbench as mvbench_task
from mashvlm_jax.eval import mvbench
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from test_data_video import write_indexed_mp4
from test_eval_values import (FullForward, count_work, greedy_texts, read_jsonl, sharpened,
                              snapshot, training_example)


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


# The official VideoChat2 MVBench prompt (written out: the evaluator's constants are what
# is checked): the question ends with this line, the answer starts with "Best option:(".
QUESTION_SUFFIX = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
ITEMS = {"action_sequence": [("What happened?", ["sat", "ran", "hid"], "ran"),
                             ("Then?", ["slept", "ate"], "slept")],
         "object_shuffle": [("Where is it?", ["left", "right", "middle"], "middle")]}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """Two MVBench task files (3 items, videos of 12/16/20 frames) built into a
  local_video_qa split "mvbench", a word tokenizer of their words, and sharpened random
  weights of the tiny model at 32x32 with 2 decoder layers."""
  root = tmp_path_factory.mktemp("mvbench")
  videos, tasks = root / "videos", root / "tasks"
  videos.mkdir()
  tasks.mkdir()
  for k in range(3):
    write_indexed_mp4(videos / f"v{k}.mp4", 12 + 4 * k, width=32, height=32)
  for task, rows in ITEMS.items():
    (tasks / f"{task}.json").write_text(json.dumps([
        {"video": f"v{k}.mp4", "question": q, "candidates": c, "answer": a}
        for k, (q, c, a) in enumerate(rows)]))
  tok_path = root / "tokenizer.json"
  words = [mvbench_task.INSTRUCTION, "USER: ASSISTANT:", QUESTION_SUFFIX, ANSWER_PREFIX]
  words += [qa[f] for rows in ITEMS.values() for q, c, a in rows
            for qa in mvbench_task.questions(q, c, a) for f in ("q", "a")]
  tokenizer.save_atomic(tokenizer.build_word_tokenizer(words), tok_path)
  config = load_config("tiny_synthetic")
  config.model.vision.image_size = 32
  config.model.llm.num_layers = 2
  config.model.llm.vocab_size = 128
  config.data.update(name="local_video_qa", data_dir=str(root / "cache"),
                     video_root=str(videos), annotations={"mvbench": str(tasks)},
                     stored_frames=8, stored_size=64)
  config.data.tokenizer.update(kind="hf", path=str(tok_path))
  registry.ensure_built(config)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  tok = registry.load_tokenizer(config)
  assert tok.impl.get_vocab_size() <= 128
  return types.SimpleNamespace(config=config, params=params, tok=tok,
                               reference=FullForward(cfg, params, width=96, rows=4))


def test_evaluate_reads_the_mvbench_json_layout_and_resumes(bench, tmp_path):
  """MVBench JSON files -> rows in the task layout; each response is "(" + the greedy full
  forward's continuation of the training prompt (question + "Only give the best option.")
  followed by "Best option:("; the table follows from the rows; a rerun computes nothing."""
  config, tok = bench.config, bench.tok
  with count_work() as work:
    result = mvbench.evaluate(config, bench.params, tmp_path, split="mvbench",
                              max_new_tokens=3, batch_size=2, show_progress=False)
  assert result["counts"] == {"action_sequence": 2, "object_shuffle": 1}
  rows = read_jsonl(tmp_path / "predictions.jsonl")
  assert work["generated_rows"] == work["rows_written"] == len(rows) == 3
  stored = {r["id"]: r for r in rows}
  source = registry.data_source(config, "mvbench")
  # the training row of the same question, untruncated (text_len 32 would cut the head)
  long_text = config.copy_and_resolve_references()
  long_text.data.text_len = 128
  transform = pipeline.example_transform(long_text, "mvbench")
  raws = [source[i] for i in range(len(source))]
  want_rows = {}
  for raw in raws:
    record = pipeline.decode_record(raw)
    task = mvbench.task_name(record["task"])
    item = next(k for k, (q, *_) in enumerate(ITEMS[task]) if q in record["qa"][0]["q"])
    question, candidates, answer = ITEMS[task][item]
    (qa,) = mvbench_task.questions(question, candidates, answer)
    row = stored[record["id"]]
    assert (row["question"], row["instruction"], row["answer"], row["num_options"]) == (
        qa["q"], qa["i"], qa["a"], len(candidates))
    example = training_example(transform, raw, 0, question=qa["q"] + QUESTION_SUFFIX)
    want_rows[record["id"]] = (example["prompt"] + tok.encode(ANSWER_PREFIX),
                               example["frames"])
  prompts, frames = zip(*(want_rows[r["id"]] for r in rows))
  texts = greedy_texts(bench.reference, tok, frames, prompts, 3, ("\n",))
  assert [r["response"] for r in rows] == ["(" + t.strip() for t in texts]
  assert len({r["response"] for r in rows}) > 1  # answers depend on question and video
  # Table 1 numbers from the rows: first-token option vs the answer's letter, per task
  right = collections.defaultdict(list)
  for r in rows:
    right[mvbench.task_name(r["task"])].append(
        mvbench.extract_option(r["response"], r["num_options"]) == mvbench.answer_letter(
            r["answer"]))
  per_task = {t: 100.0 * sum(v) / len(v) for t, v in right.items()}
  assert result["per_task"] == pytest.approx(per_task)
  assert result["average"] == pytest.approx(sum(per_task.values()) / len(per_task))
  assert result["overall"] == pytest.approx(100.0 * sum(map(sum, right.values())) / 3)
  line = (f"| model | {result['average']:.2f} | {per_task['action_sequence']:.2f} | "
          f"{per_task['object_shuffle']:.2f} | {result['overall']:.2f} |")
  assert line in (tmp_path / "result.md").read_text().splitlines()
  before = snapshot(tmp_path)
  with count_work() as work:
    again = mvbench.evaluate(config, bench.params, tmp_path, split="mvbench",
                             max_new_tokens=3, batch_size=2, show_progress=False)
  assert work == {}  # nothing generated, no row appended
  assert again == result and snapshot(tmp_path) == before
