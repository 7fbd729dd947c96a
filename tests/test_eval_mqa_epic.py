"""`mashvlm eval --benchmark=mqa` on users' EPIC-KITCHENS-layout data (eval/mqa.py): a tiny
EPIC layout (two videos, seven segments written out of time order, a predictions file
that ranks ids the file does not name) built into a local_video_qa set; options by the
rule over the ranked ids (both branches), random options from the file's classes, prior
segments by start time, verb / noun accuracy by hand, the clear errors, and the command
from a user's directory on an untrained model, checked against a full forward."""
import importlib.util
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import run_cli, user_config_file
from test_data_video import write_indexed_mp4
from test_eval_values import FullForward, read_jsonl, sharpened

from mashvlm_jax.convert import params_io
from mashvlm_jax.data import annotations, builders, pipeline, recognizer, registry
from mashvlm_jax.data import tokenizer as tokenizer_lib
from mashvlm_jax.data.tasks import mqa
from mashvlm_jax.eval import common
from mashvlm_jax.eval import mqa as mqa_eval
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig

# The user's config: the tiny model at 32x32 with 2 decoder layers, the EPIC file as split
# "val" (the evaluated split) and an MVBench-layout file as split "mcq" (no EPIC items).
CONFIG = """
def get_config(arg=None):
  config = tiny.get_config(arg)
  config.model.vision.image_size = 32
  config.model.llm.num_layers = 2
  config.model.llm.vocab_size = 256
  config.data.update(name="local_video_qa", data_dir="cache", eval_splits=("val",),
                     annotations={"val": "epic.json", "mcq": "mcq.json"},
                     video_root="videos", mqa_predictions="predictions.jsonl")
  config.data.tokenizer.update(kind="hf", path="tokenizer.json")
  return config
"""

WORDS = {(0, 3): ("take", "plate"), (1, 3): ("wash", "plate"), (2, 5): ("open", "fridge"),
         (0, 5): ("take", "fridge"), (4, 7): ("cut", "onion"), (3, 9): ("put", "cup"),
         (2, 9): ("open", "cup")}
ID = {k: annotations.epic_action_id(*k) for k in WORDS}  # (verb, noun) -> verb*1000+noun
NAME = {ID[k]: f"{v} {n}" for k, (v, n) in WORDS.items()}
# (id, video, start, stop, (verb, noun)) in file order; by start time P01_01 is a, b, c, d
# and P01_02 is a, c, b.
SEGMENTS = [("P01_01_b", "P01_01.mp4", 1.0, 1.9, (1, 3)),
            ("P01_01_a", "P01_01.mp4", 0.0, 0.9, (0, 3)),
            ("P01_01_d", "P01_01.mp4", 3.0, 3.9, (4, 7)),
            ("P01_01_c", "P01_01.mp4", "00:00:02.00", 2.9, (2, 5)),
            ("P01_02_a", "P01_02.mp4", 0.5, 1.5, (3, 9)),
            ("P01_02_b", "P01_02.mp4", 2.0, 3.0, (0, 5)),
            ("P01_02_c", "P01_02.mp4", 1.0, 2.0, (2, 9))]
GT = {s[0]: ID[s[4]] for s in SEGMENTS}
UNNAMED = 999_999  # a ranked id no record names
# P01_01_c: the ground truth in the named top 5; P01_01_d: not (top 4 + gt)
RANKED = {"P01_01_c": [2005, 3, UNNAMED, 1003, 4007, 5, 3009, 2009],
          "P01_01_d": [3, UNNAMED, 1003, 5, 3009, 2009, 2005, 4007]}
ORDER = sorted(NAME) + [UNNAMED]
for _k, (_clip, *_) in enumerate(SEGMENTS):
  RANKED.setdefault(_clip, [ORDER[(_k + j) % len(ORDER)] for j in range(len(ORDER))])


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  """The user's directory (videos, annotations, predictions, tokenizer, config), its data
  set built and an untrained sharpened model saved to ckpt/; (root, config, params)."""
  root = tmp_path_factory.mktemp("epic_user")
  (root / "videos").mkdir()
  for name in ("P01_01", "P01_02"):
    write_indexed_mp4(root / "videos" / f"{name}.mp4", 40, width=32, height=32)
  records = [{"id": i, "video": v, "start": a, "stop": b, "narration": " the ".join(WORDS[k]),
              "verb": WORDS[k][0], "verb_class": k[0], "noun": WORDS[k][1],
              "noun_class": k[1]} for i, v, a, b, k in SEGMENTS]
  (root / "epic.json").write_text(json.dumps(records))
  (root / "mcq.json").write_text(json.dumps([{
      "video": "P01_01.mp4", "question": "What happens?",
      "candidates": ["take plate", "wash plate"], "answer": "take plate"}]))
  (root / "predictions.jsonl").write_text(
      "".join(json.dumps({"id": k, "ranked": v}) + "\n" for k, v in RANKED.items()))
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(
      builders.vocabulary_texts() + list(NAME.values()) + ["What happens?"]),
      root / "tokenizer.json")
  (root / "epic_config.py").write_text(user_config_file(CONFIG))
  cwd = os.getcwd()
  os.chdir(root)  # the config's relative paths, as the command reads them
  try:
    loader = importlib.util.spec_from_file_location("epic_config", "epic_config.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    config = module.get_config()
    config.data.data_dir = str(root / "cache")
    for split, name in (("val", "epic.json"), ("mcq", "mcq.json")):
      config.data.annotations[split] = str(root / name)
    config.data.video_root = str(root / "videos")
    config.data.mqa_predictions = str(root / "predictions.jsonl")
    config.data.tokenizer.path = str(root / "tokenizer.json")
    registry.ensure_built(config)
  finally:
    os.chdir(cwd)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(3))))
  params_io.save_params(root / "ckpt", params, cfg)
  return root, config, params


def val_items(config, source, predictions=None, max_items=0):
  ranked = {} if predictions is None else predictions
  return {i["id"]: i for i in mqa_eval.epic_item_list(
      mqa_eval.epic_records(config, ["val"], max_items), source, ranked,
      "predictions.jsonl")}


# ------------------------------------------------------------------------------ items

def test_recognizer_options_are_the_rule_over_the_named_ranked_ids(user):
  _, config, _ = user
  items = val_items(config, "recognizer", RANKED)
  assert sorted(items) == sorted(GT)
  # by hand: the named ranked ids' top 5 holds "open fridge" (2005) for P01_01_c; for
  # P01_01_d "cut onion" (4007) is 7th of the named ids, so top 4 + the ground truth
  assert sorted(items["P01_01_c"]["classes"]) == sorted([2005, 3, 1003, 4007, 5])
  assert sorted(items["P01_01_d"]["classes"]) == sorted([3, 1003, 5, 3009, 4007])
  for clip, item in items.items():
    named = [c for c in RANKED[clip] if c != UNNAMED]
    rng = mqa_eval.clip_rng(clip, "recognizer")  # options shuffled as the synthetic ones
    assert (item["classes"], item["answer"]) == mqa.shuffled(
        mqa.mqa_options(GT[clip], named), GT[clip], rng)
    assert item["classes"][item["answer"]] == GT[clip]
    assert item["options"] == [NAME[c] for c in item["classes"]]  # "verb noun"
  orders = {tuple(sorted(range(5), key=lambda k: i["classes"][k])) for i in items.values()}
  assert len(orders) > 1  # each clip its own shuffle


def test_random_options_come_from_the_files_classes(user):
  _, config, _ = user
  items = val_items(config, "random")
  seen = set()
  for clip, item in items.items():
    assert len(set(item["classes"])) == 5 and set(item["classes"]) <= set(NAME)
    rng = mqa_eval.clip_rng(clip, "random")
    drawn = mqa.random_options(GT[clip], sorted(NAME), 5, rng)
    assert (item["classes"], item["answer"]) == mqa.shuffled(drawn, GT[clip], rng)
    seen |= set(item["classes"])
  assert seen == set(NAME)  # all 7 classes of the file, none of the unnamed ranked ids
  assert items == val_items(config, "random")  # seeded per clip


def test_prior_segments_are_the_previous_two_of_the_video_by_start_time(user):
  _, config, _ = user
  items = val_items(config, "recognizer", RANKED)
  by_id = {(i["split"], i["id"]): i for i in items.values()}
  want = {"P01_01_a": None, "P01_01_b": None, "P01_01_c": ["P01_01_a", "P01_01_b"],
          "P01_01_d": ["P01_01_b", "P01_01_c"], "P01_02_a": None, "P01_02_c": None,
          "P01_02_b": ["P01_02_a", "P01_02_c"]}
  assert {k: i["previous"] for k, i in items.items()} == want
  assert {k: i["position"] for k, i in items.items()} == {
      "P01_01_a": 0, "P01_01_b": 1, "P01_01_c": 2, "P01_01_d": 3, "P01_02_a": 0,
      "P01_02_c": 1, "P01_02_b": 2}

  def gt(clip):
    return mqa_eval.previous_narrations(items[clip], "likelihood", "gt", by_id, None)
  assert gt("P01_01_d") == ["wash plate", "open fridge"]  # file order would say b, a
  assert gt("P01_02_b") == ["put cup", "open cup"]
  assert gt("P01_01_b") is None
  # --max_items=2 takes the first two records of the file (b, a): neither has two before
  first = val_items(config, "recognizer", RANKED, max_items=2)
  assert sorted(first) == ["P01_01_a", "P01_01_b"]
  assert [first[k]["position"] for k in ("P01_01_a", "P01_01_b")] == [0, 1]


# ------------------------------------------------------------------------------ scores

def test_verb_and_noun_accuracy_by_hand():
  def row(method, gt, classes, prediction, split="val"):
    return {"split": split, "method": method, "kind": "", "scene": "", "gt": gt,
            "classes": classes, "answer": classes.index(gt), "prediction": prediction}
  options = [3, 1003, 2005, 5, 4007]  # take plate, wash plate, open fridge, take fridge, cut onion
  rows = [row("likelihood", 3, options, 0),     # right: verb and noun right
          row("likelihood", 3, options, 1),     # wash plate: noun right, verb wrong
          row("likelihood", 3, options, 3),     # take fridge: verb right, noun wrong
          row("likelihood", 2005, options, 4),  # cut onion: both wrong
          row("generate", 5, options, None),    # no option named: all wrong
          row("generate", 5, options, 2)]       # open fridge for take fridge: noun right
  result = mqa_eval.epic_score(rows)
  assert result["accuracy"] == {"val": {"generate": 0.0, "likelihood": 25.0}}
  assert result["verb_accuracy"] == {"val": {"generate": 0.0, "likelihood": 50.0}}
  assert result["noun_accuracy"] == {"val": {"generate": 50.0, "likelihood": 50.0}}
  assert result["counts"] == {"val": {"generate": 2, "likelihood": 4}}
  assert "hallucinated_action_rate" not in result and "typical_offered" not in result
  text = mqa_eval.epic_table(result)
  assert "| val | likelihood | 25.00 | 50.00 | 50.00 | 4 |" in text
  assert mqa_eval.EPIC_NOTE in text


def test_record_scan_reads_ids_without_decoding_frames(user, monkeypatch):
  _, config, _ = user
  expected = mqa_eval.epic_records(config, ["val"])
  raw = registry.data_source(config, "val", video=False)[0]["video"]
  assert isinstance(raw, bytes), type(raw)  # the stored feature, not a uint8 array

  def no_frames(*args, **kwargs):
    raise AssertionError("the record scan decoded a whole record")
  monkeypatch.setattr(pipeline, "decode_record", no_frames)
  assert mqa_eval.epic_records(config, ["val"]) == expected


# ------------------------------------------------------------------------------ errors

def test_errors_name_the_split_file_and_clip(user):
  _, config, _ = user
  with pytest.raises(ValueError, match="split 'mcq' .* holds no EPIC-KITCHENS segments "
                                       r"\(its items' tasks: \{'mvbench/mcq': 1\}\)"):
    mqa_eval.epic_records(config, ["mcq"])
  records = mqa_eval.epic_records(config, ["val"])
  missing = {k: v for k, v in RANKED.items() if k != "P01_01_a"}
  with pytest.raises(ValueError, match=r"predictions.jsonl: no prediction for clip "
                                       r"'P01_01_a' \(.*epic.json record 1, split 'val'\)"):
    mqa_eval.epic_item_list(records, "recognizer", missing, "predictions.jsonl")
  short = dict(RANKED, P01_01_a=[3, 1003, UNNAMED, 888_888, 777_777])
  with pytest.raises(ValueError, match=r"predictions.jsonl: the prediction of clip "
                                       r"'P01_01_a' ranks 2 action ids that .*epic.json "
                                       r"names, fewer than K=5"):
    mqa_eval.epic_item_list(records, "recognizer", short, "predictions.jsonl")
  unset = config.copy_and_resolve_references()
  unset.data.mqa_predictions = ""
  with pytest.raises(ValueError, match="data.mqa_predictions, which is not set"):
    mqa_eval.predictions_file(unset)


# ------------------------------------------------------------------------------ command

def test_eval_mqa_command_on_users_data(user):
  """`mashvlm eval --benchmark=mqa --prior=self` from the user's directory with relative
  paths on the untrained model: every val segment answered by both methods, likelihood
  scores of a full forward at the segment's own frames, self priors from the method's
  answers to the previous segments by start time, the result recomputed by hand; a resume
  with another --prior is refused."""
  root, config, params = user
  run = run_cli("eval", "--config=epic_config.py", "--checkpoint=ckpt", "--benchmark=mqa",
                "--prior=self", "--batch_size=4", "--out=out/mqa", cwd=root, timeout=600)
  out = root / "out" / "mqa"
  assert mqa_eval.EPIC_NOTE in run.stdout
  rows = {r["key"]: r for r in read_jsonl(out / "predictions.jsonl")}
  assert sorted(rows) == sorted(f"val:{c}:{m}" for c in GT for m in ("generate", "likelihood"))
  items = val_items(config, "recognizer", recognizer.read_predictions(
      root / "predictions.jsonl", num_classes=None))
  previous = {"P01_01_c": ["P01_01_a", "P01_01_b"], "P01_01_d": ["P01_01_b", "P01_01_c"],
              "P01_02_b": ["P01_02_a", "P01_02_c"]}
  for r in rows.values():
    item = items[r["id"]]
    assert (r["classes"], r["answer"], r["gt"]) == (item["classes"], item["answer"],
                                                    GT[r["id"]])
    if r["id"] in previous:  # the same method's answers (first option when none named)
      said = [rows[f"val:{c}:{r['method']}"] for c in previous[r["id"]]]
      assert r["previous"] == [s["options"][s["prediction"] or 0] for s in said]
    else:
      assert r["previous"] is None
    assert r["question"] == mqa.question(r["options"], r["previous"])
  likelihood = [r for r in rows.values() if r["method"] == "likelihood"]
  frames = {r["id"]: r["frames"] for r in pipeline.make_eval_records(config, "val")}
  prompter = common.Prompter(config)
  tok = prompter.tok
  reference = FullForward(ModelConfig.from_dict(config.model), params, width=112)
  want = reference.answer_logprob(
      [frames[r["id"]] for r in likelihood for _ in range(5)],
      [prompter(r["question"]) for r in likelihood for _ in range(5)],
      [tok.encode(mqa.answer(r["options"], k)) + [tok.eos_id] for r in likelihood
       for k in range(5)]).reshape(len(likelihood), 5)
  for r, w in zip(likelihood, want):
    np.testing.assert_allclose(r["logprobs"], w, atol=2e-3)
    assert r["prediction"] == int(np.argmax(w))
  result = json.loads((out / "result.json").read_text())
  for method in ("likelihood", "generate"):
    mine = [r for r in rows.values() if r["method"] == method]
    chosen = [None if r["prediction"] is None else r["classes"][r["prediction"]]
              for r in mine]
    for metric, part in (("accuracy", lambda c: c), ("verb_accuracy", lambda c: c // 1000),
                         ("noun_accuracy", lambda c: c % 1000)):
      marks = [c is not None and part(c) == part(r["gt"]) for c, r in zip(chosen, mine)]
      assert result[metric]["val"][method] == pytest.approx(100.0 * np.mean(marks))
    assert result["counts"]["val"][method] == 7
  assert "hallucinated_action_rate" not in result and result["splits"] == ["val"]
  assert result["predictions"] == str(root / "predictions.jsonl")
  assert mqa_eval.EPIC_NOTE in (out / "result.md").read_text()
  settings = json.loads((out / "settings.json").read_text())
  assert settings["data"] == registry.builder(config).builder_config.name
  with pytest.raises(ValueError, match="holds mqa predictions made with"):
    mqa_eval.evaluate(config, params, out, prior="gt", show_progress=False)
