"""Caption entailment (HACA, Sec. 4): pair accuracy and text-to-video retrieval mAP.

Every caption is asked as "Does this caption accurately describe the video? Caption: {W}"
(data/tasks/haca.py) and scored by P(yes): the full-vocabulary probability of "Yes" as the
first answer token (eval/scoring.py, one pass per row over the clip's shared video).

``entailment``: a pair (a caption that describes the clip, one that does not) counts only
when P(yes | positive) > P(yes | negative) strictly; reported overall, per contrast type
and per split. Synthetic clips are paired with their contrast captions (haca.eval_pairs:
action and scene swaps, a person added to an empty scene); users' VELOCITI-style records
carry their pairs (haca.PAIR rows).

``retrieval``: every text query ranks the clips of a pool by P(yes); AP is the mean of
the precision at each relevant clip's rank (non-interpolated) and mAP its mean over the
queries. On the synthetic set the queries are the action captions ("A person is
skiing.") and the pools are the first N clips of test_unusual (actions outside their
usual scene) and, as a control, of test_typical, N the same for both; users' SSv2-style
splits are pools whose queries are their distinct label texts.

Results are percentages (result.json): entailment "pair_accuracy", "by_type", "by_split";
retrieval "map" (per pool) and "ap" (per pool and query).
"""
from __future__ import annotations

import collections
import zlib

import numpy as np

from mashvlm_jax.eval import common
from mashvlm_jax.data.tasks import haca

SYNTHETIC_POOLS = (("unusual", "test_unusual"), ("typical", "test_typical"))


# ------------------------------------------------------------------------------ metrics

def pair_accuracy(p_pos, p_neg) -> float:
  """Fraction of pairs with P(yes | positive) > P(yes | negative), strictly (ties fail)."""
  p_pos, p_neg = np.asarray(p_pos, np.float64), np.asarray(p_neg, np.float64)
  if p_pos.shape != p_neg.shape or p_pos.ndim != 1 or not p_pos.size:
    raise ValueError(f"pair_accuracy needs two equal-length non-empty 1-D arrays, found "
                     f"shapes {p_pos.shape} and {p_neg.shape}")
  return float(np.mean(p_pos > p_neg))


def average_precision(scores, relevant) -> float:
  """Non-interpolated AP of one query: items ranked by ``scores`` [N] (descending; ties in
  the given order), the mean over relevant items of the precision at their rank."""
  scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
  if scores.shape != relevant.shape or scores.ndim != 1:
    raise ValueError(f"scores and relevant must be equal-length 1-D arrays, found shapes "
                     f"{scores.shape} and {relevant.shape}")
  if not relevant.any():
    raise ValueError("average_precision: the query has no relevant item")
  hits = relevant[np.argsort(-scores, kind="stable")]
  ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the relevant items
  return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def mean_average_precision(scores, relevant) -> float:
  """Mean over queries of ``average_precision``: ``scores`` and ``relevant`` are [Q, N]."""
  scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
  if scores.ndim != 2 or scores.shape != relevant.shape or not scores.shape[0]:
    raise ValueError(f"scores and relevant must be equal [Q, N] arrays with Q >= 1, found "
                     f"shapes {scores.shape} and {relevant.shape}")
  return float(np.mean([average_precision(s, r) for s, r in zip(scores, relevant)]))


# ------------------------------------------------------------------------------ rows

def _clip_rng(record_id: str) -> np.random.Generator:
  """The same draw for a clip in every run (its "other label" contrasts)."""
  return np.random.default_rng(zlib.crc32(record_id.encode()))


def pair_rows(record: dict, split: str) -> list[dict]:
  """Prediction rows (without p_yes) of a record's caption pairs: its haca.PAIR rows, or
  for a synthetic clip its contrast pairs (haca.eval_pairs)."""
  rows = [q for q in record["qa"] if q["task"] == haca.PAIR]
  if not rows and record["task"] == "synthetic":
    rows = haca.eval_pairs(record["action"], record["scene"], _clip_rng(record["id"]))
  return [{"key": f"{split}:{record['id']}:{k}", "split": split, "id": record["id"],
           "kind": record["kind"], "type": q["aspect"], "pair": int(q["pair"]),
           "caption": q["q"], "answer": q["a"]} for k, q in enumerate(rows)]


def score_pairs(predictions: list[dict]) -> dict:
  """Pair accuracy (percent) overall, per contrast type and per split from rows with
  split, id, pair, type, answer ("Yes"/"No") and p_yes; a pair needs exactly one of
  each answer (others are counted in "incomplete_pairs" and left out)."""
  groups = collections.defaultdict(list)
  for row in predictions:
    groups[(row["split"], row["id"], int(row["pair"]))].append(row)
  pos, neg, types, splits, incomplete = [], [], [], [], 0
  for (split, _, _), rows in sorted(groups.items()):
    yes = [r for r in rows if r["answer"] == "Yes"]
    no = [r for r in rows if r["answer"] == "No"]
    if len(yes) != 1 or len(no) != 1:
      incomplete += 1
      continue
    pos.append(yes[0]["p_yes"])
    neg.append(no[0]["p_yes"])
    types.append(no[0]["type"] or yes[0]["type"])
    splits.append(split)
  pos, neg = np.asarray(pos), np.asarray(neg)

  def accuracy(select):
    select = np.asarray(select, bool)
    return 100.0 * pair_accuracy(pos[select], neg[select]) if select.any() else None
  return {"pair_accuracy": accuracy([True] * len(pos)),
          "by_type": {t: accuracy([x == t for x in types]) for t in sorted(set(types))},
          "by_split": {s: accuracy([x == s for x in splits]) for s in sorted(set(splits))},
          "counts": {"pairs": len(pos), **{f"type/{t}": types.count(t) for t in set(types)},
                     **{f"split/{s}": splits.count(s) for s in set(splits)}},
          "incomplete_pairs": incomplete}


# ------------------------------------------------------------------------------ running

def _scorer_step(config, params, prompter):
  """step(chunk of (frames, rows)) -> rows with p_yes, each row asking its "caption"."""
  from mashvlm_jax.eval.scoring import Scorer
  from mashvlm_jax.model.config import ModelConfig
  scorer = Scorer(ModelConfig.from_dict(config.model), params, prompter.tok.pad_id)
  yes, no = prompter.token("Yes"), prompter.token("No")
  text_len = int(config.data.text_len)

  def step(chunk):
    frames, rows, clip = common.chunk_rows(chunk)
    prompts = [prompter(haca.entailment_question(r["caption"])) for r in rows]
    width = max(text_len, max(len(p) for p in prompts))
    clip, prompts = common.pad_rows(clip, prompts)
    p_yes = scorer.yes_probability(frames, clip, prompts, yes, no, text_len=width)["p_yes"]
    return [dict(r, p_yes=float(p)) for r, p in zip(rows, p_yes)]
  return step


def _run(config, params, out_dir, per_clip, *, clips_per_batch, resume, show_progress,
         desc):
  """Scores the rows of ``per_clip`` [(frames, rows)] not yet in predictions.jsonl."""
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  todo = [(f, [r for r in rows if r["key"] not in log_file]) for f, rows in per_clip]
  todo = [(f, rows) for f, rows in todo if rows]
  finished = len(log_file.values())
  if todo:
    step = _scorer_step(config, params, common.Prompter(config))
    common.run_in_batches(todo, clips_per_batch, step, log_file, desc=desc,
                          show_progress=show_progress,
                          total=finished + sum(len(r) for _, r in todo), initial=finished)
  return log_file.values()


def evaluate_pairs(config, params, out_dir, *, splits=None, max_items: int = 0,
                   clips_per_batch: int = 8, resume: bool = True,
                   show_progress: bool = True) -> dict:
  """The ``entailment`` benchmark on ``splits`` (default config.data.eval_splits);
  predictions.jsonl, result.json and result.md in ``out_dir``."""
  splits = list(splits or config.data.eval_splits)
  per_clip = [(r["frames"], pair_rows(r, s)) for s, r in
              common.eval_records(config, splits, max_items)]
  if not any(rows for _, rows in per_clip):
    raise ValueError(f"splits {splits} hold no caption pairs: synthetic clips or "
                     f"VELOCITI-style records (positive_caption, negative_caption) needed")
  predictions = _run(config, params, out_dir, per_clip, clips_per_batch=clips_per_batch,
                     resume=resume, show_progress=show_progress, desc="entailment pairs")
  result = score_pairs(predictions)
  result.update(splits=splits, max_items=max_items)
  na = lambda v: "-" if v is None else float(v)  # noqa: E731
  rows = [["all", na(result["pair_accuracy"]), result["counts"]["pairs"]]]
  rows += [[f"type {t}", na(v), result["counts"][f"type/{t}"]]
           for t, v in result["by_type"].items()]
  rows += [[f"split {s}", na(v), result["counts"][f"split/{s}"]]
           for s, v in result["by_split"].items()]
  markdown = common.markdown_table(["pairs", "pair accuracy %", "pairs scored"], rows)
  result["files"] = common.write_result(out_dir, result, markdown)
  return result


def retrieval_pools(config, splits=None, max_items: int = 0) -> dict:
  """{pool name: (records, queries, relevant [Q, N] bool)}.

  Synthetic: "unusual" and "typical", the first N clips of test_unusual and test_typical
  (N the smaller split, at most ``max_items``), queried with the action captions of the
  actions they show. Users' data: each split of ``splits`` (default eval_splits) with
  haca.RETRIEVAL rows is a pool queried with its distinct labels."""
  pools = {}
  if config.data.name == "synthetic_unscene":
    from mashvlm_jax.data import pipeline
    n = min(pipeline.num_examples(config, split) for _, split in SYNTHETIC_POOLS)
    n = min(n, max_items) if max_items else n
    for name, split in SYNTHETIC_POOLS:
      records = [r for _, r in common.eval_records(config, [split], n)]
      actions = sorted({r["action"] for r in records if r["action"]})
      relevant = np.array([[r["action"] == a for r in records] for a in actions])
      pools[name] = (records, [haca.action_query(a) for a in actions], relevant)
    return pools
  for split in list(splits or config.data.eval_splits):
    records = [r for _, r in common.eval_records(config, [split], max_items)]
    labels = [next((q["q"] for q in r["qa"] if q["task"] == haca.RETRIEVAL), None)
              for r in records]
    kept = [(r, x) for r, x in zip(records, labels) if x is not None]
    if kept:
      queries = sorted({x for _, x in kept})
      relevant = np.array([[x == q for _, x in kept] for q in queries])
      pools[split] = ([r for r, _ in kept], queries, relevant)
  if not pools:
    raise ValueError(f"no split of {list(splits or config.data.eval_splits)} holds "
                     f"SSv2-style retrieval records (video, label)")
  return pools


def evaluate_retrieval(config, params, out_dir, *, splits=None, max_items: int = 0,
                       clips_per_batch: int = 8, resume: bool = True,
                       show_progress: bool = True) -> dict:
  """The ``retrieval`` benchmark: mAP (percent) per pool over its text queries, each clip
  scored by P(yes | clip, query caption); files as ``evaluate_pairs``."""
  pools = retrieval_pools(config, splits, max_items)
  per_clip = []
  for name, (records, queries, _) in pools.items():
    for r in records:
      per_clip.append((r["frames"], [{"key": f"{name}:{r['id']}:{k}", "pool": name,
                                      "id": r["id"], "query": k, "caption": q}
                                     for k, q in enumerate(queries)]))
  predictions = {p["key"]: p["p_yes"] for p in _run(
      config, params, out_dir, per_clip, clips_per_batch=clips_per_batch, resume=resume,
      show_progress=show_progress, desc="retrieval")}
  result = {"map": {}, "ap": {}, "pool_size": {}, "queries": {}}
  for name, (records, queries, relevant) in pools.items():
    scores = np.array([[predictions[f"{name}:{r['id']}:{k}"] for r in records]
                       for k in range(len(queries))])
    result["map"][name] = 100.0 * mean_average_precision(scores, relevant)
    result["ap"][name] = {q: 100.0 * average_precision(s, rel)
                          for q, s, rel in zip(queries, scores, relevant)}
    result["pool_size"][name] = len(records)
    result["queries"][name] = len(queries)
  result.update(max_items=max_items)
  markdown = common.markdown_table(
      ["pool", "mAP %", "clips", "queries"],
      [[n, result["map"][n], result["pool_size"][n], result["queries"][n]] for n in pools])
  result["files"] = common.write_result(out_dir, result, markdown)
  return result
