"""Do the video tokens carry the action? Linear probes on a trained run's visual tokens.

    python benchmarks/token_probe.py --root=/tmp/abl1500 --presets=baseline,t7_harmonic \
        --seed=0 --clips=1600

The ablation (benchmarks/ablation.py) finds that the tiny model names the scene's typical
action on unusual clips. This separates two explanations: the tokens the LLM reads lack the
motion (a vision problem no attention mask can fix), or they carry it and the LLM answers
from the scene instead (the hallucination the paper targets).

For each run ``<root>/<preset>/seed<k>``: fresh clips are rendered (seeds the run never
saw), passed through the run's vision tower + projector + token pooling
(``MashVLM.video_tokens``), and a ridge-regression classifier (one-hot targets, closed
form, the ridge strength picked on a held-out fifth) is fitted on clips whose scene is drawn
independently of the action (uniform over the 8 scenes), so the scene cannot stand in for
the action and is no evidence against it either. It is tested on the
synthetic ``test_unusual`` and ``test_typical`` layouts. Probes: the action from the
temporal tokens, from the spatial tokens, from both; the scene from both. The LLM's own
answer to "What is the person doing?" on the same layout (the run's result.json) is
printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

PROBE_SEED = 7919  # clip seeds unlike any data build's (those default to 0)
RIDGE_STRENGTHS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


def render(specs, config) -> np.ndarray:
  """uint8 [n, T, H, W, 3] clips of ``specs`` at the model's frame count and size."""
  from mashvlm_jax.data import synthetic
  t, size = config.model.num_frames, config.model.vision.image_size
  return np.stack([synthetic.render_clip(s, t, size, size) for s in specs])


def token_encoder(config, params, batch: int = 64):
  """encode(frames uint8 [n, T, H, W, 3]) -> (temporal [n, M*D], spatial [n, N*D]) float64,
  the run's ``MashVLM.video_tokens``, compiled once for every clip set of the run."""
  import jax
  from mashvlm_jax.model.config import ModelConfig
  from mashvlm_jax.model.mashvlm import MashVLM
  model = MashVLM(ModelConfig.from_dict(config.model))
  fn = jax.jit(lambda f: model.apply({"params": params}, f, method=MashVLM.video_tokens))

  def encode(frames):
    temporal, spatial = [], []
    for i in range(0, len(frames), batch):
      t, s = fn(frames[i:i + batch])
      temporal.append(np.asarray(t, np.float64).reshape(len(t), -1))
      spatial.append(np.asarray(s, np.float64).reshape(len(s), -1))
    return np.concatenate(temporal), np.concatenate(spatial)
  return encode


def fit_ridge(x: np.ndarray, labels: np.ndarray, num_classes: int, strength: float):
  """Ridge classifier in dual form; returns predict(x') -> int labels.

  x: [n, d] features, standardised here with the training statistics.
  """
  mean, std = x.mean(0), x.std(0) + 1e-6
  z = (x - mean) / std
  targets = np.eye(num_classes)[labels] - 1.0 / num_classes
  gram = z @ z.T
  alpha = np.linalg.solve(gram + strength * np.eye(len(z)), targets)
  weights = z.T @ alpha  # [d, classes]

  def predict(x_new):
    return np.argmax(((x_new - mean) / std) @ weights, axis=1)
  return predict


def probe_accuracy(train_x, train_y, tests: dict, num_classes: int) -> dict:
  """Percent accuracy on each test set (name -> (x, y)); strength chosen on 1/5 of train."""
  n = len(train_x)
  cut = n - n // 5
  best = max(RIDGE_STRENGTHS, key=lambda lam: np.mean(
      fit_ridge(train_x[:cut], train_y[:cut], num_classes, lam)(train_x[cut:])
      == train_y[cut:]))
  predict = fit_ridge(train_x, train_y, num_classes, best)
  out = {name: 100.0 * float(np.mean(predict(x) == y)) for name, (x, y) in tests.items()}
  out["ridge_strength"] = best
  return out


def probe_run(workdir: pathlib.Path, config, clips: int) -> dict:
  from mashvlm_jax.data import synthetic
  from mashvlm_jax.eval import common
  encode = token_encoder(config, common.load_params(config, workdir))
  # Probe training clips: the scene uniform whatever the action (typical with probability
  # 1/8), no scene-only clips, so only the actor can tell the action.
  train_specs = synthetic.clip_specs("train", clips, seed=PROBE_SEED,
                                     typical_prob=1.0 / len(synthetic.SCENES),
                                     scene_only_share=0.0)
  test_specs = {split: synthetic.clip_specs(split, max(clips // 4, 64), seed=PROBE_SEED + 1)
                for split in ("test_unusual", "test_typical")}
  action_id = {a: i for i, a in enumerate(synthetic.ACTIONS)}
  scene_id = {s: i for i, s in enumerate(synthetic.SCENES)}

  def features(specs):
    t, s = encode(render(specs, config))
    return {"temporal": t, "spatial": s, "both": np.concatenate([t, s], axis=1),
            "action": np.array([action_id[c.action] for c in specs]),
            "scene": np.array([scene_id[c.scene] for c in specs])}

  train = features(train_specs)
  tests = {split: features(specs) for split, specs in test_specs.items()}
  out = {}
  for tokens in ("temporal", "spatial", "both"):
    out[f"action from {tokens}"] = probe_accuracy(
        train[tokens], train["action"],
        {s: (f[tokens], f["action"]) for s, f in tests.items()}, len(synthetic.ACTIONS))
  out["scene from both"] = probe_accuracy(
      train["both"], train["scene"], {s: (f["both"], f["scene"]) for s, f in tests.items()},
      len(synthetic.SCENES))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="benchmarks/ablation.py --root")
  parser.add_argument("--presets", default="baseline,t7_harmonic")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--clips", type=int, default=1600, help="probe training clips")
  # The run's config is rebuilt as benchmarks/ablation.py built it; the probe renders its
  # own clips and reads no data from data_dir.
  parser.add_argument("--steps", type=int, default=1500, help="as the ablation was run")
  parser.add_argument("--builder_config", default="default")
  parser.add_argument("--data_dir", default=os.environ.get("MASHVLM_DATA_DIR", "./data_cache"))
  args = parser.parse_args(argv)
  import ablation

  rows = []
  for preset in args.presets.split(","):
    workdir = pathlib.Path(args.root) / preset / f"seed{args.seed}"
    if not (workdir / "checkpoints").is_dir():
      raise SystemExit(f"{workdir}: no checkpoints/ (run benchmarks/ablation.py first)")
    t0 = time.perf_counter()
    config = ablation.run_config(preset, args.seed, args)
    probes = probe_run(workdir, config, args.clips)
    result_file = workdir / "result.json"
    llm = (json.loads(result_file.read_text())["labels"]["accuracy"]
           if result_file.exists() else {})
    rows.append((preset, probes, llm))
    print(f"{preset} seed {args.seed}: probed in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)

  print(f"Linear probes on the video tokens ({args.clips} probe-training clips, scenes "
        f"independent of the action), accuracy % on unusual / typical clips; chance 12.5\n")
  header = ["run", "action from temporal", "action from spatial", "action from both",
            "scene from both", "LLM answer (action probe)"]
  print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for preset, probes, llm in rows:
    cells = [f"{probes[k]['test_unusual']:.1f} / {probes[k]['test_typical']:.1f}"
             for k in header[1:5]]
    answer = (f"{llm.get('test_unusual/action', float('nan')):.1f} / "
              f"{llm.get('test_typical/action', float('nan')):.1f}")
    print("| " + " | ".join([f"`{preset}` seed {args.seed}"] + cells + [answer]) + " |")


if __name__ == "__main__":
  main()
