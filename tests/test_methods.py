"""benchmarks/methods.py: Welch's and the paired test against independent computations,
and a 2-arm, 1-seed study with a fine-tuning arm that trains, scores, resumes and renders."""
import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from mashvlm_jax import provenance

sys.path.insert(0, str(ROOT / "benchmarks"))
import methods  # noqa: E402


def t_tail_by_integration(t: float, df: float) -> float:
  """P(|T| >= |t|) by integrating Student's t density numerically (substituting
  x = tan(u) to cover the infinite tail)."""
  u = np.linspace(math.atan(abs(t)), math.pi / 2, 200001)[:-1]
  x = np.tan(u)
  log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
  density = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df)) / np.cos(u) ** 2
  return 2 * float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(u)))


def test_student_t_p_values():
  assert abs(methods.t_two_sided_p(2.228138851986, 10) - 0.05) < 1e-9  # table value
  assert abs(methods.t_two_sided_p(1.0, 1) - 0.5) < 1e-12  # Cauchy: 2 * (1/2 - atan(1)/pi)
  for t, df in ((0.3, 2.0), (2.2514, 5.52), (4.0, 3.7), (-1.7, 30.0), (12.0, 2.0)):
    assert abs(methods.t_two_sided_p(t, df) - t_tail_by_integration(t, df)) < 1e-6, (t, df)


def test_welch_by_hand():
  a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
  # means 2.5 and 6; variances 5/3 and 10; squared standard errors 5/12 and 2
  se2 = 5 / 12 + 2
  df = se2 ** 2 / ((5 / 12) ** 2 / 3 + 2 ** 2 / 4)
  test = methods.welch(a, b)
  assert test["diff"] == -3.5
  assert abs(test["t"] - (-3.5 / math.sqrt(se2))) < 1e-12
  assert abs(test["df"] - df) < 1e-12
  assert abs(test["p"] - t_tail_by_integration(3.5 / math.sqrt(se2), df)) < 1e-6
  assert methods.welch([1.0], b) is None  # one seed: no test
  assert methods.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0
  same = lambda values: [{"v": v} for v in values]  # noqa: E731
  assert methods._comparison(same([1.0, 1.0]), same([2.0, 2.0]), lambda r: r["v"]) == (
      "-1.00 (no spread in either arm, no test)")


def test_paired_by_hand_and_against_scipy():
  import scipy.stats
  a = {0: 10.0, 1: 12.0, 2: 17.0, 3: 9.0}
  b = {0: 8.0, 1: 11.0, 2: 13.0, 4: 100.0}  # seed 4 has no partner; seed 3 neither
  # differences 2, 1, 4: mean 7/3, sample variance 7/3, t = (7/3) / sqrt(7/9) = sqrt 7
  test = methods.paired(a, b)
  assert test["n"] == 3 and test["df"] == 2.0
  assert abs(test["diff"] - 7 / 3) < 1e-12 and abs(test["t"] - math.sqrt(7)) < 1e-12
  reference = scipy.stats.ttest_rel([10.0, 12.0, 17.0], [8.0, 11.0, 13.0])
  assert abs(test["t"] - reference.statistic) < 1e-12
  assert abs(test["p"] - reference.pvalue) < 1e-9
  # a shift every seed shares: Welch sees two overlapping groups, the pairs do not
  shifted = {s: v + 1.0 + 0.1 * s for s, v in b.items()}
  assert methods.paired(shifted, b)["p"] < 0.01
  assert methods.welch([shifted[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)])["p"] > 0.5
  assert methods.paired({0: 1.0}, {0: 2.0}) is None  # one shared seed: no test
  assert methods.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["p"] == 1.0
  runs = lambda values: [{"seed": s, "v": v} for s, v in enumerate(values)]  # noqa: E731
  assert methods._comparison(runs([2.0, 3.0]), runs([1.0, 2.0]), lambda r: r["v"], True) == (
      "+1.00 (the same difference on every seed, no test)")


def test_which_arms_are_paired_with_their_reference():
  arms = methods.ARMS
  # scores the reference's own runs; fine-tunes the reference's runs; shares the parent
  for name in ("mash+rve", "baseline+rve-b2", "mash+mix", "mash+haca", "mash+mqa"):
    assert methods.pairs_with_reference(arms[name]), name
  # independent trainings: presets from scratch, the regime arms, TPL-filtered runs
  for name in ("mash", "baseline", "mash@p0.7+uniformneg+steps9000", "mash@tpl-top"):
    assert not methods.pairs_with_reference(arms[name]), name


def study(tmp_path, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTEST_CURRENT_TEST", None)
  return subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--arms=mash,mash+mix,mash+rve-b2,mash+haca,mash@tpl-top",
       "--seeds=0", "--steps=3", "--eval_items=2", "--builder_config=tiny",
       f"--root={tmp_path / 'runs'}", f"--data_dir={tmp_path / 'data'}",
       f"--doc={tmp_path / 'methods.md'}", *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_arms_that_fine_tune_and_that_only_evaluate(tmp_path):
  out = study(tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  runs = tmp_path / "runs"
  results = {name: json.loads((runs / name / "seed0" / "result.json").read_text())
             for name in ("mash", "mash+mix")}
  assert results["mash+mix"]["parent"] == "mash"
  assert all(r["steps"] == 3 for r in results.values())
  # each result names the code that wrote it; each training run, the code of each segment
  assert {r["written_by"]["git_commit"] for r in results.values()} == {
      provenance.code_version()["git_commit"]}
  segments = (runs / "mash+mix" / "seed0" / "segments.jsonl").read_text().splitlines()
  assert [json.loads(l)["start_step"] for l in segments] == [0]
  # the fine-tuning run started from the stage-1 run's parameters, with its own step count
  tuned = json.loads((runs / "mash+mix" / "seed0" / "config.json").read_text())
  assert tuned["init_from"] == str(runs / "mash" / "seed0")
  assert tuned["total_steps"] == 3
  # the RVE arm: no training, the stage-1 run evaluated with its heads file and beta 2
  enhanced = json.loads((runs / "mash+rve-b2" / "seed0" / "result.json").read_text())
  assert enhanced["parent"] == "mash" and enhanced["train_s"] == 0.0
  assert enhanced["rve"]["beta"] == 2.0 and enhanced["rve"]["scope"] == "global"
  heads = json.loads((runs / "mash" / "seed0" / "rve_heads.json").read_text())
  assert len(heads["pairs"]) == methods.RVE_HEAD_PAIRS
  assert enhanced["rve"]["layers"] == heads["layers"]
  assert (runs / "mash" / "seed0" / "rve_heads.png").exists()
  assert not (runs / "mash+rve-b2" / "seed0" / "checkpoints").exists()
  assert enhanced["train_metrics"] == results["mash"]["train_metrics"]
  # a task-family arm fine-tunes on its rows and reports its extra benchmarks
  haca = json.loads((runs / "mash+haca" / "seed0" / "result.json").read_text())
  assert haca["overrides"]["data.train_tasks"] == ["haca"]
  pairs = json.loads((runs / "mash+haca" / "seed0" / "eval" / "entailment" /
                      "result.json").read_text())
  assert haca["extra"]["entailment"]["pair_accuracy"] == pairs["pair_accuracy"]
  assert set(haca["extra"]["retrieval"]["map"]) == {"unusual", "typical"}
  # the TPL arm trains from scratch on the third of the rows the stage-1 run ranks top
  filtered = json.loads((runs / "mash@tpl-top" / "seed0" / "config.json").read_text())
  scored = runs / "mash" / "seed0" / "tpl" / "tpl.jsonl"
  assert filtered["data"]["row_filter"]["path"] == str(scored) and not filtered["init_from"]
  assert filtered["data"]["row_filter"]["rule"] == "top"
  assert sum(1 for _ in scored.open()) > 0
  doc = (tmp_path / "methods.md").read_text()
  assert "Status: complete" in doc
  assert "| `mash` | 1 |" in doc and "| `mash+mix` | 1 |" in doc
  assert "| `mash+mix` | `mash` |" in doc  # the comparison row names its reference
  avg = methods._mean_sd([results["mash"]["binary"]["average"]])
  assert avg in doc
  assert "Entailment pairs" in doc and "| `mash+haca` | `mash+mix` |" in doc
  assert "MQA recognizer-B options, unusual" in doc  # the control is scored on it too

  # a rerun skips finished runs: nothing is trained or rewritten
  stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("result.json")}
  out = study(tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  assert {p: p.stat().st_mtime_ns for p in runs.rglob("result.json")} == stamps
  assert "train:" not in out.stderr

  # an arm that gained benchmarks since its run finished: scored on them, not retrained
  control = runs / "mash+mix" / "seed0" / "result.json"
  before = json.loads(control.read_text())
  assert set(before["extra"]) == {"entailment", "retrieval", "mqa"}
  control.write_text(json.dumps({k: v for k, v in before.items() if k != "extra"}))
  out = study(tmp_path)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "train:" not in out.stderr
  assert json.loads(control.read_text()) == before

  # a missing seed shows as PARTIAL, naming the missing runs
  out = study(tmp_path, "--seeds=0,1", "--render_only")
  assert out.returncode == 0, out.stderr[-4000:]
  assert ("PARTIAL: 5 of 10 runs finished; missing: mash/seed1, mash+mix/seed1, "
          "mash+rve-b2/seed1, mash+haca/seed1, mash@tpl-top/seed1") in (
      tmp_path / "methods.md").read_text()
  assert not pathlib.Path(runs / "mash" / "seed1").exists()


def test_a_finished_run_of_other_settings_is_refused(tmp_path):
  arm = methods.ARMS["mash@p0.125"]
  args = argparse.Namespace(steps=0, regime="shortcut", eval_items=48)
  same = {"overrides": dict(arm.overrides), "steps": 1500, "eval_items": 48}
  assert methods.check_finished(arm, same, tmp_path / "result.json", args) is same
  older = {"overrides": {"ablation": "mash"}, "steps": 1500, "eval_items": 48}
  with pytest.raises(SystemExit, match="holds a run with overrides"):
    methods.check_finished(arm, older, tmp_path / "result.json", args)
  with pytest.raises(SystemExit, match=r"steps 50\)"):
    methods.check_finished(arm, same, tmp_path / "result.json",
                           argparse.Namespace(steps=50, regime="shortcut", eval_items=48))
  # tuples in the overrides are lists in the result file: the same settings
  haca = methods.ARMS["mash+haca"]
  stored = json.loads(json.dumps({"overrides": methods.effective_overrides(haca, "shortcut"),
                                  "steps": 500, "eval_items": 48}))
  assert stored["overrides"]["data.train_tasks"] == ["haca"]
  assert methods.check_finished(haca, stored, tmp_path / "result.json", args) is stored
  # a run of the shortcut regime is not the same arm under the motion regime
  motion = argparse.Namespace(steps=0, regime="motion", eval_items=48)
  with pytest.raises(SystemExit, match="holds a run with overrides"):
    methods.check_finished(haca, stored, tmp_path / "result.json", motion)
  # a run scored on the first 48 clips is not one scored on the whole split, in a rerun or
  # in a rendered table
  whole = argparse.Namespace(steps=0, regime="shortcut", eval_items=0)
  with pytest.raises(SystemExit, match=r"scored on 48 clips per test split, not all "
                                       r"\(--eval_items=0\): pass --eval_items=48"):
    methods.check_finished(arm, same, tmp_path / "result.json", whole)
  run = methods.run_dir(tmp_path, arm.name, 0)
  run.mkdir(parents=True)
  (run / "result.json").write_text(json.dumps(dict(same, seed=0)))
  assert methods.collect(tmp_path, [arm.name], [0], 48)[arm.name][0]["seed"] == 0
  with pytest.raises(SystemExit, match="scored on 48 clips per test split, not all"):
    methods.collect(tmp_path, [arm.name], [0], 0)


def test_regime_settings_sit_under_each_arms_own_overrides():
  """--regime=motion (the default): the stage-1 `mash` takes uniform negatives and 9000
  steps (it is then the regime arm mash@p0.9+uniformneg+steps9000's run, and the README's
  main job); a fine-tuning arm keeps its 500 steps; the shortcut regime restores the old
  README settings, and the regime and control arms keep theirs under either regime."""
  args = argparse.Namespace(steps=0, regime="motion", builder_config="default",
                            data_dir="data_cache")
  stage1 = methods.run_config(methods.ARMS["mash"], 0, args)
  assert (stage1.total_steps, stage1.data.train_negatives) == (9000, "uniform")
  same = methods.run_config(methods.ARMS["mash@p0.9+uniformneg+steps9000"], 0, args)
  assert stage1.to_dict() == same.to_dict()
  tuned = methods.run_config(methods.ARMS["mash+haca"], 0, args)
  assert (tuned.total_steps, tuned.data.train_negatives) == (500, "uniform")
  readme = load_config("tiny_synthetic")
  assert (readme.total_steps, readme.data.train_negatives) == (9000, "uniform")
  assert stage1.to_dict() == dict(readme.to_dict(), data=dict(
      readme.data.to_dict(), builder_config="default", data_dir="data_cache"),
      keep_checkpoints=1, log_every=50, checkpoint_every=500)
  shortcut = argparse.Namespace(**dict(vars(args), regime="shortcut"))
  old = methods.run_config(methods.ARMS["mash"], 0, shortcut)
  assert (old.total_steps, old.data.train_negatives) == (1500, "typical")
  for name in ("mash@p0.9", "mash@p0.125+uniformneg", "mash@p0.9+uniformneg+steps9000"):
    under = [methods.run_config(methods.ARMS[name], 0, a).to_dict() for a in (args, shortcut)]
    assert under[0] == under[1], name
  control = methods.run_config(methods.ARMS["mash@p0.125+uniformneg"], 0, args)
  assert (control.total_steps, control.data.train_negatives) == (1500, "uniform")
  with pytest.raises(SystemExit, match="unknown --regime"):
    methods.effective_overrides(methods.ARMS["mash"], "quiet")


def test_search_arms_run_seed_0_only_and_are_not_counted_missing(tmp_path):
  """The shortcut-regime and control-search arms ran one seed by design: a study's --seeds
  runs and counts only seed 0 of them; every other arm runs every seed."""
  search, full = methods.ARMS["mash@p0.125+uniformneg"], methods.ARMS["mash"]
  assert methods.arm_seeds(search, [0, 1, 2]) == [0] and methods.arm_seeds(search, [1]) == []
  assert methods.arm_seeds(methods.ARMS["mash@p0.125"], [0, 1]) == [0]
  assert methods.arm_seeds(full, [0, 1, 2]) == [0, 1, 2]
  assert methods.arm_seeds(methods.ARMS["mash@p0.125+uniformneg+steps9000"], [0, 2]) == [0, 2]
  result = {"seed": 0, "steps": 10, "train_s": 1.0, "eval_s": 1.0, "eval_items": 0,
            "train_metrics": {"loss": 0.5},
            "binary": {"average": 50.0, "columns": dict.fromkeys(
                ("Scene-only Action", "Unusual Action", "Unusual Scene"), 50.0),
                       "controls": {"Typical Action": 50.0, "Typical Scene": 50.0}},
            "labels": {"accuracy": {}, "hallucinated_action_rate": 10.0}}
  args = argparse.Namespace(doc=str(tmp_path / "m.md"), regime="motion", eval_items=0,
                            argv=["python", "benchmarks/methods.py"])
  methods.write_doc(args, [search, full], [0, 1], {search.name: [result], full.name: [result]})
  doc = (tmp_path / "m.md").read_text()
  assert "PARTIAL: 2 of 3 runs finished; missing: mash/seed1**" in doc
  assert f"- `{search.name}`: `mash@p0.125` with" in doc and "seed 0 only (a search)" in doc
