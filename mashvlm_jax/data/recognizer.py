"""Closed-form action recognizers for the synthetic set (LLaVAction's AVION / TIM, issue 18)
and the predictions file users give for their own data.

Two deterministic recognizers, ridge regression on fixed cheap features of the frames,
with different features and seeds so that their rankings disagree:

  A ("thumbnails"): 6x6 grey thumbnails of each frame, the absolute differences of
    consecutive thumbnails, and a 3x3 colour thumbnail of the mean frame, through 1024
    random cosine features drawn with seed 0. Recognizer A gives the training distractors.
  B ("regions"): mean colours of a 4x4 grid per frame, their signed and absolute
    differences between consecutive frames, and the centroid of each consecutive pair's
    absolute difference (on a 16x16 grid), through 1024 random cosine features drawn with
    seed 1. Recognizer B gives the evaluation options.

Each fits a ridge regression (normal equations solved with numpy) from its standardised
features to the one-hot verb and noun of the train split's clips with an actor; the score
of action class ``verb * 8 + noun`` (tasks/mqa.py) is the verb score plus the noun score,
and ``ranked`` sorts the 64 classes by score (ties: lower id first). Clips are resampled
to 8 frames and averaged into fixed grids, so any frame count and resolution (>= 16x16)
give the same features. Like a real recognizer trained on biased data, both lean towards
the scene's typical action: on the default preset (8 frames of 64x64, fitted on 3040 clips
in about 15 s on 2 cores, mostly rendering) A / B reach top-1 99.5 / 100% and top-5
99.8 / 100% on test_typical, but top-1 55.6 / 64.3% and top-5 98.7 / 99.3% on
test_unusual (chance: 1.6% / 7.8%), and the scene's typical action is among A's five
options on 82% of the unusual clips.

Predictions file (JSON lines): ``{"id": clip id, "ranked": [class ids, best first]}`` per
clip; ``read_predictions`` checks every line (errors name the file, line and field).

``python -m mashvlm_jax.data.recognizer --preset=default`` fits both on the synthetic
train split and prints their top-1 / top-5 accuracy on the test splits (``benchmark``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from mashvlm_jax import paths
from mashvlm_jax.data import synthetic
from mashvlm_jax.data.tasks import mqa

FRAMES = 8  # frames every clip is resampled to before its features are taken
NAMES = ("A", "B")
TEST_SPLITS = ("test_typical", "test_unusual")  # splits whose clips have an action label


# ------------------------------------------------------------------------------ features

def resample(clips: np.ndarray, num_frames: int = FRAMES) -> np.ndarray:
  """[n, T, H, W, C] -> [n, num_frames, H, W, C], frames at evenly spaced indices."""
  index = np.rint(np.linspace(0, clips.shape[1] - 1, num_frames)).astype(int)
  return clips[:, index]


def grid_means(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """[..., H, W, C] (any real dtype) -> float32 [..., rows, cols, C]: the mean of each cell
  of a rows x cols grid (cell edges at rounded fractions of H and W; needs H >= rows,
  W >= cols)."""
  h, w = x.shape[-3:-1]
  if h < rows or w < cols:
    raise ValueError(f"frames of {h}x{w} are smaller than the {rows}x{cols} feature grid")
  ys = np.rint(np.linspace(0, h, rows + 1)).astype(int)
  xs = np.rint(np.linspace(0, w, cols + 1)).astype(int)
  sums = np.add.reduceat(x, ys[:-1], axis=-3, dtype=np.float32)
  sums = np.add.reduceat(sums, xs[:-1], axis=-2)
  counts = np.diff(ys)[:, None, None] * np.diff(xs)[None, :, None]
  return sums / counts


def _cells(clips: np.ndarray, rows: int, cols: int) -> np.ndarray:
  """uint8 [n, T, H, W, 3] -> float32 [n, FRAMES, rows, cols, 3]: grid-cell mean colours
  in [0, 1] of the clip resampled to FRAMES frames."""
  clips = np.asarray(clips)
  if clips.ndim != 5 or clips.shape[-1] != 3 or clips.shape[1] < 2:
    raise ValueError(f"recognizer features need uint8 clips [n, T>=2, H, W, 3], found shape "
                     f"{clips.shape}")
  return grid_means(resample(clips), rows, cols) / 255.0


def features_a(clips: np.ndarray) -> np.ndarray:
  """Raw features of recognizer A for uint8 [n, T, H, W, 3]: float [n, 8*36 + 7*36 + 27]:
  6x6 grey thumbnails per frame, the |differences| of consecutive thumbnails, and the
  frame-mean colour thumbnail pooled to 3x3."""
  cells = _cells(clips, 6, 6)  # [n, 8, 6, 6, 3]
  n = len(cells)
  grey = cells.mean(-1).reshape(n, FRAMES, -1)
  colour = cells.mean(1).reshape(n, 3, 2, 3, 2, 3).mean((2, 4)).reshape(n, -1)
  return np.concatenate([grey.reshape(n, -1),
                         np.abs(np.diff(grey, axis=1)).reshape(n, -1), colour], axis=1)


def features_b(clips: np.ndarray) -> np.ndarray:
  """Raw features of recognizer B for uint8 [n, T, H, W, 3]: float [n, 8*48 + 2*7*48 + 7*2]:
  mean colours of a 4x4 grid per frame, their signed and absolute differences, and the
  centroid (x, y as frame fractions) of each consecutive pair's absolute difference on a
  16x16 grid."""
  fine = _cells(clips, 16, 16)  # [n, 8, 16, 16, 3]
  n = len(fine)
  cells = fine.reshape(n, FRAMES, 4, 4, 4, 4, 3).mean((3, 5)).reshape(n, FRAMES, -1)
  diff = np.diff(cells, axis=1)
  motion = np.abs(np.diff(fine, axis=1)).sum(-1)  # [n, 7, 16, 16]
  mass = motion.sum((-2, -1)) + 1e-6
  centre = (np.arange(16) + 0.5) / 16
  cy = (motion.sum(-1) * centre).sum(-1) / mass
  cx = (motion.sum(-2) * centre).sum(-1) / mass
  return np.concatenate([cells.reshape(n, -1), diff.reshape(n, -1),
                         np.abs(diff).reshape(n, -1), np.stack([cx, cy], -1).reshape(n, -1)],
                        axis=1)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One recognizer's recipe: raw features, random cosine features, ridge strength."""
  features: Callable[[np.ndarray], np.ndarray]
  seed: int
  width: int  # random cosine features
  scale: float  # projection std per standardised raw feature, times 1/sqrt(dim)
  ridge: float  # L2 strength per training clip


SPECS = {"A": Spec(features_a, seed=0, width=1024, scale=1.0, ridge=1e-4),
         "B": Spec(features_b, seed=1, width=1024, scale=1.0, ridge=1e-4)}


def raw_features(name: str, clips: np.ndarray) -> np.ndarray:
  """float32 [n, D] raw features of recognizer ``name`` for uint8 clips [n, T, H, W, 3]."""
  return _spec(name).features(clips).astype(np.float32)


def _spec(name: str) -> Spec:
  if name not in SPECS:
    raise ValueError(f"unknown recognizer {name!r}; known: {sorted(SPECS)}")
  return SPECS[name]


# ------------------------------------------------------------------------------ ridge

@dataclasses.dataclass
class Recognizer:
  """A fitted recognizer: standardisation, random cosine features and two ridge heads.

  mean, std: [D] raw-feature standardisation; proj [D, F], phase [F]: cosine features
  sqrt(2/F) cos(z proj + phase); weights [F, 16], bias [16]: the verb head (columns 0-7)
  and the noun head (columns 8-15).
  """
  name: str
  mean: np.ndarray
  std: np.ndarray
  proj: np.ndarray
  phase: np.ndarray
  weights: np.ndarray
  bias: np.ndarray

  def embed(self, raw: np.ndarray) -> np.ndarray:
    """[n, D] raw features -> [n, F] random cosine features."""
    z = (raw - self.mean) / self.std
    return np.sqrt(2.0 / self.proj.shape[1]) * np.cos(z @ self.proj + self.phase)

  def heads(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, D] raw features -> (verb scores [n, 8], noun scores [n, 8])."""
    out = self.embed(raw) @ self.weights + self.bias
    return out[:, :len(mqa.VERBS)], out[:, len(mqa.VERBS):]

  def scores(self, raw: np.ndarray) -> np.ndarray:
    """[n, D] raw features -> [n, 64] action-class scores: score of class verb * 8 + noun
    = verb score + noun score."""
    verb, noun = self.heads(raw)
    return (verb[:, :, None] + noun[:, None, :]).reshape(len(verb), mqa.NUM_CLASSES)

  def ranked(self, raw: np.ndarray) -> np.ndarray:
    """int [n, 64]: class ids by decreasing score, ties to the lower id."""
    return np.argsort(-self.scores(raw), axis=1, kind="stable")

  def rank_clips(self, clips: np.ndarray) -> np.ndarray:
    """int [n, 64] ranked class ids of uint8 clips [n, T, H, W, 3]."""
    return self.ranked(raw_features(self.name, clips))


def ridge(x: np.ndarray, y: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
  """(w [d, k], b [k]) minimising |x w + b - y|^2 + strength * n * |w|^2 for x [n, d],
  y [n, k]: the normal equations of the centred problem in float64, in the primal
  (d x d) or, when n < d, the dual (n x n) form."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  penalty = strength * len(x)
  if len(x) >= x.shape[1]:
    w = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ yc)
  else:
    w = xc.T @ np.linalg.solve(xc @ xc.T + penalty * np.eye(len(x)), yc)
  return w, y_mean - x_mean @ w


def fit(name: str, raw: np.ndarray, verbs: Sequence[int], nouns: Sequence[int]) -> Recognizer:
  """Fits recognizer ``name`` on raw features [n, D] and integer verb/noun ids [n]: one
  ridge solve for the one-hot verb and noun targets together."""
  spec = _spec(name)
  verbs, nouns = np.asarray(verbs), np.asarray(nouns)
  if not len(raw) == len(verbs) == len(nouns) or len(raw) == 0:
    raise ValueError(f"fit needs as many verb and noun ids as feature rows (> 0), found "
                     f"{len(raw)} rows, {len(verbs)} verbs, {len(nouns)} nouns")
  mean, std = raw.mean(0), raw.std(0) + 1e-6
  rng = np.random.default_rng(spec.seed)
  proj = rng.normal(0.0, spec.scale / np.sqrt(raw.shape[1]), (raw.shape[1], spec.width))
  phase = rng.uniform(0.0, 2 * np.pi, spec.width)
  model = Recognizer(name, mean, std, proj.astype(np.float32), phase.astype(np.float32),
                     np.zeros(0), np.zeros(0))
  targets = np.concatenate([np.eye(len(mqa.VERBS))[verbs], np.eye(len(mqa.NOUNS))[nouns]], 1)
  w, b = ridge(model.embed(raw), targets, spec.ridge)
  model.weights, model.bias = w.astype(np.float32), b.astype(np.float32)
  return model


# ------------------------------------------------------------------------------ synthetic

# Clips per split of the synthetic "default" preset (builders.SYNTHETIC_PRESETS).
DEFAULT_SIZES = {"train": 3200, "test_typical": 400, "test_unusual": 448,
                 "test_scene_only": 200}


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
  """Which synthetic clips to render: clips per split, frames and frame size, and the
  synthetic.clip_specs arguments (the same clips, ids included, as the built data set)."""
  sizes: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SIZES))
  num_frames: int = 8
  size: int = 64
  seed: int = 0
  typical_prob: float = 0.9
  scene_only_share: float = 0.05

  @classmethod
  def from_config(cls, config) -> SyntheticSet:
    """The clips of a builders.SyntheticConfig (its split_sizes, num_frames, size, seed,
    typical_prob, scene_only_share)."""
    return cls(dict(config.split_sizes), config.num_frames, config.size, config.seed,
               config.typical_prob, config.scene_only_share)

  def specs(self, split: str) -> list[synthetic.ClipSpec]:
    if split not in self.sizes:
      raise ValueError(f"no size for synthetic split {split!r}; sizes: {self.sizes}")
    return synthetic.clip_specs(split, self.sizes[split], seed=self.seed,
                                typical_prob=self.typical_prob,
                                scene_only_share=self.scene_only_share)

  def labelled(self, split: str) -> list[synthetic.ClipSpec]:
    """The split's clips with an actor (scene-only clips have no action label)."""
    return [s for s in self.specs(split) if s.action]

  def render(self, specs: Sequence[synthetic.ClipSpec]) -> np.ndarray:
    """uint8 [n, T, H, W, 3] frames of ``specs``."""
    return np.stack([synthetic.render_clip(s, self.num_frames, self.size, self.size)
                     for s in specs])


def split_features(data: SyntheticSet, split: str, names: Sequence[str] = NAMES,
                   chunk: int = 128):
  """(labelled specs, {name: raw features [n, D]}), rendering each clip once, ``chunk``
  clips at a time."""
  specs = data.labelled(split)
  rows = {name: [] for name in names}
  for begin in range(0, len(specs), chunk):
    clips = data.render(specs[begin:begin + chunk])
    for name in names:
      rows[name].append(raw_features(name, clips))
  return specs, {name: np.concatenate(r) if r else np.zeros((0, 0), np.float32)
                 for name, r in rows.items()}


def labels(specs: Sequence[synthetic.ClipSpec]) -> np.ndarray:
  """int [n, 3] (verb, noun, action class) of clips with an actor (ValueError naming a
  scene-only clip)."""
  out = []
  for spec in specs:
    triple = mqa.clip_labels(spec.action, spec.scene)
    if triple is None:
      raise ValueError(f"synthetic clip {spec.id} is scene-only: it has no action label")
    out.append(triple)
  return np.asarray(out, np.int64).reshape(-1, 3)


def fit_synthetic(data: SyntheticSet, names: Sequence[str] = NAMES) -> dict[str, Recognizer]:
  """Recognizers ``names`` fitted on the synthetic train split's clips with an actor."""
  specs, raw = split_features(data, "train", names)
  y = labels(specs)
  return {name: fit(name, raw[name], y[:, 0], y[:, 1]) for name in names}


def topk_accuracy(ranked: np.ndarray, classes: Sequence[int], k: int) -> float:
  """Share of rows whose class is among the first ``k`` of ``ranked`` [n, C]."""
  classes = np.asarray(classes)
  return float((ranked[:, :k] == classes[:, None]).any(1).mean())


def evaluate_synthetic(recognizers: dict[str, Recognizer], data: SyntheticSet,
                       splits: Sequence[str] = TEST_SPLITS) -> dict:
  """{name: {split: {"top1", "top5", "clips"}}} on the synthetic test splits."""
  out = {name: {} for name in recognizers}
  for split in splits:
    specs, raw = split_features(data, split, list(recognizers))
    y = labels(specs)[:, 2]
    for name, model in recognizers.items():
      ranked = model.ranked(raw[name])
      out[name][split] = {"top1": topk_accuracy(ranked, y, 1),
                          "top5": topk_accuracy(ranked, y, 5), "clips": len(y)}
  return out


def synthetic_predictions(model: Recognizer, data: SyntheticSet, split: str,
                          k: int = mqa.NUM_CLASSES) -> dict[str, list[int]]:
  """{clip id: first ``k`` ranked class ids} for the split's clips with an actor."""
  specs, raw = split_features(data, split, [model.name])
  ranked = model.ranked(raw[model.name])[:, :k]
  return {spec.id: [int(c) for c in row] for spec, row in zip(specs, ranked)}


# ------------------------------------------------------------------------------ files

def write_predictions(path: str | os.PathLike, predictions: dict[str, Sequence[int]]) -> None:
  """Writes {clip id: ranked class ids} as JSON lines {"id", "ranked"}, in id order, via a
  temporary file and a rename."""
  paths.write_text_atomic(path, "".join(
      json.dumps({"id": clip_id, "ranked": [int(c) for c in predictions[clip_id]]}) + "\n"
      for clip_id in sorted(predictions)))


def read_predictions(path: str | os.PathLike, num_classes: int | None = mqa.NUM_CLASSES,
                     k: int = mqa.K) -> dict[str, list[int]]:
  """{clip id: ranked class ids} from a JSON-lines file.

  Every non-blank line must be an object with "id" (a non-empty string, once per file)
  and "ranked" (at least ``k`` distinct integer class ids, each in [0, num_classes) unless
  num_classes is None). ValueError "<file>:<line>: field '<field>': ..." otherwise.
  """
  out = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'id' and 'ranked', found "
                         f"{type(row).__name__}")
      clip_id, ranked = row.get("id"), row.get("ranked")
      if not isinstance(clip_id, str) or not clip_id:
        raise ValueError(f"{where}: field 'id': expected a non-empty string, found {clip_id!r}")
      if clip_id in out:
        raise ValueError(f"{where}: field 'id': clip {clip_id!r} is listed twice")
      out[clip_id] = _ranked(where, ranked, num_classes, k)
  return out


def _ranked(where: str, ranked, num_classes: int | None, k: int) -> list[int]:
  field = f"{where}: field 'ranked'"
  if not isinstance(ranked, list):
    raise ValueError(f"{field}: expected a list of class ids, found {ranked!r}")
  for position, c in enumerate(ranked):
    if isinstance(c, bool) or not isinstance(c, int):
      raise ValueError(f"{field}[{position}]: expected an integer class id, found {c!r}")
    if num_classes is not None and not 0 <= c < num_classes:
      raise ValueError(f"{field}[{position}]: unknown class {c}; expected an id in "
                       f"[0, {num_classes})")
  seen = {}
  for position, c in enumerate(ranked):
    if c in seen:
      raise ValueError(f"{field}[{position}]: class {c} is listed twice (first at "
                       f"{seen[c]})")
    seen[c] = position
  if len(ranked) < k:
    raise ValueError(f"{field}: expected at least {k} class ids, found {len(ranked)}")
  return ranked


# ------------------------------------------------------------------------------ command

def benchmark(data: SyntheticSet) -> dict:
  """Fits both recognizers on ``data``'s train split; their test accuracies and timing."""
  start = time.perf_counter()
  models = fit_synthetic(data)
  fitted = time.perf_counter() - start
  table = evaluate_synthetic(models, data)
  return {"fit_seconds": round(fitted, 2),
          "total_seconds": round(time.perf_counter() - start, 2), "accuracy": table}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="default", help="tiny | default | large")
  parser.add_argument("--num_frames", type=int, default=8)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--typical_prob", type=float, default=0.9)
  parser.add_argument("--scene_only_share", type=float, default=0.05)
  args = parser.parse_args(argv)
  from mashvlm_jax.data import builders  # tensorflow_datasets: only for the command
  config = builders.synthetic_config(args.preset, args.num_frames, args.size,
                                     args.typical_prob, args.scene_only_share, args.seed)
  print(json.dumps(benchmark(SyntheticSet.from_config(config)), indent=1))


if __name__ == "__main__":
  main()
