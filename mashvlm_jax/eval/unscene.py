"""UNSCENE binary evaluation (paper Sec. 4.2, Table 2): dual yes/no questions per video.

A dual (the questions of one video sharing ``pair``: the ground-truth label -> "Yes", the
hallucination label -> "No") scores only when every one of its questions is answered
correctly, so a model that always says "yes" (or always "no") scores 0. Columns:
Scene-only Action, Unusual Action, Unusual Scene (percent of duals) and their mean, as in
Table 2; the synthetic set's ``typical`` split (action and scene where they usually
occur) is reported beside them as a control, outside the average.

Predictions come from generation (answer text -> yes/no, ``parse_yes_no``) or from the
likelihood of the first answer token ("Yes" vs "No"), both resumable from a JSONL.
"""
from __future__ import annotations

import collections
import re

import numpy as np

from mashvlm_jax.eval import common

TASK = "unscene_binary"
COLUMNS = (("scene_only", "action", "Scene-only Action"), ("unusual", "action", "Unusual Action"),
           ("unusual", "scene", "Unusual Scene"))
CONTROLS = (("typical", "action", "Typical Action"), ("typical", "scene", "Typical Scene"))
MODES = ("likelihood", "generate")
_WORDS = re.compile(r"[a-z]+")


# ------------------------------------------------------------------------------ scoring

def parse_yes_no(text: str) -> str | None:
  """"yes" | "no" | None from an answer: its first word when that is yes/no ("Yes, there
  is...", "no."), else the only one of the two words it contains; None otherwise."""
  words = _WORDS.findall(text.lower())
  if not words:
    return None
  if words[0] in ("yes", "no"):
    return words[0]
  found = {w for w in words if w in ("yes", "no")}
  return found.pop() if len(found) == 1 else None


def is_correct(prediction: dict) -> bool:
  """A prediction row is right when its parsed answer equals the gold yes/no."""
  return parse_yes_no(prediction["prediction"]) == parse_yes_no(prediction["answer"])


def score_binary(predictions: list[dict]) -> dict:
  """Dual accuracy per (kind, aspect) from prediction rows.

  Each row: id (video), kind ("unusual" | "scene_only" | "typical"), aspect ("action" |
  "scene"), pair (dual id within the video), answer (gold "Yes"/"No"), prediction (text).
  Returns {"columns": {name: percent or None}, "average": mean of the three Table 2
  columns (None unless all three have duals), "controls": {...}, "counts": {name: duals},
  "questions": n, "question_accuracy": percent, "incomplete_pairs": duals with a single
  question (left out)}.
  """
  groups = collections.defaultdict(list)
  for row in predictions:
    groups[(row.get("split", ""), row["id"], int(row["pair"]))].append(row)
  right = collections.Counter()
  total = collections.Counter()
  incomplete = 0
  for rows in groups.values():
    if len(rows) < 2:
      incomplete += 1
      continue
    kinds = {(r["kind"], r["aspect"]) for r in rows}
    if len(kinds) != 1:
      raise ValueError(f"dual {rows[0]['id']} pair {rows[0]['pair']} mixes kinds/aspects "
                       f"{sorted(kinds)}")
    key = kinds.pop()
    total[key] += 1
    right[key] += all(is_correct(r) for r in rows)
  pct = lambda key: 100.0 * right[key] / total[key] if total[key] else None  # noqa: E731
  columns = {name: pct((k, a)) for k, a, name in COLUMNS}
  controls = {name: pct((k, a)) for k, a, name in CONTROLS}
  present = [v for v in columns.values() if v is not None]
  counts = {name: total[(k, a)] for k, a, name in COLUMNS + CONTROLS}
  correct = sum(is_correct(r) for r in predictions)
  return {"columns": columns,
          "average": float(np.mean(present)) if len(present) == len(COLUMNS) else None,
          "controls": controls, "counts": counts, "questions": len(predictions),
          "question_accuracy": 100.0 * correct / max(1, len(predictions)),
          "incomplete_pairs": incomplete}


def binary_table(results: dict[str, dict]) -> str:
  """Markdown in Table 2's layout: one row per model name -> score_binary result."""
  header = ["Model"] + [n for *_, n in COLUMNS] + ["Avg."] + [n for *_, n in CONTROLS]
  na = lambda v: "-" if v is None else float(v)  # noqa: E731
  rows = [[name] + [na(r["columns"][n]) for *_, n in COLUMNS] + [na(r["average"])]
          + [na(r["controls"][n]) for *_, n in CONTROLS] for name, r in results.items()]
  return common.markdown_table(header, rows)


# ------------------------------------------------------------------------------ running

def binary_rows(record: dict, split: str) -> list[dict]:
  """The prediction rows (without prediction) of one evaluation record."""
  rows = []
  for k, qa in enumerate(record["qa"]):
    if qa["task"] != TASK:
      continue
    rows.append({"key": f"{split}:{record['id']}:{k}", "split": split, "id": record["id"],
                 "kind": record["kind"], "aspect": qa["aspect"], "pair": qa["pair"],
                 "question": qa["q"], "instruction": qa["i"], "answer": qa["a"]})
  return rows


def evaluate_binary(config, params, out_dir, *, splits=None, mode: str = "likelihood",
                    max_items: int = 0, clips_per_batch: int = 16, max_new_tokens: int = 8,
                    resume: bool = True, show_progress: bool = True) -> dict:
  """Runs the dual questions of ``splits`` (default config.data.eval_splits); writes
  predictions.jsonl, result.json and result.md in ``out_dir``; returns the result.

  mode "likelihood": answer = the likelier of the "Yes" and "No" first tokens (one
  forward per question, the video shared); "generate": greedy answer text, parsed.
  ``max_items``: clips per split (0 = all).
  """
  if mode not in MODES:
    raise ValueError(f"UNSCENE binary mode must be one of {MODES}, found {mode!r}")
  from mashvlm_jax.model.config import ModelConfig
  splits = list(splits or config.data.eval_splits)
  model_cfg = ModelConfig.from_dict(config.model)
  prompter = common.Prompter(config)
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  todo = []
  for split, record in common.eval_records(config, splits, max_items):
    rows = [r for r in binary_rows(record, split) if r["key"] not in log_file]
    if rows:
      todo.append((record["frames"], rows))
  run = _likelihood_runner if mode == "likelihood" else _generate_runner
  step = run(model_cfg, params, prompter, config, max_new_tokens)
  finished = len(log_file.values())
  common.run_in_batches(todo, clips_per_batch, step, log_file, desc=f"unscene {mode}",
                        show_progress=show_progress,
                        total=finished + sum(len(rows) for _, rows in todo),
                        initial=finished)
  result = score_binary(log_file.values())
  result.update(mode=mode, splits=splits, max_items=max_items)
  result["files"] = common.write_result(out_dir, result,
                                        binary_table({"model": result}))
  return result


def _likelihood_runner(model_cfg, params, prompter, config, max_new_tokens):
  from mashvlm_jax.eval.scoring import Scorer
  del max_new_tokens
  scorer = Scorer(model_cfg, params, prompter.tok.pad_id)
  yes, no = prompter.token("Yes"), prompter.token("No")
  text_len = int(config.data.text_len)

  def step(chunk):
    frames, rows, clip = common.chunk_rows(chunk)
    prompts = [prompter(r["question"], r["instruction"]) for r in rows]
    width = max(text_len, max(len(p) for p in prompts))
    clip, prompts = common.pad_rows(clip, prompts)
    probs = scorer.yes_probability(frames, clip, prompts, yes, no, text_len=width)
    out = []
    for r, p in zip(rows, probs["p_yes_vs_no"]):
      out.append(dict(r, prediction="Yes" if p > 0.5 else "No", p_yes=float(p)))
    return out
  return step


def _generate_runner(model_cfg, params, prompter, config, max_new_tokens):
  from mashvlm_jax.eval.generate import Generator, SamplingParams
  del config
  gen = Generator(model_cfg, params, prompter.tok)
  sampling = SamplingParams(max_new_tokens=max_new_tokens, eos_id=prompter.tok.eos_id,
                            stop_strings=("\n", "USER:"))

  def step(chunk):
    frames = np.stack([f for f, rows in chunk for _ in rows])
    rows = [r for _, rows in chunk for r in rows]
    prompts = [prompter(r["question"], r["instruction"]) for r in rows]
    texts = gen.generate(frames, prompts, sampling).texts
    return [dict(r, prediction=t.strip()) for r, t in zip(rows, texts)]
  return step
