"""Free-form answers judged by an external LLM (no network call is made here).

``evaluate`` generates the answers (predictions.jsonl) and writes judge_prompts.jsonl:
one chat request per judged aspect, each asking for a JSON object. Send those requests
to the judge of your choice, save its replies as JSONL lines {"key": ..., "response":
"<the judge's text>"}, and ``import_judgments`` (``mashvlm import-judgments``) turns them
into the table.

Kinds of judgment:
- "unscene": UNSCENE open-ended (paper Sec. 4.2, Table 2): the description is scored 0-5
  against the ground-truth action and, separately, the ground-truth scene; scene-only
  videos have the action label "no action" and only their action is scored. Columns:
  Scene-only Action, Unusual Action, Unusual Scene and their mean.
- "qa": open question answering with a reference answer (VCG-style zero-shot QA, Table 4):
  the judge says whether the prediction matches ("yes"/"no") and scores it 0-5; Accuracy
  (share of "yes") and mean Score.
"""
from __future__ import annotations

import ast
import collections
import json
import pathlib
import re

import numpy as np

from mashvlm_jax.eval import common

KINDS = ("unscene", "qa")
NO_ACTION = "no action"
UNSCENE_COLUMNS = (("scene_only", "action", "Scene-only Action"),
                   ("unusual", "action", "Unusual Action"), ("unusual", "scene", "Unusual Scene"))
JUDGE_SYSTEM = (
    "You grade answers that a video assistant gave about a video you cannot see. Compare "
    "the answer with the ground truth given to you and judge only what the answer says "
    "about it; synonyms and paraphrases count as matches. Reply with one JSON object and "
    "nothing else.")


def unscene_prompt(aspect: str, label: str, question: str, prediction: str) -> str:
  """The judge's user message for one UNSCENE aspect ("action" | "scene")."""
  what = {"action": "the action performed in the video ('no action' means nobody does "
                    "anything: the video shows only a scene)",
          "scene": "the scene (place) where the video takes place"}[aspect]
  return (f"Ground-truth {aspect}: {label}\n({aspect} = {what})\n\n"
          f"Question asked: {question}\nAnswer to grade: {prediction}\n\n"
          f"Score from 0 to 5 how correctly the answer describes the {aspect}: 5 = it "
          f"states the ground-truth {aspect}; 0 = it states a different {aspect} or invents "
          f"one. Reply as {{\"score\": <integer 0-5>}}.")


def qa_prompt(question: str, answer: str, prediction: str) -> str:
  """The judge's user message for a question with a reference answer."""
  return (f"Question: {question}\nReference answer: {answer}\nAnswer to grade: {prediction}"
          f"\n\nDoes the answer match the reference in meaning? Reply as {{\"pred\": \"yes\" "
          f"or \"no\", \"score\": <integer 0-5 for how well it matches>}}.")


def judge_requests(row: dict, kind: str) -> list[dict]:
  """The judge requests (key, metadata, messages) for one prediction row."""
  def request(suffix, content, **meta):
    return {"key": f"{row['key']}:{suffix}", "prediction_key": row["key"], "kind": kind,
            **meta, "messages": [{"role": "system", "content": JUDGE_SYSTEM},
                                 {"role": "user", "content": content}]}
  if kind == "qa":
    return [request("qa", qa_prompt(row["question"], row["answer"], row["prediction"]))]
  scene_only = row["kind"] == "scene_only"
  out = [request("action", unscene_prompt("action", row["action"] or NO_ACTION,
                                          row["question"], row["prediction"]),
                 video_kind=row["kind"], aspect="action")]
  if not scene_only:
    out.append(request("scene", unscene_prompt("scene", row["scene"], row["question"],
                                               row["prediction"]),
                       video_kind=row["kind"], aspect="scene"))
  return out


# ------------------------------------------------------------------------------ judgments

def parse_judgment(text: str) -> dict:
  """{"score": float, "pred": "yes" | "no" | None} from a judge's reply: the first {...}
  object (JSON or a Python literal), else "score: N" / "pred: yes" patterns. Raises
  ValueError naming the reply when no score in [0, 5] is found."""
  found = {}
  for blob in re.findall(r"\{[^{}]*\}", text):
    for loads in (json.loads, ast.literal_eval):
      try:
        value = loads(blob)
      except (ValueError, SyntaxError):
        continue
      if isinstance(value, dict):
        found = {str(k).lower(): v for k, v in value.items()}
        break
    if found:
      break
  if "score" not in found:
    match = re.search(r"score\W{0,3}(\d+(?:\.\d+)?)", text, re.IGNORECASE)
    if match:
      found["score"] = match.group(1)
  if "pred" not in found:
    match = re.search(r"pred\W{0,3}(yes|no)", text, re.IGNORECASE)
    if match:
      found["pred"] = match.group(1)
  try:
    score = float(found["score"])
  except (KeyError, TypeError, ValueError):
    raise ValueError(f"no score in the judge's reply {text[:200]!r}") from None
  if not 0 <= score <= 5:
    raise ValueError(f"score {score} outside 0-5 in the judge's reply {text[:200]!r}")
  pred = str(found.get("pred", "")).strip().lower() or None
  return {"score": score, "pred": pred if pred in ("yes", "no") else None}


def score_judgments(requests: list[dict], judgments: dict[str, dict]) -> dict:
  """Table values from the requests (judge_prompts.jsonl rows) and parsed judgments by
  request key. Requests without a judgment are counted in "missing"."""
  kinds = {r["kind"] for r in requests}
  if len(kinds) != 1:
    raise ValueError(f"judge prompts mix kinds {sorted(kinds)}")
  kind = kinds.pop()
  missing = [r["key"] for r in requests if r["key"] not in judgments]
  judged = [(r, judgments[r["key"]]) for r in requests if r["key"] in judgments]
  if kind == "qa":
    preds = [j["pred"] == "yes" for _, j in judged]
    scores = [j["score"] for _, j in judged]
    return {"kind": kind, "accuracy": 100.0 * np.mean(preds) if preds else None,
            "score": float(np.mean(scores)) if scores else None, "judged": len(judged),
            "missing": len(missing)}
  by_column = collections.defaultdict(list)
  for r, j in judged:
    by_column[(r["video_kind"], r["aspect"])].append(j["score"])
  columns = {name: float(np.mean(by_column[(k, a)])) if by_column[(k, a)] else None
             for k, a, name in UNSCENE_COLUMNS}
  present = [v for v in columns.values() if v is not None]
  return {"kind": kind, "columns": columns,
          "average": float(np.mean(present)) if len(present) == len(UNSCENE_COLUMNS) else None,
          "counts": {name: len(by_column[(k, a)]) for k, a, name in UNSCENE_COLUMNS},
          "judged": len(judged), "missing": len(missing)}


def table(result: dict, name: str = "model") -> str:
  na = lambda v: "-" if v is None else float(v)  # noqa: E731
  if result["kind"] == "qa":
    return common.markdown_table(["Model", "Acc", "Score"],
                                 [[name, na(result["accuracy"]), na(result["score"])]])
  header = ["Model"] + [n for *_, n in UNSCENE_COLUMNS] + ["Avg."]
  return common.markdown_table(header, [[name] + [na(result["columns"][n])
                                                  for *_, n in UNSCENE_COLUMNS]
                                        + [na(result["average"])]])


def read_jsonl(path) -> list[dict]:
  rows = []
  for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {number} is not JSON: {e}") from None
  return rows


def import_judgments(eval_dir, judgments_path) -> dict:
  """Reads ``eval_dir``/judge_prompts.jsonl and the judge's replies (JSONL of {"key",
  "response"}); writes result.json and result.md in ``eval_dir``; returns the result."""
  eval_dir = pathlib.Path(eval_dir)
  prompts_path = eval_dir / "judge_prompts.jsonl"
  if not prompts_path.exists():
    raise FileNotFoundError(f"{prompts_path} not found: run `mashvlm eval` with an "
                            f"open-ended benchmark first")
  requests = read_jsonl(prompts_path)
  known = {r["key"] for r in requests}
  judgments, unknown = {}, []
  for row in read_jsonl(judgments_path):
    if "key" not in row or "response" not in row:
      raise ValueError(f"{judgments_path}: every line needs 'key' and 'response', found "
                       f"{sorted(row)}")
    if row["key"] not in known:
      unknown.append(row["key"])
      continue
    judgments[row["key"]] = parse_judgment(str(row["response"]))
  if unknown:
    raise ValueError(f"{len(unknown)} judgment keys are not in {prompts_path}, e.g. "
                     f"{unknown[:3]}")
  result = score_judgments(requests, judgments)
  result["files"] = common.write_result(eval_dir, result, table(result))
  return result


# ------------------------------------------------------------------------------ running

def prediction_rows(record: dict, split: str, kind: str) -> list[dict]:
  """Rows to answer: UNSCENE "open_ended" questions, or (kind "qa") every question that
  is not a yes/no dual or multiple choice."""
  rows = []
  for k, qa in enumerate(record["qa"]):
    if kind == "unscene" and qa["task"] != "open_ended":
      continue
    if kind == "qa" and qa["task"] in ("unscene_binary", "mvbench"):
      continue
    rows.append({"key": f"{split}:{record['id']}:{k}", "split": split, "id": record["id"],
                 "kind": record["kind"], "action": record["action"], "scene": record["scene"],
                 "question": qa["q"], "instruction": qa["i"], "answer": qa["a"]})
  return rows


def evaluate(config, params, out_dir, *, kind: str = "unscene", splits=None,
             max_items: int = 0, batch_size: int = 8, max_new_tokens: int = 64,
             resume: bool = True, show_progress: bool = True) -> dict:
  """Generates answers (greedy) and writes predictions.jsonl and judge_prompts.jsonl."""
  if kind not in KINDS:
    raise ValueError(f"open-ended kind must be one of {KINDS}, found {kind!r}")
  from mashvlm_jax.eval.generate import Generator, SamplingParams
  from mashvlm_jax.model.config import ModelConfig
  splits = list(splits or config.data.eval_splits)
  prompter = common.Prompter(config)
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  todo = [(record["frames"], row) for split, record in common.eval_records(
      config, splits, max_items) for row in prediction_rows(record, split, kind)
      if row["key"] not in log_file]
  gen = Generator(ModelConfig.from_dict(config.model), params, prompter.tok)
  sampling = SamplingParams(max_new_tokens=max_new_tokens, eos_id=prompter.tok.eos_id,
                            stop_strings=(prompter.template.user,))

  def step(chunk):
    prompts = [prompter(r["question"], r["instruction"]) for _, r in chunk]
    texts = gen.generate(np.stack([f for f, _ in chunk]), prompts, sampling).texts
    return [dict(r, prediction=t.strip()) for (_, r), t in zip(chunk, texts)]

  common.run_in_batches(todo, batch_size, step, log_file, desc=f"open-ended {kind}",
                        show_progress=show_progress)
  requests = [q for row in log_file.values() for q in judge_requests(row, kind)]
  path = pathlib.Path(out_dir) / "judge_prompts.jsonl"
  path.write_text("".join(json.dumps(q) + "\n" for q in requests))
  result = {"kind": kind, "splits": splits, "predictions": len(log_file.values()),
            "judge_prompts": str(path), "status": "awaiting judgments"}
  note = (f"{len(requests)} judge prompts in {path}. Send each request's messages to the "
          f"judge, save JSONL lines {{\"key\", \"response\"}} and run `mashvlm "
          f"import-judgments --eval_dir={out_dir} --judgments=FILE`.")
  result["files"] = common.write_result(out_dir, result, note)
  return result
