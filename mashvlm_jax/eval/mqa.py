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

Users' data (a ``local_video_qa`` config, splits default config.data.eval_splits): the
split's EPIC-layout segments (data/annotations.py) in annotation order (file, record), the
first ``max_items`` of each split. The annotation files and data.mqa_predictions are read
again (the stored rows keep neither the ranked order nor the class ids; the data set's
name stamps both files, so they are the files it was built from): "recognizer" options
are mqa.mqa_options over the clip's ranked action ids that its file names, "random" the
ground truth + 4 uniform other classes of its file, each written "verb noun"; shuffled by
``clip_rng`` as above. Previous segments and the waves' positions: the evaluated segments
of the same video (and file) by start time (annotations.epic_previous). Results add verb
and noun accuracy of the chosen option (its class's verb and noun); there is no scene's
typical action, so the hallucinated-action keys are absent and the report says so.
Frames are read when their batch comes (a validation split does not fit in memory).
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


def clip_options(clip_id: str, gt: int, source: str, ranked=None,
                 classes=None) -> tuple[list[int], int]:
  """(the K option classes in the shown order, the ground truth's index) of one clip;
  ``classes``: the pool of the random options (default the 64 synthetic classes)."""
  rng = clip_rng(clip_id, source)
  if source == "recognizer":
    if ranked is None:
      raise ValueError(f"clip {clip_id}: recognizer options need its ranked classes")
    options = mqa.mqa_options(gt, ranked)
  elif source == "random":
    pool = range(mqa.NUM_CLASSES) if classes is None else classes
    options = mqa.random_options(gt, pool, mqa.K, rng)
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


def gt_narration(item: dict) -> str:
  """The narration of ``item``'s ground truth, as its options write it."""
  return item["options"][item["answer"]]


def previous_narrations(item: dict, method: str, prior: str, by_id: dict,
                        log_file) -> list[str] | None:
  """The prior-action narrations of ``item``'s prompt: None ("none", or fewer than two
  previous clips), their ground truth ("gt"), or the method's own answers ("self", read
  from the predictions already written)."""
  if prior == "none" or item["previous"] is None:
    return None
  if prior == "gt":
    return [gt_narration(by_id[(item["split"], i)]) for i in item["previous"]]
  out = []
  for clip_id in item["previous"]:
    row = log_file.rows[f"{item['split']}:{clip_id}:{method}"]
    picked = row["prediction"]
    # an answer that names no option states nothing the model could have meant: the
    # prompt then gives the first option it was shown (recorded as "said")
    out.append(row["options"][picked if picked is not None else 0])
  return out


# ------------------------------------------------------------------------------ users' data

def is_users_data(config) -> bool:
  """True for a ``local_video_qa`` config (EPIC-layout segments), False for the synthetic
  set."""
  return config.data.name == "local_video_qa"


def epic_annotations(config, split: str) -> dict[str, dict]:
  """{clip id: {"segment" (annotations.epic_segments' fields), "names" ({action id: "verb
  noun"} of its file), "file", "index" (record index), "order" (position in the split's
  files)}} of the EPIC-layout records of ``split``'s data.annotations, read as the
  builder reads them (the data set's name stamps these files, so they are the ones it was
  built from)."""
  from mashvlm_jax.data import annotations, registry
  out = {}
  for name, path, _ in registry.sources(config):
    if name != split:
      continue
    for file in annotations.json_files(path):
      try:
        records = json.loads(file.read_text())
      except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {file} is not valid JSON: {e}") from e
      if not isinstance(records, list) or annotations.file_layout(records) != "epic":
        continue
      segments, _ = annotations.epic_segments(records, file)
      names = annotations.epic_names(segments)
      for index, segment in segments.items():
        key = annotations.epic_key(segment, file, index)
        if key in out:
          raise ValueError(f"split {split!r}: clip id {key!r} is given by {out[key]['file']} "
                           f"record {out[key]['index']} and by {file} record {index}")
        out[key] = {"segment": segment, "names": names, "file": str(file), "index": index,
                    "order": len(out)}
  return out


def epic_records(config, splits, max_items: int = 0) -> list[tuple[str, int, dict]]:
  """(split, stored record index, its ``epic_annotations`` entry) of each split's EPIC
  segments in annotation order (file, record), the first ``max_items`` of each (0 = all).
  ValueError for a split that holds none or a segment its annotation files lack."""
  from mashvlm_jax.data import pipeline, registry
  out = []
  for split in splits:
    found = epic_annotations(config, split)
    source = registry.text_source(config, split)  # ids and tasks only
    picked, tasks = [], collections.Counter()
    for index in range(len(source)):
      record = pipeline.record_header(source[index])
      tasks[record["task"]] += 1
      if record["task"] != "epic":
        continue
      if record["id"] not in found:
        files = [path for name, path, _ in registry.sources(config) if name == split]
        raise ValueError(f"split {split!r}: stored segment {record['id']!r} is not in its "
                         f"annotation files {files}: they changed since the build (run "
                         f"make-data again)")
      picked.append((found[record["id"]]["order"], index, found[record["id"]]))
    if not picked:
      raise ValueError(f"--benchmark=mqa: split {split!r} of {registry.builder(config).name}/"
                       f"{registry.builder(config).builder_config.name} holds no "
                       f"EPIC-KITCHENS segments (its items' tasks: {dict(tasks)}); build it "
                       f"from EPIC-layout annotation files with data.mqa_predictions")
    picked.sort(key=lambda x: x[0])
    out += [(split, index, entry) for _, index, entry in
            (picked[:max_items] if max_items else picked)]
  return out


def epic_item_list(records, source: str, predictions: dict | None = None,
                   predictions_file: str = "") -> list[dict]:
  """The items of ``epic_records``' segments (as ``items``): options from the clip's
  ranked action ids in ``predictions`` that its file names (recognizer) or from its file's
  classes (random), each option its class's "verb noun"; video position and previous
  segments among the evaluated segments of the same video and file by start time
  (annotations.epic_previous)."""
  from mashvlm_jax.data import annotations
  groups = collections.defaultdict(dict)  # (split, file) -> {record index: entry}
  for split, _, entry in records:
    groups[(split, entry["file"])][entry["index"]] = entry
  position, previous = {}, {}
  for (split, file), entries in groups.items():
    segments = {i: e["segment"] for i, e in entries.items()}
    for order in annotations.epic_video_order(segments).values():
      position.update({(file, i): p for p, i in enumerate(order)})
    for i, before in annotations.epic_previous(segments).items():
      previous[(file, i)] = None if before is None else [
          annotations.epic_key(entries[j]["segment"], file, j) for j in before]
  out = []
  for split, stored, entry in records:
    segment, names, file = entry["segment"], entry["names"], entry["file"]
    key, gt = annotations.epic_key(segment, file, entry["index"]), segment["action"]
    ranked = None
    if source == "recognizer":
      if predictions is None or key not in predictions:
        raise ValueError(f"{predictions_file}: no prediction for clip {key!r} ({file} record "
                         f"{entry['index']}, split {split!r})")
      ranked = [c for c in predictions[key] if c in names]
      if len(ranked) < mqa.K:
        raise ValueError(f"{predictions_file}: the prediction of clip {key!r} ranks "
                         f"{len(ranked)} action ids that {file} names, fewer than K={mqa.K}")
    classes, index = clip_options(key, gt, source, ranked, classes=sorted(names))
    out.append({"split": split, "id": key, "kind": "", "scene": "", "gt": gt,
                "classes": classes, "options": [names[c] for c in classes], "answer": index,
                "video": segment["video"], "position": position[(file, entry["index"])],
                "previous": previous[(file, entry["index"])], "frames": None,
                "record_index": stored})
  return out


def predictions_file(config) -> str:
  """data.mqa_predictions as an absolute path (ValueError when it is not set)."""
  from mashvlm_jax import paths
  path = str(config.data.get("mqa_predictions", "") or "")
  if not path:
    raise ValueError("--mqa_options=recognizer on users' data reads the ranked action ids "
                     "of data.mqa_predictions, which is not set")
  return paths.local_path(path)


def users_items(config, splits, source: str, max_items: int = 0) -> tuple[list[dict], str]:
  """(the items of the splits' EPIC segments, the predictions file read or "" for random
  options)."""
  from mashvlm_jax.data import recognizer
  ranked_file = predictions_file(config) if source == "recognizer" else ""
  predictions = (recognizer.read_predictions(ranked_file, num_classes=None)
                 if ranked_file else None)
  return epic_item_list(epic_records(config, splits, max_items), source, predictions,
                        ranked_file), ranked_file


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


def epic_score(predictions: list[dict]) -> dict:
  """``score``'s accuracy and counts, and per split and method the verb and noun
  accuracy (percent) of the chosen option (its class's verb and noun against the ground
  truth's; no option named = wrong); users' data has no scene's typical action, so no
  hallucinated-action keys."""
  from mashvlm_jax.data.annotations import EPIC_NOUNS
  result = score(predictions)
  del result["hallucinated_action_rate"], result["typical_offered"]
  verb, noun = collections.Counter(), collections.Counter()
  for r in predictions:
    if r["prediction"] is None:
      continue
    said, key = r["classes"][r["prediction"]], (r["split"], r["method"])
    verb[key] += said // EPIC_NOUNS == r["gt"] // EPIC_NOUNS
    noun[key] += said % EPIC_NOUNS == r["gt"] % EPIC_NOUNS
  for name, right in (("verb_accuracy", verb), ("noun_accuracy", noun)):
    result[name] = {split: {m: 100.0 * right[(split, m)] / n for m, n in by_method.items()}
                    for split, by_method in result["counts"].items()}
  return result


EPIC_NOTE = ("No hallucinated-action rate: users' data has no scene's typical action "
             "(the synthetic set's test_unusual measure).")


def epic_table(result: dict) -> str:
  rows = [[split, method, value, result["verb_accuracy"][split][method],
           result["noun_accuracy"][split][method], result["counts"][split][method]]
          for split, by_method in result["accuracy"].items()
          for method, value in by_method.items()]
  return common.markdown_table(["split", "method", "action accuracy %", "verb %", "noun %",
                                "clips"], rows) + "\n\n" + EPIC_NOTE


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
  (default test_typical, test_unusual; on users' data config.data.eval_splits); writes
  settings.json, predictions.jsonl and result.{json,md} in ``out_dir``."""
  from mashvlm_jax.eval.generate import Generator, SamplingParams
  from mashvlm_jax.eval.scoring import Scorer
  from mashvlm_jax.model.config import ModelConfig
  if source not in OPTION_SOURCES or prior not in PRIORS:
    raise ValueError(f"options must be one of {OPTION_SOURCES} and prior one of {PRIORS}, "
                     f"found {source!r}, {prior!r}")
  users = is_users_data(config)
  splits = list(splits or (config.data.eval_splits if users else SPLITS))
  settings = {"options": source, "prior": prior, "splits": splits, "max_items": max_items}
  if users:  # the data set's name stamps its annotation and predictions files
    from mashvlm_jax.data import pipeline, registry
    settings["data"] = registry.builder(config).builder_config.name
  _check_settings(out_dir, settings, resume)
  if users:
    todo_items, ranked_file = users_items(config, splits, source, max_items)
    stored = {split: pipeline.make_eval_records(config, split) for split in splits}
  else:
    rankings = synthetic_rankings(config, splits) if source == "recognizer" else None
    todo_items = items(clip_records(config, splits, max_items), source, rankings)

  def frames_of(item):  # users' segments are read when their batch comes
    if item["frames"] is not None:
      return item["frames"]
    return stored[item["split"]][item["record_index"]]["frames"]

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
      frames = np.stack([frames_of(item) for item, _ in work])
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
  if users:
    result = epic_score(log_file.values())
    result.update(options=source, prior=prior, splits=splits, max_items=max_items,
                  recognizer=None, predictions=ranked_file or None, data=settings["data"],
                  note=EPIC_NOTE)
    result["files"] = common.write_result(out_dir, result, epic_table(result))
    return result
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
