"""`mashvlm eval --benchmark=mqa` (eval/mqa.py): options by the rule and seeded per clip,
likelihood choices and greedy answers against a full forward of a tiny random model,
prior prompts from the ground truth or the method's own earlier answers, resume, the
result table from the predictions, and the command end to end (slow)."""
import json
import os
import subprocess
import sys

import jax
import flax.linen as nn
import numpy as np
import pytest

from conftest import ROOT
from test_eval_values import (FullForward, count_work, greedy_texts, read_jsonl, sharpened,
                              tiny_eval_config)
from mashvlm_jax.data import recognizer, registry
from mashvlm_jax.data.tasks import mqa
from mashvlm_jax.eval import common
from mashvlm_jax.eval import mqa as mqa_eval
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig


# ------------------------------------------------------------------------------ pure parts

def test_clip_options_follow_the_rule_and_are_seeded_by_clip():
  ranked = [7, 3, 36, 9, 12, 40, 1]
  for source in mqa_eval.OPTION_SOURCES:
    for gt in (36, 40):
      classes, index = mqa_eval.clip_options("test_unusual/000003", gt, source, ranked)
      assert classes[index] == gt and classes.count(gt) == 1 and len(set(classes)) == 5
      assert (classes, index) == mqa_eval.clip_options("test_unusual/000003", gt, source,
                                                       ranked)
      if source == "recognizer":  # top 5 holding gt, else top 4 + gt
        assert sorted(classes) == sorted([7, 3, 36, 9, 12] if gt == 36 else [7, 3, 36, 9, 40])
  orders = {tuple(mqa_eval.clip_options(f"test_typical/{i:06d}", 36, "recognizer", ranked)[0])
            for i in range(40)}
  assert len(orders) > 20  # clips are shuffled independently
  with pytest.raises(ValueError, match="option source"):
    mqa_eval.clip_options("x/000001", 3, "avion", ranked)


def test_score_by_hand():
  def row(split, method, prediction, answer=0, kind="typical", scene="beach", classes=None):
    return {"split": split, "method": method, "prediction": prediction, "answer": answer,
            "kind": kind, "scene": scene, "classes": classes or [0, 1, 2, 3, 4]}
  running_beach, swimming_beach = 36, 28  # running is the beach's typical action
  rows = [row("test_typical", "likelihood", 0), row("test_typical", "likelihood", 1),
          row("test_typical", "generate", None),
          row("test_unusual", "likelihood", 2, answer=0, kind="unusual",
              classes=[swimming_beach, 5, running_beach, 6, 7]),
          row("test_unusual", "likelihood", 0, answer=0, kind="unusual",
              classes=[swimming_beach, 5, 9, 6, 7])]
  result = mqa_eval.score(rows)
  assert result["accuracy"] == {"test_typical": {"generate": 0.0, "likelihood": 50.0},
                                "test_unusual": {"likelihood": 50.0}}
  assert result["counts"]["test_typical"] == {"generate": 1, "likelihood": 2}
  assert result["hallucinated_action_rate"] == {"likelihood": 50.0}
  assert result["typical_offered"] == {"likelihood": 50.0}


def test_items_take_previous_clips_from_the_same_video():
  records = [("test_unusual", {"id": f"test_unusual/{i:06d}", "action": "running",
                               "scene": "forest", "kind": "unusual", "frames": None})
             for i in range(11)]
  got = mqa_eval.items(records, "random")
  assert [i["position"] for i in got] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2]
  assert got[2]["previous"] == ["test_unusual/000000", "test_unusual/000001"]
  assert got[7]["previous"] == ["test_unusual/000005", "test_unusual/000006"]
  assert got[9]["previous"] is None and got[10]["previous"] == ["test_unusual/000008",
                                                                "test_unusual/000009"]


# ------------------------------------------------------------------------------ values

@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A tiny random model on the tiny synthetic set (16 train clips, 4 per test split)."""
  config = tiny_eval_config(tmp_path_factory.mktemp("data"))
  config.data.update(train_size=16, test_size=4)
  registry.ensure_built(config)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(1))))
  return dict(config=config, params=params, reference=FullForward(cfg, params, width=96),
              prompter=common.Prompter(config))


def run(bench, out, **kwargs):
  return mqa_eval.evaluate(bench["config"], bench["params"], out, batch_size=3,
                           show_progress=False, **kwargs)


def test_choices_and_answers_are_the_full_forward_and_self_priors_chain(bench, tmp_path):
  """Recognizer-B options and --prior=self on the first 3 clips of test_unusual: options
  by the rule over an independently fitted recognizer B, likelihood scores and greedy
  answers of a full forward, the third clip's prompt stating the method's own answers to
  the first two; a rerun computes nothing; another setting in the directory is refused."""
  config, reference, prompter = bench["config"], bench["reference"], bench["prompter"]
  tok = prompter.tok
  data = recognizer.SyntheticSet.from_config(registry.builder(config).builder_config)
  model_b = recognizer.fit_synthetic(data, ["B"])["B"]
  ranked = recognizer.synthetic_predictions(model_b, data, "test_unusual")
  frames = {r["id"]: r["frames"] for _, r in common.eval_records(config, ["test_unusual"])}
  kwargs = dict(source="recognizer", prior="self", splits=["test_unusual"], max_items=3)
  result = run(bench, tmp_path, **kwargs)
  rows = {r["key"]: r for r in read_jsonl(tmp_path / "predictions.jsonl")}
  assert sorted(rows) == [f"test_unusual:test_unusual/{i:06d}:{m}" for i in range(3)
                          for m in ("generate", "likelihood")]
  for r in rows.values():
    assert (r["classes"], r["answer"]) == mqa_eval.clip_options(r["id"], r["gt"], "recognizer",
                                                                ranked[r["id"]])
    assert r["options"] == [mqa.narration(c) for c in r["classes"]]
    index = int(r["id"][-6:])
    if index < 2:
      assert r["previous"] is None
    else:  # the method's own answers (the first option when it named none)
      earlier = [rows[f"test_unusual:test_unusual/{i:06d}:{r['method']}"] for i in (0, 1)]
      assert r["previous"] == [e["options"][e["prediction"] or 0] for e in earlier]
    assert r["question"] == mqa.question(r["options"], r["previous"])
  likelihood = [r for r in rows.values() if r["method"] == "likelihood"]
  answers = [tok.encode(mqa.answer(r["options"], k)) + [tok.eos_id] for r in likelihood
             for k in range(5)]
  want = reference.answer_logprob([frames[r["id"]] for r in likelihood for _ in range(5)],
                                  [prompter(r["question"]) for r in likelihood for _ in range(5)],
                                  answers).reshape(len(likelihood), 5)
  for r, w in zip(likelihood, want):
    np.testing.assert_allclose(r["logprobs"], w, atol=2e-3)
    assert r["prediction"] == int(np.argmax(w))
  generated = [r for r in rows.values() if r["method"] == "generate"]
  texts = greedy_texts(reference, tok, [frames[r["id"]] for r in generated],
                       [prompter(r["question"]) for r in generated], 12, ("\n",))
  for r, text in zip(generated, texts):
    assert r["response"] == text and r["prediction"] == mqa.answer_index(text, r["options"])
  assert result["accuracy"] == {"test_unusual": {
      m: 100.0 * np.mean([r["prediction"] == r["answer"] for r in rows.values()
                          if r["method"] == m]) for m in ("generate", "likelihood")}}
  files = {p.name: p.read_text() for p in tmp_path.iterdir()}
  with count_work() as work:
    run(bench, tmp_path, **kwargs)
  assert work == {}  # a rerun computes nothing and writes no row
  assert {p.name: p.read_text() for p in tmp_path.iterdir()} == files
  with pytest.raises(ValueError, match="holds mqa predictions made with"):
    run(bench, tmp_path, **dict(kwargs, prior="gt"))


def test_gt_prior_states_the_ground_truth_of_the_previous_clips():
  records = [("test_typical", {"id": f"test_typical/{i:06d}", "action": action,
                               "scene": "beach", "kind": "", "frames": None})
             for i, action in enumerate(("skiing", "boxing", "running"))]
  items = mqa_eval.items(records, "random")
  by_id = {(i["split"], i["id"]): i for i in items}
  assert mqa_eval.previous_narrations(items[2], "likelihood", "gt", by_id, None) == [
      "skiing on a beach", "boxing on a beach"]
  assert mqa_eval.previous_narrations(items[2], "likelihood", "none", by_id, None) is None
  assert mqa_eval.previous_narrations(items[1], "generate", "gt", by_id, None) is None


# ------------------------------------------------------------------------------ command

@pytest.mark.slow
def test_eval_mqa_command_end_to_end(tmp_path):
  """make-data, a 2-step training run and `mashvlm eval --benchmark=mqa` with both option
  sources and every --prior mode, from a user's working directory with relative paths."""
  data = [f"--config={ROOT}/configs/tiny_synthetic.py", "--config.data.builder_config=tiny",
          "--config.data.test_size=3", "--config.data.batch_size=4"]

  def cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MASHVLM_DATA_DIR="data",
               PYTHONPATH=str(ROOT))
    env.pop("PYTEST_CURRENT_TEST", None)
    out = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  cli("make-data", *data)
  cli("train", *data, "--workdir=run", "--config.total_steps=2", "--config.checkpoint_every=2",
      "--config.log_every=1")
  out = cli("eval", *data, "--checkpoint=run", "--benchmark=mqa",
            "--mqa_options=recognizer,random")
  both = tmp_path / "run/eval/step2/mqa-recognizer+random-prior_none"
  assert "| options | split | method | accuracy % | clips |" in out
  result = json.loads((both / "result.json").read_text())
  assert set(result["sources"]) == {"recognizer", "random"}
  for source in ("recognizer", "random"):
    assert result["sources"][source]["counts"] == {
        s: {"generate": 3, "likelihood": 3} for s in ("test_typical", "test_unusual")}
    assert len(read_jsonl(both / source / "predictions.jsonl")) == 12
  for source, prior in (("random", "gt"), ("recognizer", "self")):
    cli("eval", *data, "--checkpoint=run", "--benchmark=mqa", f"--mqa_options={source}",
        f"--prior={prior}", "--out=mqa_" + prior)
    rows = read_jsonl(tmp_path / f"mqa_{prior}" / "predictions.jsonl")
    assert len(rows) == 12 and all(r["previous"] for r in rows if r["id"].endswith("2"))
    assert json.loads((tmp_path / f"mqa_{prior}" / "settings.json").read_text())[
        "prior"] == prior
