"""The synthetic benchmark (data/synthetic.py): its test splits through the UNSCENE binary
scorer (unscene.py), plus a label probe that shows action-scene hallucination directly.

Label probe: for "What is the person doing?" and "Where does this video take place?" the
model ranks every answer the evaluated records contain (log-likelihood of the answer and
its </s>). On ``test_unusual`` (an action outside its usual scene) a model that reads the
scene instead of the motion names the scene's typical action: that share is reported as
the hallucinated-action rate.
"""
from __future__ import annotations

import collections
import pathlib

import numpy as np

from mashvlm_jax.eval import common, unscene

LABEL_TASKS = ("action", "scene")


def _label_rows(record: dict, split: str, tasks=LABEL_TASKS) -> list[dict]:
  rows = []
  for k, qa in enumerate(record["qa"]):
    if qa["task"] in tasks:
      rows.append({"key": f"{split}:{record['id']}:{k}", "split": split, "id": record["id"],
                   "kind": record["kind"], "task": qa["task"], "question": qa["q"],
                   "instruction": qa["i"], "answer": qa["a"], "action": record["action"],
                   "scene": record["scene"]})
  return rows


def score_labels(predictions: list[dict]) -> dict:
  """Accuracy (percent) per split and task, and on test_unusual the hallucinated-action
  rate: predictions naming the typical action of the clip's scene."""
  from mashvlm_jax.data import synthetic
  right, total = collections.Counter(), collections.Counter()
  answer_of = {r["action"]: r["answer"] for r in predictions
               if r["task"] == "action" and r["action"]}
  hallucinated = unusual = 0
  for r in predictions:
    key = f"{r['split']}/{r['task']}"
    total[key] += 1
    right[key] += r["prediction"] == r["answer"]
    if r["task"] == "action" and r["kind"] == "unusual":
      unusual += 1
      typical = answer_of.get(synthetic.TYPICAL_ACTION.get(r["scene"], ""))
      hallucinated += typical is not None and r["prediction"] == typical
  accuracy = {k: 100.0 * right[k] / total[k] for k in sorted(total)}
  return {"accuracy": accuracy, "counts": dict(total),
          "hallucinated_action_rate": 100.0 * hallucinated / unusual if unusual else None}


def evaluate_labels(config, params, out_dir, *, splits=None, tasks=LABEL_TASKS,
                    max_items: int = 0, clips_per_batch: int = 8, resume: bool = True,
                    show_progress: bool = True) -> dict:
  """Runs the label probe (``tasks``: "action" and/or "scene") on ``splits`` (default
  config.data.eval_splits); writes predictions.jsonl and result.{json,md} in ``out_dir``."""
  from mashvlm_jax.eval.scoring import Scorer
  from mashvlm_jax.model.config import ModelConfig
  splits = list(splits or config.data.eval_splits)
  prompter = common.Prompter(config)
  tok = prompter.tok
  per_clip = [(s, r, _label_rows(r, s, tasks))
              for s, r in common.eval_records(config, splits, max_items)]
  candidates = {t: sorted({row["answer"] for *_, rows in per_clip for row in rows
                           if row["task"] == t}) for t in tasks}
  encoded = {t: [tok.encode(a) + [tok.eos_id] for a in c] for t, c in candidates.items()}
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  todo = [(r["frames"], [x for x in rows if x["key"] not in log_file])
          for _, r, rows in per_clip]
  todo = [(f, rows) for f, rows in todo if rows]
  scorer = Scorer(ModelConfig.from_dict(config.model), params, tok.pad_id)
  width = int(config.data.text_len)

  def step(chunk):
    frames = np.stack([f for f, _ in chunk])
    clip, prompts, answers, spans = [], [], [], []
    for c, (_, rows) in enumerate(chunk):
      for row in rows:
        prompt = prompter(row["question"], row["instruction"])
        spans.append((len(answers), len(encoded[row["task"]])))
        for ans in encoded[row["task"]]:
          clip.append(c)
          prompts.append(prompt)
          answers.append(ans)
    logp = scorer.answer_logprobs(frames, clip, prompts, answers,
                                  text_len=max(width, max(len(p) + len(a) for p, a in
                                                          zip(prompts, answers))))
    done = []
    rows = [row for _, rows in chunk for row in rows]
    for row, (begin, count) in zip(rows, spans):
      best = int(np.argmax(logp[begin:begin + count]))
      done.append(dict(row, prediction=candidates[row["task"]][best]))
    return done

  common.run_in_batches(todo, clips_per_batch, step, log_file, desc="synthetic labels",
                        show_progress=show_progress, total=sum(len(r) for _, r in todo))
  result = score_labels(log_file.values())
  result.update(splits=splits, max_items=max_items, candidates=candidates)
  header = ["split/task", "accuracy %", "items"]
  rows = [[k, v, result["counts"][k]] for k, v in result["accuracy"].items()]
  rate = result["hallucinated_action_rate"]
  markdown = common.markdown_table(header, rows) + (
      f"\n\nHallucinated action on test_unusual (the scene's typical action): {rate:.2f}%"
      if rate is not None else "")
  result["files"] = common.write_result(out_dir, result, markdown)
  return result


def evaluate(config, params, out_dir, *, max_items: int = 0, probe_splits=None,
             probe_tasks=LABEL_TASKS, resume: bool = True, show_progress: bool = True) -> dict:
  """Both parts: UNSCENE binary (likelihood) over the synthetic eval splits and the label
  probe (on ``probe_splits``, default the same splits); ``out_dir``/binary and
  ``out_dir``/labels, and a combined result."""
  binary = unscene.evaluate_binary(config, params, f"{out_dir}/binary", mode="likelihood",
                                   max_items=max_items, resume=resume,
                                   show_progress=show_progress)
  labels = evaluate_labels(config, params, f"{out_dir}/labels", splits=probe_splits,
                           tasks=probe_tasks, max_items=max_items, resume=resume,
                           show_progress=show_progress)
  result = {"binary": binary, "labels": labels}
  markdown = (unscene.binary_table({"model": binary}) + "\n\n"
              + pathlib.Path(labels["files"]["markdown"]).read_text())
  result["files"] = common.write_result(out_dir, result, markdown)
  return result
