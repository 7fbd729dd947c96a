"""The method-comparison study on the synthetic testbed: one harness for every arm.

    python benchmarks/methods.py --arms=baseline,mash --seeds=0,1,2 \
        --root=/tmp/mashvlm_methods --doc=docs/methods.md [--steps=N] [--eval_items=0]

An arm is data (``ARMS``): a name, config overrides of configs/tiny_synthetic.py (dotted
keys; ``ablation`` picks a preset of mashvlm_jax/config_lib.py), optionally the arm it
fine-tunes from (that arm's run of the same seed: its final parameters, a fresh optimizer,
the step counter at 0), evaluation-time options, the reference arm it is compared with,
and, for the one-seed search arms, the seeds it runs. A method adds entries here, not code
paths.

Every run writes ``<root>/<arm>/seed<k>/result.json`` when it is finished and scored; a
rerun skips finished runs, resumes an interrupted one from its checkpoint, and never
scores a run that stopped early (SIGTERM saves and exits; the next call resumes it). The
markdown is rewritten after every run, marked PARTIAL until every requested run is in;
text below the ``<!-- findings -->`` line of an existing document is kept.
``benchmarks/ablation.py`` renders the paper's Tables 5-7 from the same runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from mashvlm_jax import config_lib, paths  # noqa: E402

log = logging.getLogger("mashvlm.methods")
FINDINGS = "<!-- findings -->"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of the study (see the module docstring)."""
  name: str
  overrides: dict = dataclasses.field(default_factory=dict)
  parent: str | None = None  # the arm whose run of the same seed this one fine-tunes
  reference: str | None = None  # the arm the table compares this one with
  eval_options: dict = dataclasses.field(default_factory=dict)
  train: bool = True  # False: evaluates the parent's run as it is (inference-time methods)
  benchmarks: tuple = ()  # more `mashvlm eval` benchmarks: entailment, retrieval, mqa
  tpl_from: str | None = None  # train on the rows data.row_filter keeps of this run's TPL
  group: str = "MASH-VLM ablations (paper Tables 5-7)"
  about: str = ""
  # The seeds this arm runs, of those requested (None: all of them). The search arms (the
  # shortcut regime and what made the control read motion) ran seed 0: a search for
  # settings, not a comparison.
  seeds: tuple | None = None


def arm_seeds(arm: Arm, seeds) -> list[int]:
  """The requested ``seeds`` that ``arm`` runs."""
  return [s for s in seeds if arm.seeds is None or s in arm.seeds]


PREFERRED_NAMES = ("baseline", "mash")  # of presets with several names in ABLATIONS


def _ablation_arms() -> list[Arm]:
  """One arm per distinct preset of config_lib.ABLATIONS (identical presets run once,
  under the name in PREFERRED_NAMES when they have one, else the first)."""
  names = {}  # preset (as text) -> arm name
  for name, preset in config_lib.ABLATIONS.items():
    key = json.dumps(preset, sort_keys=True)
    if key not in names or name in PREFERRED_NAMES:
      names[key] = name
  return [Arm(name, {"ablation": name}, reference=None if name == "baseline" else "baseline",
              about=f"preset `{name}` from scratch") for name in names.values()]


def ablation_arm(preset: str) -> Arm:
  """The arm that trains ``preset`` (any of its names in config_lib.ABLATIONS)."""
  want = config_lib.ABLATIONS[preset]
  return next(a for a in ARMS.values() if a.parent is None and "data.typical_prob" not in
              a.overrides and config_lib.ABLATIONS[a.overrides["ablation"]] == want)


# The regime study (issue: does the model read motion when the scene does not give the
# answer away?): typical_prob is the share of training clips in the action's typical
# scene; 0.125 = 1/8 makes the scene independent of the action (the control).
REGIME_PROBS = (0.125, 0.5, 0.7, 0.9)
# The settings under which the control reads motion (the control arms below): uniform
# training negatives and 9000 steps; configs/tiny_synthetic.py's defaults since 2026-12-01.
REGIME_SETTINGS = {"data.train_negatives": "uniform", "total_steps": 9000}
REGIME_TAG = "uniformneg+steps9000"
# The README's main job until then: the scene's typical action as every training "No"
# label, 1500 steps. The model learns the rule "No to the scene's typical action" and reads
# no motion at all (docs/methods.md); the first regime and control arms ran at these.
SHORTCUT_SETTINGS = {"data.train_negatives": "typical", "total_steps": 1500}


# The testbed regime every arm of a study runs under (--regime): its settings are defaults
# under each arm's own overrides, so stage-1 arms (`mash`, the TPL arms) take them all and
# fine-tuning arms keep their 500 steps. Both are spelled out (not the config's defaults),
# so that a result names what it was trained with; give each regime its own --root.
# "motion": the chosen regime (docs/methods.md, "The chosen regime"). "shortcut": the
# earlier README settings, under which docs/ablation.md and the first method arms ran.
REGIMES = {"motion": REGIME_SETTINGS, "shortcut": SHORTCUT_SETTINGS}
DEFAULT_REGIME = "motion"


def effective_overrides(arm: Arm, regime: str) -> dict:
  """The arm's overrides over the regime's settings (what its run is trained with)."""
  if regime not in REGIMES:
    raise SystemExit(f"unknown --regime {regime!r}; known: {', '.join(REGIMES)}")
  return {**REGIMES[regime], **arm.overrides}


def _regime_arms() -> list[Arm]:
  arms = []
  for tag, settings, group in (
      ("", SHORTCUT_SETTINGS,
       "Regime: share of training clips in the typical scene (the shortcut settings)"),
      (f"+{REGIME_TAG}", REGIME_SETTINGS,
       "Regime at the settings where the control reads motion (uniform negatives, 9000 "
       "steps)")):
    for preset in ("baseline", "mash"):
      for prob in REGIME_PROBS:
        arms.append(Arm(f"{preset}@p{prob}{tag}",
                        {"ablation": preset, "data.typical_prob": prob, **settings},
                        reference=None if preset == "baseline" else f"baseline@p{prob}{tag}",
                        group=group, about=f"`{preset}`, typical_prob {prob}",
                        seeds=(0,) if settings is SHORTCUT_SETTINGS else None))
  return arms


# What it takes for the control (typical_prob 0.125, no scene shortcut) to read motion:
# the testbed's scale and training change, the paper's token layout does not.
CONTROL = {"ablation": "mash", "data.typical_prob": 0.125, **SHORTCUT_SETTINGS}
CONTROL_VARIANTS = {
    "steps4500": ({"total_steps": 4500}, "3x the steps"),
    "steps9000": ({"total_steps": 9000}, "6x the steps"),
    "uniformneg": ({"data.train_negatives": "uniform"},
                   "training Yes/No negatives drawn uniformly, not the scene's typical action"),
    "lr5e-4": ({"optim.lr": 5e-4}, "learning rate 5e-4 instead of 2e-3"),
    "vision": ({"model.freeze_vision": False}, "the tiny vision tower trained"),
    "llm256": ({"model.llm.hidden_size": 256, "model.llm.intermediate_size": 688,
                "model.llm.num_layers": 6}, "a 6-layer 256-wide LLM"),
}


def _control_arms() -> list[Arm]:
  return [Arm(f"mash@p0.125+{name}", dict(CONTROL, **overrides), reference="mash@p0.125",
              group="Making motion learnable in the control (typical_prob 0.125)",
              about=f"`mash@p0.125` with {what}", seeds=(0,))
          for name, (overrides, what) in CONTROL_VARIANTS.items()]


FINE_TUNE = {"ablation": "mash", "total_steps": 500}
FINE_TUNING = [
    # The control of every fine-tuning method: the same number of steps of the ordinary
    # training mix from the stage-1 run. A method's arms add tasks or losses to this.
    Arm("mash+mix", dict(FINE_TUNE), parent="mash",
        reference="mash", group="Fine-tuning from the stage-1 `mash` run",
        benchmarks=("entailment", "retrieval", "mqa"),
        about="500 more steps of the ordinary mix from `mash` (the fine-tuning control; "
              "scored on every method's benchmark)"),
]

# HACA (data/tasks/haca.py): caption entailment / correction / masking rows beside the
# ordinary mix (one row per visit, so about 2/10-3/11 of the samples), evaluated on
# caption pairs and text-to-video retrieval as well.
HACA_RECIPES = {  # arm -> (data.train_tasks, what)
    "mash+entailment": (("entailment",), "entailment baseline (Yes / No answers)"),
    "mash+haca": (("haca",), "HACA: Yes, or No + the corrected caption"),
    "mash+haca_mask": (("haca_mask",), "HACA + masking correction (1:1:1)"),
}


HACA_LORA = {"model.lora.rank": 16, "model.lora.alpha": 32.0}  # VideoChat2's setting


def _haca_arms() -> list[Arm]:
  group = "HACA: hallucination-correction fine-tuning"
  arms = [Arm(name, dict(FINE_TUNE, **{"data.train_tasks": tasks, "text_len": 48}),
              parent="mash", reference="mash+mix", benchmarks=("entailment", "retrieval"),
              group=group, about=f"{what}, 500 steps from `mash`")
          for name, (tasks, what) in HACA_RECIPES.items()]
  arms.append(Arm("mash+haca_mask+lora",
                  dict(FINE_TUNE, **{"data.train_tasks": ("haca_mask",), "text_len": 48},
                       **HACA_LORA),
                  parent="mash", reference="mash+haca_mask",
                  benchmarks=("entailment", "retrieval"), group=group,
                  about="HACA + masking with LoRA rank 16 / alpha 32 on the decoder (the "
                        "base LLM frozen, projector trained), 500 steps from `mash`"))
  return arms


# UTR (data/tasks/utr.py): trajectory rows hold boxes, so crop and flip stay off and the
# rows need 64 tokens; the control is the ordinary mix under the same settings. TPL arms
# train from scratch on a third of the rows, ranked by the stage-1 `mash` run's TPL.
UTR_SETTINGS = {"data.augment.random_resized_crop": False, "text_len": 64}
UTR_ARMS = {  # arm -> (data.train_tasks, what)
    "mash+utr": (("utr",), "UTR trajectory queries (about 29% of samples)"),
    "mash+utr_notask": (("utr_notask",), "the same trajectories without a query "
                                         "(Table 3's - task modeling)"),
    "mash+more": (("more",), "as many extra ordinary rows (+ more data)"),
}


def _utr_arms() -> list[Arm]:
  group = "UTR: trajectory queries and TPL filtering"
  arms = [Arm("mash+mix@nocrop", dict(FINE_TUNE, **UTR_SETTINGS), parent="mash",
              reference="mash+mix", group=group,
              about="the fine-tuning control without crop (as the UTR arms)")]
  arms += [Arm(name, dict(FINE_TUNE, **UTR_SETTINGS, **{"data.train_tasks": tasks}),
               parent="mash", reference="mash+mix@nocrop", group=group,
               about=f"{what}, 500 steps from `mash`")
           for name, (tasks, what) in UTR_ARMS.items()]
  for rule in ("top", "bottom"):
    arms.append(Arm(f"mash@tpl-{rule}", {"ablation": "mash", "data.row_filter.rule": rule},
                    tpl_from="mash", reference="mash@tpl-bottom" if rule == "top" else "mash",
                    group=group, about=f"`mash` from scratch on the {rule} third of the "
                                       f"training rows by the stage-1 `mash` run's TPL"))
  # The same thirds taken within each task type (TPL compares within a type: the tiled
  # keyframe reads as an empty scene, so across types the cut selects tasks, not rows).
  for rule in ("top", "bottom"):
    arms.append(Arm(f"mash@tpl-{rule}-pertask",
                    {"ablation": "mash", "data.row_filter.rule": rule,
                     "data.row_filter.per_task": True},
                    tpl_from="mash", reference=("mash@tpl-bottom-pertask" if rule == "top"
                                                else "mash"),
                    group=group, about=f"`mash` from scratch on the {rule} third by TPL "
                                       f"within each task type"))
  return arms


# LLaVAction (data/tasks/mqa_train.py, model/action_token.py): multiple-choice rows with
# random or recognizer-A distractors, temporal detection, the action token, prior actions;
# evaluated on recognizer-B and random options as well.
MQA_SETTINGS = {"text_len": 96}
TOKEN = {"model.action_token.enabled": True}
MQA_ARMS = {  # arm -> (overrides, reference, what)
    "mash+mqa_random": ({"data.train_tasks": ("mqa_random",)}, "mash+mix",
                        "multiple choice, random distractors"),
    "mash+mqa": ({"data.train_tasks": ("mqa",)}, "mash+mqa_random",
                 "multiple choice, recognizer-A distractors"),
    "mash+mqa+temporal": ({"data.train_tasks": ("mqa", "temporal")}, "mash+mqa",
                          "+ temporal detection"),
    "mash+mqa+temporal+token": ({"data.train_tasks": ("mqa", "temporal"), **TOKEN},
                                "mash+mqa+temporal", "+ the action token and its heads"),
    "mash+mqa_prior+temporal+token": ({"data.train_tasks": ("mqa_prior", "temporal"),
                                       **TOKEN}, "mash+mqa+temporal+token",
                                      "+ prior actions in 30% of the prompts"),
}


def _mqa_arms() -> list[Arm]:
  return [Arm(name, dict(FINE_TUNE, **MQA_SETTINGS, **overrides), parent="mash",
              reference=reference, benchmarks=("mqa",),
              group="LLaVAction: multiple-choice fine-tuning",
              about=f"{what}, 500 steps from `mash`")
          for name, (overrides, reference, what) in MQA_ARMS.items()]


# RVE (analysis/rve.py): no training; the stage-1 run of each seed evaluated with its
# attention enhanced. The heads file is scored once per stage-1 run (32 verb-swapped
# training pairs, K and the middle layers by default) and shared by these arms.
RVE_HEAD_PAIRS = 32
RVE_VARIANTS = {  # name suffix -> (RveConfig overrides, what)
    "rve": ({}, "RVE global + denoise, alpha 0.05, beta 1 (the paper's best)"),
    "rve-sens": ({"scope": "sensitive"}, "RVE on the sensitive heads only, + denoise"),
    "rve-nodn": ({"denoise": False}, "RVE global, no denoise mask"),
    "rve-sens-nodn": ({"scope": "sensitive", "denoise": False},
                      "RVE on the sensitive heads only, no denoise mask"),
    "rve-b0.5": ({"beta": 0.5}, "RVE, beta 0.5"),
    "rve-b2": ({"beta": 2.0}, "RVE, beta 2"),
    "rve-a0.1": ({"alpha": 0.1}, "RVE, alpha 0.1"),
    "rve-a0.2": ({"alpha": 0.2}, "RVE, alpha 0.2"),
}


def _rve_arms() -> list[Arm]:
  return [Arm(f"{stage}+{suffix}", parent=stage, reference=stage, train=False,
              eval_options={"rve": overrides}, group="RVE: attention enhancement at inference",
              about=f"{what}, on the `{stage}` run")
          for stage in ("mash", "baseline") for suffix, (overrides, what) in RVE_VARIANTS.items()]


ARMS: dict[str, Arm] = {a.name: a for a in (_ablation_arms() + _regime_arms() + _control_arms()
                                            + FINE_TUNING + _rve_arms() + _haca_arms()
                                            + _utr_arms() + _mqa_arms())}


# ------------------------------------------------------------------------------ one run

def run_config(arm: Arm, seed: int, args):
  """configs/tiny_synthetic.py with the arm's overrides and the study's settings."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_synthetic",
                                                ROOT / "configs" / "tiny_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  overrides = effective_overrides(arm, args.regime)
  config = module.get_config(f"ablation={overrides.pop('ablation', 'mash')}")
  config.seed = seed
  config.data.builder_config = args.builder_config
  config.data.data_dir = args.data_dir
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"arm {arm.name}: override {key!r} names no config field")
    node[leaf] = value
  if args.steps:
    config.total_steps = args.steps
  steps = int(config.total_steps)
  config.optim.warmup_steps = min(int(config.optim.warmup_steps), max(1, steps // 10))
  config.checkpoint_every = min(int(config.checkpoint_every), steps)
  config.log_every = max(1, min(int(config.log_every), steps // 4))
  config.keep_checkpoints = 1
  return config


def run_dir(root, arm_name: str, seed: int) -> pathlib.Path:
  return pathlib.Path(root) / arm_name / f"seed{seed}"


def check_finished(arm: Arm, result: dict, path, args) -> dict:
  """``result`` when it was trained with ``arm``'s overrides under --regime (and --steps);
  otherwise a clear error: a finished run of other settings is never scored as this arm's."""
  stored = (result.get("overrides"), result.get("steps"))
  # As the result file holds them: tuples (data.train_tasks) come back as lists.
  wanted = (json.loads(json.dumps(effective_overrides(arm, args.regime))),
            args.steps or result.get("steps"))
  if stored != wanted:
    raise SystemExit(f"{path} holds a run with overrides {stored[0]} and {stored[1]} steps; "
                     f"arm {arm.name} now means {wanted[0]} (steps {wanted[1]}): move the "
                     f"old run away or use another --root")
  check_scored_items(result, path, args.eval_items)
  return result


def check_scored_items(result: dict, path, eval_items: int) -> None:
  """A result scored on another number of clips per split is never tabulated as this one's."""
  scored = result.get("eval_items")
  if scored != eval_items:
    raise SystemExit(f"{path} was scored on {scored or 'all'} clips per test split, not "
                     f"{eval_items or 'all'} (--eval_items={eval_items}): pass "
                     f"--eval_items={scored}, or move the run's eval/ and result.json away "
                     f"to score it again")


def run_one(arm: Arm, seed: int, args) -> dict:
  """Trains (or resumes) and evaluates one run, after its parent's; writes its result."""
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.train import trainer
  workdir = run_dir(args.root, arm.name, seed)
  done = workdir / "result.json"
  if done.exists():
    result = check_finished(arm, json.loads(done.read_text()), done, args)
    missing = [b for b in arm.benchmarks if b not in result.get("extra", {})]
    return add_benchmarks(arm, seed, args, result, missing) if missing else result
  if not arm.train:
    return evaluate_parent(arm, seed, args, done)
  if arm.eval_options:
    raise ValueError(f"arm {arm.name}: evaluation options {arm.eval_options} are for arms "
                     f"that evaluate their parent (train=False)")
  config = run_config(arm, seed, args)
  if arm.parent:
    run_one(ARMS[arm.parent], seed, args)
    config.init_from = str(run_dir(args.root, arm.parent, seed))
  if arm.tpl_from:
    run_one(ARMS[arm.tpl_from], seed, args)
    config.data.row_filter.path = str(tpl_rows(ARMS[arm.tpl_from], seed, args))
  start_step = max(params_io.finished_steps(workdir / "checkpoints"), default=0)
  t0 = time.perf_counter()
  summary = trainer.train(config, str(workdir))
  if summary["preempted"]:  # SIGTERM: the checkpoint is saved; a rerun resumes this run
    raise SystemExit(f"{arm.name} seed {seed}: stopped at step {summary['step']} by SIGTERM;"
                     f" rerun the same command to resume")
  t1 = time.perf_counter()
  scores = evaluate_run(config, summary["state"].params, workdir / "eval", args,
                        arm.benchmarks)
  result = {"arm": arm.name, "seed": seed, "steps": summary["step"],
            "parent": arm.parent, "overrides": effective_overrides(arm, args.regime),
            "regime": args.regime, "train_metrics": summary["metrics"], "train_s": t1 - t0,
            "start_step": start_step,  # > 0: resumed, train_s covers only this segment
            "eval_s": time.perf_counter() - t1, "eval_items": args.eval_items, **scores}
  return write_result(done, result)


def evaluate_run(config, params, out_dir, args, benchmarks=()) -> dict:
  """The study's scores of one model: UNSCENE binary and the action probe, and under
  "extra" the summary of each of ``benchmarks`` (entailment, retrieval, mqa)."""
  from mashvlm_jax.eval import synthetic
  ev = synthetic.evaluate(config, params, str(out_dir), max_items=args.eval_items,
                          probe_splits=("test_typical", "test_unusual"),
                          probe_tasks=("action",), show_progress=False)
  binary, labels = ev["binary"], ev["labels"]
  scores = {"binary": {k: binary[k] for k in ("columns", "average", "controls", "counts",
                                              "question_accuracy")},
            "labels": {k: labels[k] for k in ("accuracy", "counts",
                                              "hallucinated_action_rate")}}
  if benchmarks:
    scores["extra"] = {b: extra_benchmark(b, config, params, pathlib.Path(out_dir) / b,
                                          args.eval_items) for b in benchmarks}
  return scores


def add_benchmarks(arm: Arm, seed: int, args, result: dict, names) -> dict:
  """A finished run scored on benchmarks its arm gained since (no retraining): the last
  checkpoint evaluated, the numbers added under "extra", the result file rewritten."""
  from mashvlm_jax.eval import common
  workdir = run_dir(args.root, arm.name, seed)
  config = run_config(arm, seed, args)
  params = common.load_params(config, str(workdir))
  extra = dict(result.get("extra", {}))
  for name in names:
    extra[name] = extra_benchmark(name, config, params, workdir / "eval" / name,
                                  args.eval_items)
  return write_result(workdir / "result.json", dict(result, extra=extra))


def extra_benchmark(name: str, config, params, out_dir, max_items: int) -> dict:
  """One more benchmark's numbers (percent) for the table: pair accuracy (entailment),
  mAP per pool (retrieval), accuracy and typical-action picks per option source (mqa)."""
  common = dict(max_items=max_items, show_progress=False)
  if name == "entailment":
    from mashvlm_jax.eval import entailment
    r = entailment.evaluate_pairs(config, params, str(out_dir), **common)
    return {k: r[k] for k in ("pair_accuracy", "by_type", "by_split")}
  if name == "retrieval":
    from mashvlm_jax.eval import entailment
    return {"map": entailment.evaluate_retrieval(config, params, str(out_dir), **common)["map"]}
  if name == "mqa":
    from mashvlm_jax.eval import mqa
    r = mqa.compare(config, params, str(out_dir), sources=("recognizer", "random"), **common)
    return {source: {k: v[k] for k in ("accuracy", "hallucinated_action_rate")}
            for source, v in r["sources"].items()}
  raise ValueError(f"unknown study benchmark {name!r}; known: entailment, retrieval, mqa")


def tpl_rows(arm: Arm, seed: int, args) -> pathlib.Path:
  """``<arm's run>/tpl/tpl.jsonl``: TPL of every training row under that run's model
  (analysis/tpl.py), scored once per run and shared by the arms that filter by it."""
  from mashvlm_jax.analysis import tpl
  from mashvlm_jax.eval import common
  workdir = run_dir(args.root, arm.name, seed)
  config = run_config(arm, seed, args)
  out = workdir / "tpl"
  if not (out / "summary.json").exists():
    params = common.load_params(config, str(workdir))
    tpl.run_with_params(config, params, str(config.data.train_split), out, seed=seed,
                        show_progress=False)
  return out / tpl.TPL_FILE


def write_result(done: pathlib.Path, result: dict) -> dict:
  """Writes a run's result atomically, with the code that wrote it ("written_by": git
  commit and library versions; the code that trained each segment is in the run's
  segments.jsonl)."""
  from mashvlm_jax import provenance
  result = dict(result, written_by=provenance.code_version())
  tmp = done.with_suffix(".tmp")
  tmp.write_text(json.dumps(result, indent=2) + "\n")
  tmp.rename(done)  # a result file exists only for a finished, scored run
  return result


def evaluate_parent(arm: Arm, seed: int, args, done: pathlib.Path) -> dict:
  """An arm without training: its parent's run of this seed, evaluated with the arm's
  evaluation options (``rve``: RveConfig overrides of the parent's heads file)."""
  from mashvlm_jax.analysis import rve, rve_heads
  from mashvlm_jax.eval import common
  from mashvlm_jax.model.config import ModelConfig
  unknown = sorted(set(arm.eval_options) - {"rve"})
  if not arm.parent or unknown:
    raise ValueError(f"arm {arm.name}: an arm without training needs a parent and knows the "
                     f"evaluation options ['rve'], found parent {arm.parent}, {unknown}")
  parent = ARMS[arm.parent]
  parent_result = run_one(parent, seed, args)
  parent_dir = run_dir(args.root, parent.name, seed)
  config = run_config(parent, seed, args)
  params = common.load_params(config, str(parent_dir))
  t0 = time.perf_counter()
  heads = parent_dir / "rve_heads.json"
  if not heads.exists():
    rve_heads.write_heads_file(config, params, heads, pairs=RVE_HEAD_PAIRS,
                               checkpoint=str(parent_dir))
  enhancement = rve.load(heads, ModelConfig.from_dict(config.model),
                         **arm.eval_options["rve"])
  with common.attention_enhancement(enhancement):
    scores = evaluate_run(config, params, run_dir(args.root, arm.name, seed) / "eval", args)
  result = {"arm": arm.name, "seed": seed, "steps": parent_result["steps"],
            "parent": parent.name, "overrides": effective_overrides(arm, args.regime),
            "regime": args.regime, "eval_options": arm.eval_options, "rve": enhancement.describe(),
            "heads_file": str(heads), "train_metrics": parent_result["train_metrics"],
            "train_s": 0.0, "eval_s": time.perf_counter() - t0,
            "eval_items": args.eval_items, **scores}
  return write_result(done, result)


def collect(root, arm_names, seeds, eval_items: int) -> dict:
  """arm name -> finished run results (only the requested seeds), each scored on
  ``eval_items`` clips per split (0: all)."""
  out = {}
  for name in arm_names:
    for seed in seeds:
      path = run_dir(root, name, seed) / "result.json"
      if path.exists():
        result = json.loads(path.read_text())
        check_scored_items(result, path, eval_items)
        out.setdefault(name, []).append(result)
  return out


# ------------------------------------------------------------------------------ statistics

def _betainc(a: float, b: float, x: float) -> float:
  """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
    return 1.0 - _betainc(b, a, 1.0 - x)
  tiny = 1e-300
  front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                   + a * math.log(x) + b * math.log1p(-x)) / a
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  f = d
  for m in range(1, 500):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      f *= c * d
    if abs(c * d - 1.0) < 1e-14:
      break
  return front * f


def t_two_sided_p(t: float, df: float) -> float:
  """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
  return _betainc(df / 2.0, 0.5, df / (df + t * t))


def welch(a, b) -> dict | None:
  """Welch's unequal-variance t-test of mean(a) - mean(b): {diff, t, df, p}; None when a
  side has fewer than 2 values. Zero variance on both sides gives t = ±inf, p = 0 (or
  t = 0, p = 1 for equal means)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return None
  diff = float(a.mean() - b.mean())
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  if va + vb == 0:
    return {"diff": diff, "t": math.copysign(math.inf, diff) if diff else 0.0,
            "df": float(len(a) + len(b) - 2), "p": 0.0 if diff else 1.0}
  t = diff / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  return {"diff": diff, "t": t, "df": df, "p": t_two_sided_p(t, df)}


def paired(a: dict, b: dict) -> dict | None:
  """Paired t-test of a - b over the seeds both have ({seed: value} each): {diff, t, df,
  p, n}; None below 2 shared seeds. No spread in the differences gives t = ±inf, p = 0
  (or t = 0, p = 1 when every difference is 0)."""
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    return None
  d = np.asarray([a[s] - b[s] for s in seeds], float)
  diff, sd, df = float(d.mean()), float(d.std(ddof=1)), float(len(d) - 1)
  if sd == 0:
    return {"diff": diff, "t": math.copysign(math.inf, diff) if diff else 0.0, "df": df,
            "p": 0.0 if diff else 1.0, "n": len(d)}
  t = diff / (sd / math.sqrt(len(d)))
  return {"diff": diff, "t": t, "df": df, "p": t_two_sided_p(t, df), "n": len(d)}


def pairs_with_reference(arm: Arm) -> bool:
  """True when the arm's run of a seed and its reference's run of that seed share their
  start: an evaluation-only arm scores the reference's run itself, a fine-tuning arm
  starts from the reference's run or from the same parent run. The table then tests the
  per-seed differences (paired), not the two groups as independent samples (Welch)."""
  if arm.parent is None or arm.reference is None:
    return False
  return arm.parent == arm.reference or ARMS[arm.reference].parent == arm.parent


# ------------------------------------------------------------------------------ the table

METRICS = (  # column, getter (None where a run has no such number)
    ("UNSCENE binary Avg.", lambda r: r["binary"]["average"]),
    ("Scene-only Action", lambda r: r["binary"]["columns"]["Scene-only Action"]),
    ("Unusual Action", lambda r: r["binary"]["columns"]["Unusual Action"]),
    ("Unusual Scene", lambda r: r["binary"]["columns"]["Unusual Scene"]),
    ("Typical Action (control)", lambda r: r["binary"]["controls"]["Typical Action"]),
    ("Typical Scene (control)", lambda r: r["binary"]["controls"]["Typical Scene"]),
    ("Action probe, typical", lambda r: r["labels"]["accuracy"].get("test_typical/action")),
    ("Action probe, unusual", lambda r: r["labels"]["accuracy"].get("test_unusual/action")),
    ("Hallucinated action, unusual", lambda r: r["labels"]["hallucinated_action_rate"]),
    ("Entailment pairs", lambda r: _extra(r, "entailment", "pair_accuracy")),
    ("Retrieval mAP, unusual", lambda r: _extra(r, "retrieval", "map", "unusual")),
    ("Retrieval mAP, typical", lambda r: _extra(r, "retrieval", "map", "typical")),
    ("MQA recognizer-B options, unusual",
     lambda r: _extra(r, "mqa", "recognizer", "accuracy", "test_unusual", "likelihood")),
    ("MQA random options, unusual",
     lambda r: _extra(r, "mqa", "random", "accuracy", "test_unusual", "likelihood")),
    ("MQA picks the typical action, unusual",
     lambda r: _extra(r, "mqa", "recognizer", "hallucinated_action_rate", "likelihood")),
    ("Final train loss", lambda r: r["train_metrics"].get("loss")),
)


def _extra(result: dict, *keys):
  """result["extra"][keys...], or None where the run has no such number."""
  node = result.get("extra")
  for key in keys:
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node
# Compared with the reference arm: difference, t and p (paired or Welch).
COMPARED = ("UNSCENE binary Avg.", "Unusual Action", "Action probe, unusual",
            "Hallucinated action, unusual", "Entailment pairs",
            "MQA recognizer-B options, unusual")


def _values(runs, getter) -> list[float]:
  return [v for v in (getter(r) for r in runs) if v is not None]


def _mean_sd(values) -> str:
  if not values:
    return "-"
  mean = float(np.mean(values))
  if len(values) < 2:
    return f"{mean:.2f} (n=1)"
  return f"{mean:.2f} ± {float(np.std(values, ddof=1)):.2f}"


def _by_seed(runs, getter) -> dict:
  return {r["seed"]: v for r in runs if (v := getter(r)) is not None}


def _comparison(runs, ref_runs, getter, pair: bool = False) -> str:
  if pair:
    test = paired(_by_seed(runs, getter), _by_seed(ref_runs, getter))
  else:
    test = welch(_values(runs, getter), _values(ref_runs, getter))
  if test is None:
    return "-"
  if math.isinf(test["t"]):  # no spread at all: a t-test says nothing
    spread = "the same difference on every seed" if pair else "no spread in either arm"
    return f"{test['diff']:+.2f} ({spread}, no test)"
  return f"{test['diff']:+.2f} (t={test['t']:.2f}, p={test['p']:.3f})"


def render_tables(arms: list[Arm], results: dict) -> str:
  """Markdown: per group, one row per arm (mean ± sd over seeds), then the comparisons."""
  getters = dict(METRICS)
  columns = [m for m, get in METRICS
             if any(get(r) is not None for a in arms for r in results.get(a.name, []))]
  out = []
  for group in dict.fromkeys(a.group for a in arms):
    rows = [a for a in arms if a.group == group]
    header = ["Arm", "seeds"] + columns
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in rows:
      runs = results.get(arm.name, [])
      lines.append("| " + " | ".join([f"`{arm.name}`", str(len(runs))]
                                     + [_mean_sd(_values(runs, getters[c])) for c in columns])
                   + " |")
    compared = [a for a in rows if a.reference]
    shown = [c for c in COMPARED if any(getters[c](r) is not None for a in rows
                                        for r in results.get(a.name, []))]
    if compared:
      header = ["Arm", "vs reference", "test"] + [f"{c}: diff (t, p)" for c in shown]
      lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
      for arm in compared:
        runs, ref = results.get(arm.name, []), results.get(arm.reference, [])
        pair = pairs_with_reference(arm)
        lines.append("| " + " | ".join(
            [f"`{arm.name}`", f"`{arm.reference}`", "paired" if pair else "Welch"]
            + [_comparison(runs, ref, getters[c], pair) for c in shown]) + " |")
    out.append(f"### {group}\n\n" + "\n".join(lines))
  return "\n\n".join(out)


def regime_text(args) -> str:
  """Words for the document: the regime's settings."""
  settings = REGIMES[args.regime]
  return (f" over the `{args.regime}` regime's settings "
          f"({', '.join(f'{k}={v}' for k, v in settings.items())}, where the arm sets "
          f"none of its own)")


def write_doc(args, arms: list[Arm], seeds: list, results: dict) -> None:
  doc = pathlib.Path(args.doc)
  missing = [f"{a.name}/seed{s}" for s in seeds for a in arms if s in arm_seeds(a, seeds)
             and not any(r["seed"] == s for r in results.get(a.name, []))]
  total = sum(len(arm_seeds(a, seeds)) for a in arms)
  status = ("complete" if not missing else
            f"**PARTIAL: {total - len(missing)} of {total} runs finished; missing: "
            f"{', '.join(missing[:12])}"
            f"{f' and {len(missing) - 12} more' if len(missing) > 12 else ''}**")
  finished = [r for runs in results.values() for r in runs]
  # Seconds per 1000 steps over runs trained in one go (a resumed run's train_s covers
  # only its last segment; evaluation-only arms have none).
  fresh = [1000 * r["train_s"] / r["steps"] for r in finished
           if r["train_s"] and not r.get("start_step", 0)]
  resumed = sum(1 for r in finished if r.get("start_step", 0))
  train_s = np.mean(fresh) if fresh else 0.0
  eval_s = np.mean([r["eval_s"] for r in finished]) if finished else 0.0
  described = "\n".join(
      f"- `{a.name}`: {a.about or 'see benchmarks/methods.py'}"
      + (f"; fine-tuned from `{a.parent}` of the same seed" if a.parent and a.train else "")
      + (f"; evaluates the `{a.parent}` run of the same seed, no training"
         if a.parent and not a.train else "")
      + (f"; compared with `{a.reference}`" if a.reference else "")
      + (f"; seed {', '.join(map(str, a.seeds))} only (a search)" if a.seeds else "")
      for a in arms)
  text = f"""# Method-comparison study on the synthetic testbed

Status: {status}.

Reproduce (2 CPU cores; mean {train_s:.0f} s training per 1000 steps over the runs trained in
one go{f" ({resumed} resumed runs left out)" if resumed else ""} and {eval_s:.0f} s evaluation
per run here; a rerun skips finished runs and resumes an interrupted one):

```
JAX_PLATFORMS=cpu {' '.join(args.argv)}
```

Every run trains `configs/tiny_synthetic.py` with its arm's overrides{regime_text(args)} (seeds
{', '.join(map(str, seeds))}: initialisation and data order) and is scored on the first
{args.eval_items or 'all'} clips of each synthetic test split: UNSCENE binary duals by
likelihood (a dual scores only when both its questions are right), the typical-split
controls, and the action probe ("What is the person doing?", ranked over the 8 action
answers by likelihood; the hallucinated-action rate is the share of unusual clips where
the model names the scene's typical action instead of the one performed). Percent; mean ±
sample standard deviation over seeds; the comparison gives the difference to the
reference arm with t and two-sided p: a paired t-test over seeds where the arm and its
reference share each seed's run (an evaluation-only arm scores the reference's run; a
fine-tuning arm starts from the reference's run or from the same parent), Welch's test
where they are independent trainings.

Arms:
{described}

{render_tables(arms, results)}
"""
  old = doc.read_text() if doc.exists() else ""
  findings = old[old.index(FINDINGS):] if FINDINGS in old else f"{FINDINGS}\n"
  doc.parent.mkdir(parents=True, exist_ok=True)
  doc.write_text(text + "\n" + findings)


# ------------------------------------------------------------------------------ main

def study_parser(description: str, doc: str, steps: int,
                 regime: str = DEFAULT_REGIME) -> argparse.ArgumentParser:
  """The flags every study script shares (this one and ablation.py)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--root", default="/tmp/mashvlm_methods",
                      help="runs and results (outside the repository)")
  parser.add_argument("--steps", type=int, default=steps,
                      help="training steps of every run (0: each arm's config)")
  parser.add_argument("--eval_items", type=int, default=0,
                      help="clips per test split (0 = all: 56 per action on unusual clips; "
                           "the first 48 are not balanced by action)")
  parser.add_argument("--builder_config", default="default")
  parser.add_argument("--data_dir", default=os.environ.get("MASHVLM_DATA_DIR", "./data_cache"))
  parser.add_argument("--doc", default=str(ROOT / "docs" / doc))
  parser.add_argument("--regime", default=regime, choices=sorted(REGIMES),
                      help="testbed settings under every arm's overrides (REGIMES); one "
                           "--root per regime")
  parser.add_argument("--render_only", action="store_true",
                      help="rewrite the document from finished runs; train nothing")
  return parser


def finish_args(args, script: str, argv):
  """Records the reproducing command (without --doc/--render_only), makes data_dir
  absolute, and sets up logging and the persistent compilation cache."""
  args.argv = ["python", script] + [
      a for a in (argv if argv is not None else sys.argv[1:])
      if not a.startswith(("--doc", "--render_only"))]
  args.data_dir = paths.local_path(args.data_dir)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(
      "~/.cache/mashvlm_jax/xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return args


def main(argv=None):
  parser = study_parser(__doc__.splitlines()[0], "methods.md", steps=0)
  parser.add_argument("--arms", default="baseline,mash",
                      help=f"comma-separated arm names; known: {', '.join(ARMS)}")
  args = finish_args(parser.parse_args(argv), "benchmarks/methods.py", argv)
  unknown = [a for a in args.arms.split(",") if a not in ARMS]
  if unknown:
    raise SystemExit(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
  names = args.arms.split(",")
  arms = [ARMS[a] for a in names]
  seeds = [int(s) for s in args.seeds.split(",")]
  if not args.render_only:
    for seed in seeds:  # seed-major: every arm gets seed 0 before any gets seed 1
      for arm in arms:
        if seed not in arm_seeds(arm, seeds):
          continue
        t = time.perf_counter()
        result = run_one(arm, seed, args)
        log.info("%s seed %d: UNSCENE avg %s, action probe (unusual) %s, hallucinated %s, "
                 "%.0fs", arm.name, seed, result["binary"]["average"],
                 result["labels"]["accuracy"].get("test_unusual/action"),
                 result["labels"]["hallucinated_action_rate"], time.perf_counter() - t)
        write_doc(args, arms, seeds, collect(args.root, names, seeds, args.eval_items))
  write_doc(args, arms, seeds, collect(args.root, names, seeds, args.eval_items))
  print(pathlib.Path(args.doc).read_text())


if __name__ == "__main__":
  main()
