"""MVBench (paper Table 1) with the official VideoChat2 protocol.

Prompt: the instruction of data/tasks/mvbench.py as system text, the question with its
options written "(A) ...", one per line, then "Only give the best option."; the
assistant's answer is started with "Best option:(" and the model continues it (greedy).
The response is "(" + the continuation, and its first whitespace-separated token names
the option ("(B)" in "(B) a cat"). Per-task accuracy and their mean (Table 1's Avg.),
plus accuracy over all items.

Records come from ``make_eval_records`` of a split built from the MVBench JSON files
(data/annotations.py, MVBench layout: one JSON per task, ``task`` = "mvbench/<file
stem>", ``candidates``, qa[0] = {i, q, a: "(X) answer"}).
"""
from __future__ import annotations

import collections
import re

import numpy as np

from mashvlm_jax.eval import common

QUESTION_SUFFIX = "\nOnly give the best option."
ANSWER_PREFIX = "Best option:("
RETURN_PREFIX = "("
# File stems of the 20 MVBench tasks -> Table 1's column names, in Table 1's order.
TASKS = {
    "action_sequence": "AS", "action_prediction": "AP", "action_antonym": "AA",
    "fine_grained_action": "FA", "unexpected_action": "UA", "object_existence": "OE",
    "object_interaction": "OI", "object_shuffle": "OS", "moving_direction": "MD",
    "action_localization": "AL", "scene_transition": "ST", "action_count": "AC",
    "moving_count": "MC", "moving_attribute": "MA", "state_change": "SC",
    "fine_grained_pose": "FP", "character_order": "CO", "egocentric_navigation": "EN",
    "episodic_reasoning": "ER", "counterfactual_inference": "CI",
}
_PREFIX = re.compile(r"^\s*best\s+option\s*:\s*", re.IGNORECASE)
_OPTION = re.compile(r"^\(?([A-Za-z])\)?[.:,]?$")


def extract_option(response: str, num_options: int) -> str | None:
  """The option letter ("A", "B", ...) a response names, or None.

  First-token rule of the official protocol: after dropping a repeated "Best option:"
  the first whitespace-separated token must be a letter within the options, optionally
  in parentheses and followed by ".", ":" or ",": "(B) a cat" -> B, "B." -> B,
  "Best option:(C)" -> C, "(c)" -> C. A first token that is not an option letter (an
  empty "(", a word) gives None, which scores as wrong.
  """
  text = _PREFIX.sub("", response.strip())
  tokens = text.split()
  if not tokens:
    return None
  match = _OPTION.match(tokens[0])
  if not match:
    return None
  letter = match.group(1).upper()
  return letter if ord(letter) - ord("A") < num_options else None


def answer_letter(answer: str) -> str:
  """"(B) a cat" -> "B" (the stored MVBench answer)."""
  match = re.match(r"^\(([A-Z])\)", answer.strip())
  if not match:
    raise ValueError(f"MVBench answer {answer!r} does not start with an option like '(B)'")
  return match.group(1)


def task_name(task: str) -> str:
  """"mvbench/action_sequence" -> "action_sequence"."""
  return task.split("/", 1)[1] if task.startswith("mvbench/") else task


def score(predictions: list[dict]) -> dict:
  """Per-task accuracy (percent), their mean ("average", Table 1's Avg.) and accuracy
  over all items ("overall"). Rows: task, answer ("(X) ..."), response, num_options."""
  right, total = collections.Counter(), collections.Counter()
  for row in predictions:
    task = task_name(row["task"])
    total[task] += 1
    right[task] += extract_option(row["response"], row["num_options"]) == answer_letter(
        row["answer"])
  per_task = {t: 100.0 * right[t] / total[t] for t in total}
  return {"per_task": per_task, "counts": dict(total),
          "average": float(np.mean(list(per_task.values()))) if per_task else None,
          "overall": 100.0 * sum(right.values()) / max(1, sum(total.values()))}


def table(results: dict[str, dict]) -> str:
  """Markdown in Table 1's layout (known tasks in its order, then any others)."""
  tasks = sorted({t for r in results.values() for t in r["per_task"]},
                 key=lambda t: (list(TASKS).index(t) if t in TASKS else len(TASKS), t))
  header = ["Model", "Avg"] + [TASKS.get(t, t) for t in tasks] + ["Overall"]
  rows = [[name, r["average"]] + [r["per_task"].get(t, "-") for t in tasks] + [r["overall"]]
          for name, r in results.items()]
  return common.markdown_table(header, rows)


def prediction_rows(record: dict, split: str) -> list[dict]:
  rows = []
  for k, qa in enumerate(record["qa"]):
    rows.append({"key": f"{split}:{record['id']}:{k}", "split": split, "id": record["id"],
                 "task": record["task"], "question": qa["q"], "instruction": qa["i"],
                 "answer": qa["a"], "num_options": len(record["candidates"])})
  return rows


def evaluate(config, params, out_dir, *, split: str = "test", max_items: int = 0,
             batch_size: int = 8, max_new_tokens: int = 8, resume: bool = True,
             show_progress: bool = True) -> dict:
  """Generates answers for the MVBench records of ``split``; writes predictions.jsonl,
  result.json and result.md (Table 1 layout) in ``out_dir``."""
  from mashvlm_jax.eval.generate import Generator, SamplingParams
  from mashvlm_jax.model.config import ModelConfig
  prompter = common.Prompter(config)
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  todo = []
  for split_name, record in common.eval_records(config, [split], max_items):
    if not record["task"].startswith("mvbench/"):
      raise ValueError(f"record {record['id']} of split {split!r} is not an MVBench item "
                       f"(task {record['task']!r}); build the split from MVBench JSON files")
    todo += [(record["frames"], r) for r in prediction_rows(record, split_name)
             if r["key"] not in log_file]
  gen = Generator(ModelConfig.from_dict(config.model), params, prompter.tok)
  sampling = SamplingParams(max_new_tokens=max_new_tokens, eos_id=prompter.tok.eos_id,
                            stop_strings=("\n",))

  def step(chunk):
    prompts = [prompter(r["question"] + QUESTION_SUFFIX, r["instruction"], ANSWER_PREFIX)
               for _, r in chunk]
    texts = gen.generate(np.stack([f for f, _ in chunk]), prompts, sampling).texts
    return [dict(r, response=RETURN_PREFIX + t.strip()) for (_, r), t in zip(chunk, texts)]

  common.run_in_batches(todo, batch_size, step, log_file, desc="mvbench",
                        show_progress=show_progress)
  result = score(log_file.values())
  result.update(split=split, max_items=max_items)
  result["files"] = common.write_result(out_dir, result, table({"model": result}))
  return result
