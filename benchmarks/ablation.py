"""The paper's ablations (Tables 5, 6, 7) on the synthetic benchmark, on a CPU.

    python benchmarks/ablation.py --root=/tmp/mashvlm_methods --steps=1500 \
        --seeds=0,1,2 --eval_items=48 --doc=docs/ablation.md

Each run is the README's main job as it was until 2026-12-01 (the `shortcut` regime of
benchmarks/methods.py: typical-action training negatives, 1500 steps on 2 cores), the
default here so that docs/ablation.md stays reproducible; ``--regime=motion`` runs the
tables under today's defaults (9000 steps each). At 500 steps the yes/no questions are
still at chance (51%) and the tables say nothing.

The runs are arms of the method-comparison study (benchmarks/methods.py: one arm per
distinct preset of mashvlm_jax/config_lib.py ABLATIONS; identical presets run once:
t5_causal_causal is the baseline, t6_disable_spatial_to_temporal is t5_causal_bi,
t7_distinct is t6_disable_both, t7_harmonic is mash), trained, evaluated and resumed by
that harness under the same ``--root``; this script lays them out as the paper's tables,
mean +- standard deviation over seeds. Runs go seed-major. The markdown is rewritten
after every run (marked PARTIAL until all runs are in); text below the ``<!-- findings
-->`` line of an existing document is kept.
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import methods  # noqa: E402  (benchmarks/methods.py: the harness that trains and scores)

log = logging.getLogger("mashvlm.ablation")

# (table, row label, preset, paper UNSCENE binary, paper MVBench)
TABLES = {
    "Table 5: attention type within each video token type (standard RoPE, causal order "
    "across types)": (
        ("Temporal | Spatial", ),
        [("Causal | Causal", "baseline", 41.81, 53.41),
         ("Bi-directional | Bi-directional", "t5_bi_bi", 41.18, 54.31),
         ("Bi-directional | Causal", "t5_bi_causal", 41.14, 53.11),
         ("Causal | Bi-directional", "t5_causal_bi", 41.89, 55.29)]),
    "Table 6: disabled attention between spatial and temporal tokens (K->Q; temporal "
    "causal, spatial bi-directional, standard RoPE)": (
        ("Spatial->Temporal disabled | Temporal->Spatial disabled", ),
        [("yes | no", "t5_causal_bi", 41.89, 55.29),
         ("no | yes", "t6_disable_temporal_to_spatial", 42.14, 55.09),
         ("no | no", "t6_disable_none", 42.10, 55.44),
         ("yes | yes", "t6_disable_both", 45.36, 55.51)]),
    "Table 7: position ids under DST attention": (
        ("Embeddings", ),
        [("Distinct only", "t6_disable_both", 45.36, 55.51),
         ("Balanced only", "t7_balanced", 50.80, 56.39),
         ("Distinct & Balanced (Harmonic-RoPE)", "t7_harmonic", 57.85, 57.58)]),
    "Baseline vs MASH-VLM (Table 2 columns)": (
        ("Model", ),
        [("Baseline (causal, standard RoPE)", "baseline", None, None),
         ("MASH-VLM (DST + Harmonic-RoPE)", "t7_harmonic", 57.85, 57.58)]),
}
FINDINGS = "<!-- findings -->"


# ------------------------------------------------------------------------------ tables

def render_tables(results: dict) -> str:
  """Markdown tables, one per paper table; ``results``: arm name -> list of run results."""
  out = []
  for title, (first, rows) in TABLES.items():
    header = first[0].split(" | ") + [m for m, _ in methods.METRICS] + [
        "seeds", "paper UNSCENE / MVBench"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, preset, paper_unscene, paper_mv in rows:
      runs = results.get(methods.ablation_arm(preset).name, [])
      cells = [methods._mean_sd(methods._values(runs, get)) for _, get in methods.METRICS]
      paper = "-" if paper_unscene is None else f"{paper_unscene:.2f} / {paper_mv:.2f}"
      lines.append("| " + " | ".join([f"{label} (`{preset}`)"] + cells
                                     + [str(len(runs)), paper]) + " |")
    out.append(f"### {title}\n\n" + "\n".join(lines))
  return "\n\n".join(out)


def describe_model(config) -> str:
  """One line on the tiny model the runs train (from the config, not hard-coded)."""
  from mashvlm_jax.model.config import ModelConfig
  m = ModelConfig.from_dict(config.model)
  v, llm = m.vision, m.llm
  temporal, spatial = m.video_token_counts
  tower = (f"{'frozen' if m.freeze_vision else 'trained'} random-init CLIP, features after "
           f"{v.layers_to_run} of its {v.num_layers} layers, {v.position_init} position "
           f"embeddings")
  return (f"M={temporal} temporal, N={spatial} spatial tokens from {m.num_frames} frames of "
          f"{v.image_size}x{v.image_size}; {llm.num_layers}-layer {llm.hidden_size}-wide "
          f"LLaMA; {tower}")


def write_doc(args, results: dict, order: list, seeds: list, elapsed: float):
  doc = pathlib.Path(args.doc)
  done = sum(len(v) for v in results.values())
  total = len(order) * len(seeds)
  missing = [f"{p}/seed{s}" for s in seeds for p in order
             if not any(r["seed"] == s for r in results.get(p, []))]
  status = ("complete" if done == total else
            f"**PARTIAL: {done} of {total} runs finished; missing: {', '.join(missing)}**")
  steps = sorted({r["steps"] for runs in results.values() for r in runs})
  steps = ", ".join(map(str, steps)) or str(args.steps)
  train_s = np.mean([r["train_s"] for runs in results.values() for r in runs] or [0])
  eval_s = np.mean([r["eval_s"] for runs in results.values() for r in runs] or [0])
  baseline_config = methods.run_config(methods.ARMS["baseline"], 0, args)
  warmup = baseline_config.optim.warmup_steps
  text = f"""# Synthetic ablation study (paper Tables 5, 6, 7)

Status: {status}.

Reproduce (2 CPU cores, about {elapsed / 60:.0f} minutes of training and evaluation for
the runs recorded here; a rerun skips finished runs):

```
JAX_PLATFORMS=cpu {' '.join(args.argv)}
```

Setup: `configs/tiny_synthetic.py` ({describe_model(baseline_config)})
trained from scratch on the synthetic set's
`{args.builder_config}` train split (3,200 clips, one random QA turn per visit, batch 16)
for **{steps} steps per run** (warmup {warmup} steps, otherwise the config's optimiser),
seeds {', '.join(map(str, seeds))} (initialisation and data order). Each run is evaluated
on the first {args.eval_items or 'all'} clips of each test split (`test_typical`,
`test_unusual`, `test_scene_only`): UNSCENE binary duals answered by likelihood ("Yes"
vs "No" as the first answer token; a dual scores only when both its questions are
right), and the action probe ("What is the person doing?" on `test_typical` and
`test_unusual`, ranked over the 8 action answers by likelihood; the hallucinated-action
rate is the share of unusual clips where the model names the scene's typical action
instead of the one performed). Mean ± sample standard deviation over seeds; percent.
Mean run time: {train_s:.0f} s training, {eval_s:.0f} s evaluation. The paper's numbers
(7B model, real videos, UNSCENE binary / MVBench) are shown for the direction of each
effect, not for comparison of values.

{render_tables(results)}
"""
  old = doc.read_text() if doc.exists() else ""
  findings = old[old.index(FINDINGS):] if FINDINGS in old else f"{FINDINGS}\n"
  doc.parent.mkdir(parents=True, exist_ok=True)
  doc.write_text(text + "\n" + findings)


def main(argv=None):
  parser = methods.study_parser(__doc__.splitlines()[0], "ablation.md", steps=1500,
                               regime="shortcut")
  parser.add_argument("--presets", default="", help="comma-separated subset (default: all)")
  args = methods.finish_args(parser.parse_args(argv), "benchmarks/ablation.py", argv)
  wanted = [p for _, rows in TABLES.values() for _, p, *_ in rows]
  order = list(dict.fromkeys(methods.ablation_arm(p).name for p in wanted))
  if args.presets:
    order = [methods.ablation_arm(p).name for p in args.presets.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  log.info("runs: %s x seeds %s", order, seeds)
  t0 = time.perf_counter()
  prior = sum(r.get("train_s", 0) + r.get("eval_s", 0)
              for runs in methods.collect(args.root, order, seeds, args.eval_items).values()
              for r in runs)
  if not args.render_only:
    for seed in seeds:
      for name in order:
        methods.run_one(methods.ARMS[name], seed, args)
        write_doc(args, methods.collect(args.root, order, seeds, args.eval_items), order,
                  seeds, prior + time.perf_counter() - t0)
  write_doc(args, methods.collect(args.root, order, seeds, args.eval_items), order, seeds,
            prior + time.perf_counter() - t0)
  print(pathlib.Path(args.doc).read_text())


if __name__ == "__main__":
  main()
