"""What the evaluators record, checked against independent references on a tiny random model
and the tiny synthetic set (2 clips per test split):

- eval prompts are token-for-token the prefix the training pipeline builds for the same
  question (ExampleTransform), and "Yes"/"No" are the first tokens of its answers;
- every P(yes), label log-likelihood choice and greedy answer equals a full forward
  (``MashVLM.__call__`` on the whole ``[video][prompt + answer]`` row, log-softmax here);
- each result table follows from predictions.jsonl by the rule its module documents;
- a rerun on the same output directory computes nothing (no model call, no new row) and
  gives identical results; a torn run computes only the missing rows;
- ``params_io.check_model_config`` names the differing field.
"""
import collections
import contextlib
import hashlib
import json
import shutil
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import load_config
from mashvlm_jax.convert import params_io
from mashvlm_jax.data import pipeline, registry
from mashvlm_jax.data import synthetic as synthetic_data
from mashvlm_jax.eval import common, generate, open_ended, scoring, synthetic, unscene
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig

SPLITS = ("test_typical", "test_unusual", "test_scene_only")


# ------------------------------------------------------------------------------ references

class FullForward:
  """The reference model call: ``MashVLM.__call__`` on whole ``[video][text]`` rows (no KV
  cache, no shared video) and a float64 log-softmax computed here. Rows go in chunks of
  ``rows`` right-padded to ``width`` tokens (padding leaves real positions unchanged), so
  the forward compiles once."""

  def __init__(self, cfg, params, width: int, rows: int = 16):
    self.apply = jax.jit(mashvlm.MashVLM(cfg).apply)
    self.params, self.width, self.rows = params, width, rows

  def logprobs(self, frames, texts) -> list:
    """Per row float64 [len(text), vocab]: log p(token i + 1 | video, text[:i + 1])."""
    out = []
    for begin in range(0, len(texts), self.rows):
      chunk = [list(t) for t in texts[begin:begin + self.rows]]
      video = list(frames[begin:begin + self.rows])
      real = len(chunk)
      chunk += [chunk[-1]] * (self.rows - real)
      video += [video[-1]] * (self.rows - real)
      assert max(map(len, chunk)) <= self.width, "raise FullForward width"
      ids = np.zeros((self.rows, self.width), np.int32)
      for r, text in enumerate(chunk):
        ids[r, :len(text)] = text
      mask = np.arange(self.width)[None] < np.array([len(t) for t in chunk])[:, None]
      logits = np.asarray(self.apply({"params": self.params}, np.stack(video), ids, mask),
                          np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
      out += [logp[r, :len(t)] for r, t in enumerate(chunk[:real])]
    return out

  def next_logprobs(self, frames, prompts) -> list:
    """Per row float64 [vocab]: the distribution of the token after the prompt."""
    return [lp[-1] for lp in self.logprobs(frames, prompts)]

  def answer_logprob(self, frames, prompts, answers) -> np.ndarray:
    """float64 [R]: sum over the answer's tokens of log p(token | video, prompt, before)."""
    full = self.logprobs(frames, [list(p) + list(a) for p, a in zip(prompts, answers)])
    return np.array([sum(lp[len(p) - 1 + j, tok] for j, tok in enumerate(a))
                     for lp, p, a in zip(full, prompts, answers)])

  def greedy(self, frames, prompts, steps: int, eos_id: int) -> list:
    """Per row the argmax continuation of ``steps`` tokens, cut before the first EOS."""
    rows = [list(p) for p in prompts]
    for _ in range(steps):
      for row, lp in zip(rows, self.next_logprobs(frames, rows)):
        row.append(int(np.argmax(lp)))
    out = []
    for row, prompt in zip(rows, prompts):
      new = row[len(prompt):]
      out.append(new[:new.index(eos_id)] if eos_id in new else new)
    return out


def greedy_texts(reference, tok, frames, prompts, steps, stop_strings) -> list:
  """The answer text generation documents (eval/generate.py): the greedy tokens before
  EOS, decoded, cut before the first stop string."""
  texts = []
  for tokens in reference.greedy(frames, prompts, steps, tok.eos_id):
    text = tok.decode(tokens)
    cuts = [text.find(s) for s in stop_strings if s and s in text]
    texts.append(text[:min(cuts)] if cuts else text)
  return texts


def training_example(transform, raw: dict, k: int, question: str | None = None) -> dict:
  """Question ``k`` of a stored record as the training pipeline encodes it alone
  (ExampleTransform): {"prompt": ids before the answer, "answer": answer ids + </s>,
  "frames"}. ``question`` replaces the stored question text."""
  qa = {f: list(v[k:k + 1]) for f, v in raw["qa"].items()}
  if question is not None:
    qa["q"] = [question]
  row = transform(dict(raw, qa=qa), np.random.default_rng(0))
  n = int(row["text_mask"].sum())
  first_answer = int(np.flatnonzero(row["label_mask"])[0]) + 1  # label i is token i + 1
  ids = row["text_ids"][:n].tolist()
  return {"prompt": ids[:first_answer], "answer": ids[first_answer:], "frames": row["frames"]}


def text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def training_rows(config, splits) -> dict:
  """"split:id:k" -> training_example of question k of every stored record, plus its
  question, instruction, gold answer and task as stored."""
  rows = {}
  for split in splits:
    transform = pipeline.example_transform(config, split)
    source = registry.data_source(config, split)
    for index in range(len(source)):
      raw = source[index]
      for k in range(len(raw["qa"]["q"])):
        rows[f"{split}:{text(raw['id'])}:{k}"] = dict(
            training_example(transform, raw, k), split=split, index=index,
            **{name: text(raw["qa"][field][k]) for name, field in
               (("question", "q"), ("instruction", "i"), ("gold", "a"), ("task", "task"))})
  return rows


@contextlib.contextmanager
def count_work():
  """Counts what an evaluator computes while the block runs: text rows through the model
  (``Scorer.score_rows``, ``Generator.generate``) and prediction rows appended to its
  predictions.jsonl (``PredictionLog.add``). Yields the Counter."""
  counts = collections.Counter()
  score_rows, generate_rows = scoring.Scorer.score_rows, generate.Generator.generate
  add = common.PredictionLog.add

  def counted_score(self, frames, clip_index, texts, **kwargs):
    counts["scored_rows"] += len(texts)
    return score_rows(self, frames, clip_index, texts, **kwargs)

  def counted_generate(self, frames, prompts, *args, **kwargs):
    counts["generated_rows"] += len(prompts)
    return generate_rows(self, frames, prompts, *args, **kwargs)

  def counted_add(self, rows):
    rows = list(rows)
    counts["rows_written"] += len(rows)
    return add(self, rows)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(scoring.Scorer, "score_rows", counted_score)
    patch.setattr(generate.Generator, "generate", counted_generate)
    patch.setattr(common.PredictionLog, "add", counted_add)
    yield counts


GOLD_BONUS = 100.0


@contextlib.contextmanager
def spy_label_scores(bench):
  """Records every row the label probe scores (``Scorer.answer_logprobs``: prompt, answer,
  video digest -> log-likelihood) in the yielded dict, and hands the probe those scores
  with GOLD_BONUS added to the gold answer of each action question: a random model prefers
  one answer everywhere, this makes the winner differ between rows."""
  gold = {(tuple(r["prompt"]), digest(r["frames"])): tuple(r["answer"])
          for r in bench.train.values() if r["task"] == "action"}
  scores = {}
  original = scoring.Scorer.answer_logprobs

  def spied(self, frames, clip_index, prompts, answers, **kwargs):
    logp = original(self, frames, clip_index, prompts, answers, **kwargs)
    out = logp.copy()
    for r, (c, p, a) in enumerate(zip(clip_index, prompts, answers)):
      key = (tuple(p), digest(frames[c]))
      scores[key + (tuple(a),)] = float(logp[r])
      out[r] += GOLD_BONUS * (gold.get(key) == tuple(a))
    return out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(scoring.Scorer, "answer_logprobs", spied)
    yield scores


def digest(frames) -> str:
  return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


def read_jsonl(path) -> list:
  return [json.loads(line) for line in open(path)]


def percent(marks) -> float | None:
  return 100.0 * sum(marks) / len(marks) if marks else None


def cell(value) -> str:
  return "-" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------ setup

def tiny_eval_config(data_dir):
  """The tiny config at 32x32 (M=23, N=16), 2 decoder layers and a 256-token vocabulary (the
  synthetic word tokenizer has 183, so greedy answers are mostly words), on the tiny
  synthetic set with 2 clips per split."""
  config = load_config("tiny_synthetic")
  config.model.vision.image_size = 32
  config.model.llm.num_layers = 2
  config.model.llm.vocab_size = 256
  config.data.update(data_dir=str(data_dir), builder_config="tiny", train_size=2,
                     test_size=2)
  return config


def sharpened(params, scale: float = 8.0):
  """Random parameters whose language-model weights are ``scale`` times the init's (std
  0.02 -> 0.16). At the init's scale attention is nearly uniform and every question gets
  the same answer; sharper weights make P(yes), label choices and greedy answers depend on
  the question and the video, so a row computed at the wrong prompt or video fails."""
  def scaled(path, leaf):
    name = jax.tree_util.keystr(path)
    return leaf * scale if name.startswith("['language_model']") and (
        "kernel" in name or "embedding" in name) else leaf
  return jax.tree_util.tree_map_with_path(scaled, params)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """The data build, random parameters, the training rows of every eval question, the
  reference forward, and (filled by run_once) each evaluator's first run and the label
  probe's scores, once for the file."""
  config = tiny_eval_config(tmp_path_factory.mktemp("data"))
  registry.ensure_built(config)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  train = training_rows(config, SPLITS)
  answers = {r["gold"]: r["answer"] for r in train.values() if r["gold"] in ("Yes", "No")}
  return types.SimpleNamespace(
      config=config, params=params, tok=registry.load_tokenizer(config), train=train,
      yes_id=answers["Yes"][0], no_id=answers["No"][0],
      reference=FullForward(cfg, params, width=40), out=tmp_path_factory.mktemp("eval"),
      runs={}, label_scores={})


# The evaluator runs this file checks, by name: (bench, out dir) -> result.
EVALUATORS = {
    "binary_likelihood": lambda bench, out: unscene.evaluate_binary(
        bench.config, bench.params, out, mode="likelihood", clips_per_batch=2,
        show_progress=False),
    "binary_generate": lambda bench, out: unscene.evaluate_binary(
        bench.config, bench.params, out, mode="generate", max_items=1, max_new_tokens=3,
        clips_per_batch=2, show_progress=False),
    "synthetic": lambda bench, out: synthetic.evaluate(bench.config, bench.params, out,
                                                       show_progress=False),
    "open_ended": lambda bench, out: open_ended.evaluate(
        bench.config, bench.params, out, kind="unscene", max_new_tokens=3, batch_size=4,
        show_progress=False),
}


def run_once(bench, name):
  """(out dir, result, work counts) of the evaluator ``name``, run once per file."""
  runs = bench.runs
  if name not in runs:
    out = bench.out / name
    with count_work() as work, spy_label_scores(bench) as label_scores:
      result = EVALUATORS[name](bench, out)
    runs[name] = (out, result, dict(work))
    bench.label_scores.update(label_scores)
  return runs[name]


def keys_of(bench, tasks, max_items: int = 0) -> set:
  return {key for key, r in bench.train.items() if r["task"] in tasks
          and (not max_items or r["index"] < max_items)}


# ------------------------------------------------------------------------------ prompts

def test_eval_prompts_are_the_training_prefix(bench):
  """Prompter(question, instruction) is the training row's text before its answer, the
  eval frames are the training frames, "Yes"/"No" are the training answers' first tokens."""
  prompter = common.Prompter(bench.config)
  seen = set()
  for split, record in common.eval_records(bench.config, SPLITS):
    for k, qa in enumerate(record["qa"]):
      key = f"{split}:{record['id']}:{k}"
      want = bench.train[key]
      assert (qa["q"], qa["i"]) == (want["question"], want["instruction"])
      assert prompter(qa["q"], qa["i"]) == want["prompt"], key
      np.testing.assert_array_equal(record["frames"], want["frames"])
      seen.add(key)
  assert seen == set(bench.train) and len(seen) == 2 * (7 + 7 + 5)
  tok = bench.tok
  assert bench.train["test_typical:test_typical/000001:0"]["prompt"] == (
      [tok.bos_id] + tok.encode("USER:") + tok.encode("Is the person boxing?")
      + tok.encode("ASSISTANT:"))
  assert prompter.token("Yes") == bench.yes_id != prompter.token("No") == bench.no_id
  for word, token in (("Yes", bench.yes_id), ("No", bench.no_id)):
    assert {tuple(r["answer"]) for r in bench.train.values() if r["gold"] == word} == {
        (token, tok.eos_id)}


def test_prompt_with_system_text_and_instruction_is_the_training_prefix(bench):
  """With data.template.system and a record instruction, both lead the prompt as in
  training: <s> {system} {instruction} USER: ..."""
  config = bench.config.copy_and_resolve_references()
  config.data.template.system = "Describe the video in detail."
  transform = pipeline.example_transform(config, "test_unusual")
  raw = registry.data_source(config, "test_unusual")[0]
  instruction = "Where does this video take place?"
  raw = dict(raw, qa=dict(raw["qa"], i=[instruction.encode()] * len(raw["qa"]["i"])))
  want = training_example(transform, raw, 0)
  got = common.Prompter(config)(text(raw["qa"]["q"][0]), instruction)
  assert got == want["prompt"]
  tok = bench.tok
  head = [tok.bos_id] + tok.encode(f"Describe the video in detail. {instruction}")
  assert got[:len(head)] == head and got[len(head):len(head) + 2] == tok.encode("USER:")


# ------------------------------------------------------------------------------ UNSCENE

def assert_rows_are_the_stored_questions(bench, rows):
  for row in rows:
    want = bench.train[row["key"]]
    assert (row["question"], row["instruction"], row["answer"]) == (
        want["question"], want["instruction"], want["gold"]), row["key"]


def assert_p_yes_is_the_full_forward(bench, rows):
  """Each row's p_yes is P(Yes) / (P(Yes) + P(No)) of the full forward's next token after
  the training prompt, and its prediction the likelier of the two."""
  train = [bench.train[r["key"]] for r in rows]
  logp = bench.reference.next_logprobs([t["frames"] for t in train],
                                       [t["prompt"] for t in train])
  for row, lp in zip(rows, logp):
    want = 1.0 / (1.0 + np.exp(lp[bench.no_id] - lp[bench.yes_id]))
    assert row["p_yes"] == pytest.approx(want, abs=1e-5), row["key"]
    assert row["prediction"] == ("Yes" if want > 0.5 else "No"), row["key"]


def assert_binary_table(rows, result, out_dir, correct):
  """result.json and result.md follow from the rows by unscene.py's dual rule: a dual
  (the questions of one video sharing ``pair``) counts when all its answers are right;
  columns are percent of duals per (kind, aspect), Avg. their mean."""
  duals = collections.defaultdict(list)
  for r in rows:
    duals[(r["split"], r["id"], r["pair"])].append(r)
  marks = collections.defaultdict(list)
  for dual in duals.values():
    assert len(dual) == 2 and len({(r["kind"], r["aspect"]) for r in dual}) == 1
    marks[(dual[0]["kind"], dual[0]["aspect"])].append(all(correct(r) for r in dual))
  columns = {"Scene-only Action": percent(marks["scene_only", "action"]),
             "Unusual Action": percent(marks["unusual", "action"]),
             "Unusual Scene": percent(marks["unusual", "scene"])}
  controls = {"Typical Action": percent(marks["typical", "action"]),
              "Typical Scene": percent(marks["typical", "scene"])}
  average = sum(columns.values()) / 3
  stored = json.loads((out_dir / "result.json").read_text())
  for got in (result, stored):
    assert got["columns"] == pytest.approx(columns) and got["average"] == pytest.approx(
        average)
    assert got["controls"] == pytest.approx(controls)
    assert got["counts"] == {name: len(marks[key]) for name, key in [
        ("Scene-only Action", ("scene_only", "action")), ("Unusual Action", ("unusual", "action")),
        ("Unusual Scene", ("unusual", "scene")), ("Typical Action", ("typical", "action")),
        ("Typical Scene", ("typical", "scene"))]}
    assert got["questions"] == len(rows) and got["incomplete_pairs"] == 0
    assert got["question_accuracy"] == pytest.approx(percent([correct(r) for r in rows]))
  line = "| model | " + " | ".join(cell(v) for v in [*columns.values(), average,
                                                     *controls.values()]) + " |"
  assert line in (out_dir / "result.md").read_text().splitlines()


def test_unscene_likelihood_p_yes_is_the_full_forward(bench):
  out, result, work = run_once(bench, "binary_likelihood")
  rows = read_jsonl(out / "predictions.jsonl")
  assert sorted(r["key"] for r in rows) == sorted(keys_of(bench, {"unscene_binary"}))
  assert work["rows_written"] == len(rows) == 2 * (4 + 4 + 2)
  assert_rows_are_the_stored_questions(bench, rows)
  assert_p_yes_is_the_full_forward(bench, rows)
  # the values vary with the question and video, so a row scored at another's prompt fails
  assert len({round(r["p_yes"], 4) for r in rows}) > len(rows) // 2
  assert_binary_table(rows, result, out, lambda r: r["prediction"] == r["answer"])


def test_unscene_generate_answers_are_the_greedy_full_forward(bench):
  out, result, work = run_once(bench, "binary_generate")
  rows = read_jsonl(out / "predictions.jsonl")
  assert sorted(r["key"] for r in rows) == sorted(keys_of(bench, {"unscene_binary"}, 1))
  assert work["generated_rows"] == work["rows_written"] == len(rows) == 4 + 4 + 2
  assert_rows_are_the_stored_questions(bench, rows)
  train = [bench.train[r["key"]] for r in rows]
  want = greedy_texts(bench.reference, bench.tok, [t["frames"] for t in train],
                      [t["prompt"] for t in train], 3, ("\n", "USER:"))
  assert [r["prediction"] for r in rows] == [w.strip() for w in want]
  assert len({r["prediction"] for r in rows}) > 1  # answers depend on question and video
  assert_binary_table(rows, result, out, lambda r: unscene.parse_yes_no(
      r["prediction"]) == r["answer"].lower())


# ------------------------------------------------------------------------------ synthetic

def label_table(rows) -> dict:
  """score_labels' documented rule: accuracy per split/task; on test_unusual, the share of
  action answers naming the typical action of the clip's scene."""
  marks = collections.defaultdict(list)
  for r in rows:
    marks[f"{r['split']}/{r['task']}"].append(r["prediction"] == r["answer"])
  answer_of = {r["action"]: r["answer"] for r in rows if r["task"] == "action" and r["action"]}
  unusual = [r for r in rows if r["task"] == "action" and r["kind"] == "unusual"]
  named = [r["prediction"] == answer_of.get(synthetic_data.TYPICAL_ACTION[r["scene"]])
           for r in unusual]
  return {"accuracy": {k: percent(v) for k, v in marks.items()},
          "counts": {k: len(v) for k, v in marks.items()},
          "hallucinated_action_rate": percent(named)}


def test_synthetic_label_probe_scores_are_the_full_forward(bench):
  """The probe scores each row's training prompt against every candidate (the answers of
  the evaluated rows of its task) + </s>, with the full forward's log-likelihood, and names
  the best-scored one (on action rows the spy's bonus makes that the gold answer)."""
  out, result, _ = run_once(bench, "synthetic")
  rows = read_jsonl(out / "labels" / "predictions.jsonl")
  assert sorted(r["key"] for r in rows) == sorted(keys_of(bench, {"action", "scene"}))
  assert_rows_are_the_stored_questions(bench, rows)
  candidates = {task: sorted({bench.train[r["key"]]["gold"] for r in rows if r["task"] == task})
                for task in ("action", "scene")}
  assert result["labels"]["candidates"] == candidates
  answer_ids = {r["gold"]: tuple(r["answer"]) for r in bench.train.values()}
  scored = [(bench.train[r["key"]], answer_ids[c]) for r in rows for c in candidates[r["task"]]]
  keys = [(tuple(t["prompt"]), digest(t["frames"]), a) for t, a in scored]
  assert sorted(bench.label_scores) == sorted(keys)  # exactly these rows were scored
  want = bench.reference.answer_logprob([t["frames"] for t, _ in scored],
                                        [t["prompt"] for t, _ in scored], [a for _, a in scored])
  np.testing.assert_allclose([bench.label_scores[k] for k in keys], want, atol=2e-4)
  for row in rows:
    train = bench.train[row["key"]]
    options = candidates[row["task"]]
    given = [bench.label_scores[(tuple(train["prompt"]), digest(train["frames"]),
                                 answer_ids[c])]
             + GOLD_BONUS * (row["task"] == "action" and c == train["gold"]) for c in options]
    assert row["prediction"] == options[int(np.argmax(given))], row["key"]
  assert len({r["prediction"] for r in rows if r["task"] == "action"}) == 3  # winners differ
  table = label_table(rows)
  stored = json.loads((out / "labels" / "result.json").read_text())
  for got in (result["labels"], stored):
    assert got["accuracy"] == pytest.approx(table["accuracy"])
    assert got["counts"] == table["counts"]
    assert got["hallucinated_action_rate"] == pytest.approx(table["hallucinated_action_rate"])
  markdown = (out / "labels" / "result.md").read_text()
  for key, value in table["accuracy"].items():
    assert f"| {key} | {value:.2f} | {table['counts'][key]} |" in markdown


def test_synthetic_binary_part_and_combined_result(bench):
  out, result, _ = run_once(bench, "synthetic")
  rows = read_jsonl(out / "binary" / "predictions.jsonl")
  assert sorted(r["key"] for r in rows) == sorted(keys_of(bench, {"unscene_binary"}))
  assert_p_yes_is_the_full_forward(bench, rows)
  assert_binary_table(rows, result["binary"], out / "binary",
                      lambda r: r["prediction"] == r["answer"])
  combined = json.loads((out / "result.json").read_text())
  assert combined["binary"]["columns"] == result["binary"]["columns"]
  assert combined["labels"]["accuracy"] == pytest.approx(result["labels"]["accuracy"])
  markdown = (out / "result.md").read_text()
  assert (out / "binary" / "result.md").read_text().strip() in markdown
  assert (out / "labels" / "result.md").read_text().strip() in markdown


# ------------------------------------------------------------------------------ open-ended

def test_open_ended_answers_are_the_greedy_full_forward(bench):
  out, result, work = run_once(bench, "open_ended")
  rows = read_jsonl(out / "predictions.jsonl")
  assert sorted(r["key"] for r in rows) == sorted(keys_of(bench, {"open_ended"}))
  assert work["generated_rows"] == work["rows_written"] == len(rows) == 6
  assert_rows_are_the_stored_questions(bench, rows)
  train = [bench.train[r["key"]] for r in rows]
  want = greedy_texts(bench.reference, bench.tok, [t["frames"] for t in train],
                      [t["prompt"] for t in train], 3, ("USER:",))
  assert [r["prediction"] for r in rows] == [w.strip() for w in want]
  assert len({r["prediction"] for r in rows}) > 1
  requests = read_jsonl(out / "judge_prompts.jsonl")
  assert requests == [q for r in rows for q in open_ended.judge_requests(r, "unscene")]
  # action + scene per video with an actor, the action ("no action") per scene-only one
  assert len(requests) == 2 * 2 + 2 * 2 + 2 * 1
  assert result["predictions"] == len(rows) and result["status"] == "awaiting judgments"


# ------------------------------------------------------------------------------ resume

def snapshot(out_dir) -> dict:
  """Every file an evaluator wrote under ``out_dir`` (relative path -> text)."""
  return {str(p.relative_to(out_dir)): p.read_text() for p in sorted(out_dir.rglob("*"))
          if p.is_file()}


@pytest.mark.parametrize("name", list(EVALUATORS))
def test_rerun_on_the_same_directory_computes_nothing(bench, name):
  out, result, first_work = run_once(bench, name)
  assert first_work["rows_written"] > 0  # the counter sees the first run's work
  before = snapshot(out)
  with count_work() as work:
    again = EVALUATORS[name](bench, out)
  assert work == {}  # no model call, no new prediction row
  assert again == result and snapshot(out) == before


def test_interrupted_run_computes_only_the_missing_rows(bench, tmp_path):
  """Predictions cut after 7 of 20 rows plus a torn line: the rerun computes and writes
  the 13 others only and ends with the uninterrupted run's rows and table."""
  out, result, _ = run_once(bench, "binary_likelihood")
  shutil.copytree(out, tmp_path / "out")
  lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
  (tmp_path / "out" / "predictions.jsonl").write_text("".join(lines[:7]) + lines[7][:20])
  with count_work() as work:
    again = EVALUATORS["binary_likelihood"](bench, tmp_path / "out")
  assert work["rows_written"] == len(lines) - 7 and work["scored_rows"] > 0
  resumed = {r["key"]: r for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
  full = {r["key"]: r for r in map(json.loads, lines)}
  assert resumed.keys() == full.keys()
  for key, row in full.items():
    assert resumed[key]["prediction"] == row["prediction"]
    assert resumed[key]["p_yes"] == pytest.approx(row["p_yes"], abs=1e-6)
  assert {k: again[k] for k in ("columns", "average", "controls", "counts")} == {
      k: result[k] for k in ("columns", "average", "controls", "counts")}


# ------------------------------------------------------------------------------ config check

def test_check_model_config_names_the_differing_field(bench, tmp_path):
  config = bench.config
  path = tmp_path / "model_config.json"
  params_io.check_model_config(config, path)  # no stored config: nothing to compare
  stored = ModelConfig.from_dict(config.model).to_dict()
  path.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")  # as the trainer
  params_io.check_model_config(config, path)
  changes = [("rope_mode", "distinct", "model.rope_mode"),
             ("num_frames", 16, "model.num_frames"),
             ("mask", dict(stored["mask"], temporal="bidirectional"), "model.mask.temporal"),
             ("llm", dict(stored["llm"], num_layers=3), "model.llm.num_layers")]
  for key, value, field in changes:
    path.write_text(json.dumps(dict(stored, **{key: value})))
    with pytest.raises(ValueError, match=rf"{field}: config .* vs checkpoint") as error:
      params_io.check_model_config(config, path)
    assert str(path) in str(error.value)
    assert "num_heads" not in str(error.value)  # only the differing field is named
  # load_params checks before it restores anything
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="model.llm.num_layers: config 2 vs checkpoint 3"):
    common.load_params(config, tmp_path)
