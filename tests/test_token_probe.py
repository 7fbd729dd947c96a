"""benchmarks/token_probe.py: its dual-form ridge classifier against the primal solution."""
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import token_probe  # noqa: E402


def test_dual_ridge_equals_primal_ridge():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 7))
  labels = rng.integers(0, 3, size=40)
  strength = 2.5
  predict = token_probe.fit_ridge(x, labels, 3, strength)
  # Primal: W = (Z^T Z + lambda I)^-1 Z^T Y on the standardised features.
  z = (x - x.mean(0)) / (x.std(0) + 1e-6)
  y = np.eye(3)[labels] - 1.0 / 3
  weights = np.linalg.solve(z.T @ z + strength * np.eye(7), z.T @ y)
  x_new = rng.normal(size=(25, 7))
  z_new = (x_new - x.mean(0)) / (x.std(0) + 1e-6)
  np.testing.assert_array_equal(predict(x_new), np.argmax(z_new @ weights, axis=1))


def test_probe_reads_a_linearly_coded_label_and_not_noise():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, size=400)
  directions = rng.normal(size=(4, 30))
  coded = directions[labels] + 0.3 * rng.normal(size=(400, 30))
  noise = rng.normal(size=(400, 30))
  tests = lambda feats: {"held_out": (feats[300:], labels[300:])}  # noqa: E731
  assert token_probe.probe_accuracy(coded[:300], labels[:300], tests(coded), 4)[
      "held_out"] > 95
  assert token_probe.probe_accuracy(noise[:300], labels[:300], tests(noise), 4)[
      "held_out"] < 45
