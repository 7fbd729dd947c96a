"""LLaVAction's multiple-choice action QA (issue 18): ``mashvlm eval --benchmark=mqa``.

For every clip with an actor of the synthetic test splits (default test_typical and
test_unusual; in clip-index order, the first ``max_items`` of each split) the question
lists K = 5 lettered narrations (data/tasks/mqa.py):
  options "recognizer": recognizer B's ranked classes (fitted on the data set's train
    split, data/recognizer.py), mqa.mqa_options (top 5, or top 4 + the ground truth);
  options "random": the ground truth + 4 uniform other classes.
Options are shuffled once per clip with a generator seeded by the clip id (the same
order at every run and resume). The model answers two ways, each a prediction row:
  likelihood: the option whose answer "(X) narration</s>" has the highest log-likelihood
    (the one-pass scorer, eval/scoring.py);
  generate: greedy generation up to a newline, read by mqa.answer_index ("(X)" letter or
    an exact narration; anything else is wrong).
``prior``: "none" asks the bare question; "gt" states the clip's two previous actions
(the two nearest preceding clips with an actor of its synthetic "video" of 8 consecutive
clip indices, data/tasks/mqa_train.py); "self" states the answers this method gave for
those two clips. Clips with fewer than two previous clips in their video get the bare
question in every mode.

Batching under "self": a clip's prompt needs its method's answers to the clips before it,
so the clips are processed in waves by their position among the video's evaluated clips
(wave j: the j-th clip of every video, both methods), each wave in batches of
``batch_size`` clips; the waves' answers are appended to predictions.jsonl before the next
wave starts, so an interrupted run resumes with the same prompts. "none" and "gt" need no
waves.

Results: accuracy (percent) per split and method, clips per split, and on test_unusual
the hallucinated-action rate (answers naming the scene's typical action) and the share of
questions that offer it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import pathlib

import numpy as np

from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import mqa, mqa_train
from mashvlm_jax.eval import common

OPTION_SOURCES = ("recognizer", "random")
PRIORS = ("none", "gt", "self")
METHODS = ("likelihood", "generate")
SPLITS = ("test_typical", "test_unusual")
RECOGNIZER = "B"  # the evaluation options' recognizer (A gives the training distractors)


# ------------------------------------------------------------------------------ options

def clip_rng(clip_id: str, source: str) -> np.random.Generator:
  """The clip's own generator for its option draw and order (from its id and source)."""
  digest = hashlib.sha256(f"mqa|{source}|{clip_id}".encode()).digest()
  return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def clip_options(clip_id: str, gt: int, source: str, ranked=None) -> tuple[list[int], int]:
  """(the K option classes in the shown order, the ground truth's index) of one clip."""
  rng = clip_rng(clip_id, source)
  if source == "recognizer":
    if ranked is None:
      raise ValueError(f"clip {clip_id}: recognizer options need its ranked classes")
    options = mqa.mqa_options(gt, ranked)
  elif source == "random":
    options = mqa.random_options(gt, range(mqa.NUM_CLASSES), mqa.K, rng)
  else:
    raise ValueError(f"unknown option source {source!r}; known: {OPTION_SOURCES}")
  return mqa.shuffled(options, gt, rng)


def synthetic_rankings(config, splits, name: str = RECOGNIZER) -> dict[str, list[int]]:
  """{clip id: ranked classes} of recognizer ``name`` fitted on the configured synthetic
  set's train split, for the clips with an actor of ``splits``."""
  from mashvlm_jax.data import recognizer, registry
  if config.data.name != "synthetic_unscene":
    raise ValueError(f"--benchmark=mqa evaluates the synthetic set (data.name="
                     f"synthetic_unscene), found data.name={config.data.name!r}")
  data = recognizer.SyntheticSet.from_config(registry.builder(config).builder_config)
  model = recognizer.fit_synthetic(data, [name])[name]
  out = {}
  for split in splits:
    out.update(recognizer.synthetic_predictions(model, data, split))
  return out


# ------------------------------------------------------------------------------ items

def clip_index(clip_id: str) -> int:
  """The index of a synthetic clip id "split/000012" (ValueError for another form)."""
  split, _, index = clip_id.rpartition("/")
  if not split or not index.isdigit():
    raise ValueError(f"clip id {clip_id!r} is not '<split>/<index>'")
  return int(index)


def video_of(clip_id: str) -> str:
  """The synthetic "video" of a clip id "split/000012": "split/1" (8 indices a video)."""
  return f"{clip_id.rpartition('/')[0]}/{clip_index(clip_id) // mqa_train.VIDEO_CLIPS}"


def clip_records(config, splits, max_items: int = 0) -> list:
  """(split, record) of each split's clips in clip-index order (the stored order is
  shuffled), the first ``max_items`` of each (0 = all)."""
  out = []
  for split in splits:
    records = sorted((r for _, r in common.eval_records(config, [split])),
                     key=lambda r: clip_index(r["id"]))
    out += [(split, r) for r in (records[:max_items] if max_items else records)]
  return out


def items(records, source: str, rankings=None) -> list[dict]:
  """One item per (split, record with an actor) of ``records`` (in clip-index order): its
  options (classes and narrations in the shown order), answer index, ground truth, video,
  position in the video among the evaluated clips and the ids of its (two back, one back)
  clips (or None)."""
  out, seen = [], collections.defaultdict(list)
  for split, record in records:
    gt = mqa.action_class(record["action"], record["scene"]) if record["scene"] else None
    if gt is None:
      continue
    ranked = None if rankings is None else rankings.get(record["id"])
    if source == "recognizer" and ranked is None:
      raise ValueError(f"recognizer {RECOGNIZER} has no ranking for clip {record['id']}")
    classes, index = clip_options(record["id"], gt, source, ranked)
    video = video_of(record["id"])
    before = seen[(split, video)]
    out.append({"split": split, "id": record["id"], "kind": record["kind"],
                "scene": record["scene"], "gt": gt, "classes": classes,
                "options": [mqa.narration(c) for c in classes], "answer": index,
                "video": video, "position": len(before),
                "previous": before[-2:] if len(before) >= 2 else None,
                "frames": record["frames"]})
    before.append(record["id"])
  return out


def previous_narrations(item: dict, method: str, prior: str, by_id: dict,
                        log_file) -> list[str] | None:
  """The prior-action narrations of ``item``'s prompt: None ("none", or fewer than two
  previous clips), their ground truth ("gt"), or the method's own answers ("self", read
  from the predictions already written)."""
  if prior == "none" or item["previous"] is None:
    return None
  if prior == "gt":
    return [mqa.narration(by_id[(item["split"], i)]["gt"]) for i in item["previous"]]
  out = []
  for clip_id in item["previous"]:
    row = log_file.rows[f"{item['split']}:{clip_id}:{method}"]
    picked = row["prediction"]
    # an answer that names no option states nothing the model could have meant: the
    # prompt then gives the first option it was shown (recorded as "said")
    out.append(row["options"][picked if picked is not None else 0])
  return out


# ------------------------------------------------------------------------------ scoring

def score(predictions: list[dict]) -> dict:
  """Accuracy (percent) per split and method, clips per split and method, and per method
  on test_unusual the hallucinated-action rate (answers naming the class of the scene's
  typical action) and the share of questions offering that class."""
  right, total = collections.Counter(), collections.Counter()
  typical_said, typical_offered, unusual = (collections.Counter(), collections.Counter(),
                                            collections.Counter())
  for r in predictions:
    key = (r["split"], r["method"])
    total[key] += 1
    right[key] += r["prediction"] == r["answer"]
    if r["kind"] == "unusual":
      typical = mqa.action_class(synthetic.TYPICAL_ACTION[r["scene"]], r["scene"])
      unusual[r["method"]] += 1
      typical_offered[r["method"]] += typical in r["classes"]
      typical_said[r["method"]] += (r["prediction"] is not None
                                    and r["classes"][r["prediction"]] == typical)
  accuracy = collections.defaultdict(dict)
  counts = collections.defaultdict(dict)
  for (split, method), n in sorted(total.items()):
    accuracy[split][method] = 100.0 * right[(split, method)] / n
    counts[split][method] = n
  return {"accuracy": dict(accuracy), "counts": dict(counts),
          "hallucinated_action_rate": {m: 100.0 * typical_said[m] / n
                                       for m, n in sorted(unusual.items())},
          "typical_offered": {m: 100.0 * typical_offered[m] / n
                              for m, n in sorted(unusual.items())}}


def table(result: dict) -> str:
  rows = [[split, method, value, result["counts"][split][method]]
          for split, by_method in result["accuracy"].items()
          for method, value in by_method.items()]
  text = common.markdown_table(["split", "method", "accuracy %", "clips"], rows)
  for method, rate in result["hallucinated_action_rate"].items():
    text += (f"\n\n{method}: the scene's typical action answered on "
             f"{rate:.2f}% of test_unusual (offered on "
             f"{result['typical_offered'][method]:.2f}%)")
  return text


def _check_settings(out_dir, settings: dict, resume: bool) -> None:
  """settings.json in ``out_dir``; with ``resume`` a different one is refused."""
  path = pathlib.Path(out_dir) / "settings.json"
  if resume and path.exists():
    found = json.loads(path.read_text())
    if found != settings:
      raise ValueError(f"{out_dir} holds mqa predictions made with {found}, not {settings}:"
                       f" give another --out (or --noresume)")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(settings) + "\n")


def evaluate(config, params, out_dir, *, source: str = "recognizer", prior: str = "none",
             splits=None, max_items: int = 0, batch_size: int = 8, max_new_tokens: int = 12,
             resume: bool = True, show_progress: bool = True) -> dict:
  """Multiple-choice accuracy with ``source`` options and ``prior`` prompts on ``splits``
  (default test_typical, test_unusual); writes settings.json, predictions.jsonl and
  result.{json,md} in ``out_dir``."""
  from mashvlm_jax.eval.generate import Generator, SamplingParams
  from mashvlm_jax.eval.scoring import Scorer
  from mashvlm_jax.model.config import ModelConfig
  if source not in OPTION_SOURCES or prior not in PRIORS:
    raise ValueError(f"options must be one of {OPTION_SOURCES} and prior one of {PRIORS}, "
                     f"found {source!r}, {prior!r}")
  splits = list(splits or SPLITS)
  _check_settings(out_dir, {"options": source, "prior": prior, "splits": splits,
                            "max_items": max_items}, resume)
  rankings = synthetic_rankings(config, splits) if source == "recognizer" else None
  todo_items = items(clip_records(config, splits, max_items), source, rankings)
  by_id = {(i["split"], i["id"]): i for i in todo_items}
  log_file = common.PredictionLog(f"{out_dir}/predictions.jsonl", resume)
  prompter = common.Prompter(config)
  tok = prompter.tok
  model_cfg = ModelConfig.from_dict(config.model)
  scorer = Scorer(model_cfg, params, tok.pad_id)
  gen = Generator(model_cfg, params, tok)
  sampling = SamplingParams(max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                            stop_strings=("\n",))

  def base_row(item, method):
    return {"key": f"{item['split']}:{item['id']}:{method}", "split": item["split"],
            "id": item["id"], "kind": item["kind"], "scene": item["scene"],
            "method": method, "classes": item["classes"], "options": item["options"],
            "answer": item["answer"], "gt": item["gt"]}

  def step(chunk):
    rows = []
    for method in METHODS:
      work = [(item, previous_narrations(item, method, prior, by_id, log_file))
              for item in chunk if f"{item['split']}:{item['id']}:{method}" not in log_file]
      if not work:
        continue
      frames = np.stack([item["frames"] for item, _ in work])
      questions = [mqa.question(item["options"], previous) for item, previous in work]
      prompts = [prompter(q) for q in questions]
      if method == "likelihood":
        clip, texts, answers = [], [], []
        for c, ((item, _), prompt) in enumerate(zip(work, prompts)):
          for k in range(len(item["options"])):
            clip.append(c)
            texts.append(prompt)
            answers.append(tok.encode(mqa.answer(item["options"], k)) + [tok.eos_id])
        logp = scorer.answer_logprobs(frames, clip, texts, answers).reshape(len(work), -1)
        said = [None] * len(work)
        picked = [int(np.argmax(row)) for row in logp]
        scores = [row.tolist() for row in logp]
      else:
        said = gen.generate(frames, prompts, sampling).texts
        picked = [mqa.answer_index(text, item["options"]) for (item, _), text in
                  zip(work, said)]
        scores = [None] * len(work)
      for (item, previous), question, p, s, text in zip(work, questions, picked, scores, said):
        rows.append(dict(base_row(item, method), previous=previous, question=question,
                         prediction=p, response=text, logprobs=s))
    return rows

  pending = [i for i in todo_items
             if any(f"{i['split']}:{i['id']}:{m}" not in log_file for m in METHODS)]
  missing = sum(f"{i['split']}:{i['id']}:{m}" not in log_file for i in pending
                for m in METHODS)  # prediction rows to write (the bar counts rows)
  if prior != "self":
    common.run_in_batches(pending, batch_size, step, log_file, desc="mqa",
                          show_progress=show_progress, total=missing)
  else:  # waves: the j-th clip of every video once the (j-1)-th clips are answered
    bar = common.progress(missing, "mqa (waves)") if show_progress else None
    try:
      for j in sorted({i["position"] for i in pending}):
        wave = [i for i in pending if i["position"] == j]
        before = len(log_file.rows)
        common.run_in_batches(wave, batch_size, step, log_file, desc="mqa",
                              show_progress=False)
        if bar:
          bar.update(len(log_file.rows) - before)
    finally:
      if bar:
        bar.close()
  result = score(log_file.values())
  result.update(options=source, prior=prior, splits=splits, max_items=max_items,
                recognizer=RECOGNIZER if source == "recognizer" else None)
  result["files"] = common.write_result(out_dir, result, table(result))
  return result


def compare(config, params, out_dir, *, sources=OPTION_SOURCES, **kwargs) -> dict:
  """``evaluate`` once per option source (``out_dir``/<source>) and a table of both: the
  issue's report that a model scores higher on random options than on recognizer ones."""
  results = {s: evaluate(config, params, f"{out_dir}/{s}", source=s, **kwargs)
             for s in sources}
  rows = []
  for source, r in results.items():
    for split, by_method in r["accuracy"].items():
      for method, value in by_method.items():
        rows.append([source, split, method, value, r["counts"][split][method]])
  markdown = common.markdown_table(["options", "split", "method", "accuracy %", "clips"],
                                   rows)
  result = {"sources": {s: {k: v for k, v in r.items() if k != "files"}
                        for s, r in results.items()}}
  result["files"] = common.write_result(out_dir, result, markdown)
  return result
