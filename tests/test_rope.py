"""Harmonic-RoPE: rotation per the paper's eq. (1)-(2) and relative-position property."""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from mashvlm_jax.model import rope
from reference import rope_complex


def rotated_scores(q, k, ids_q, ids_k, theta=10000.0):
  """Scores q_rot . k_rot for q [Sq, d], k [Sk, d], ids int[2, S]."""
  inv = rope.inverse_frequencies(q.shape[-1], theta)
  rq = rope.apply_rotary(jnp.asarray(q)[None, :, None], rope.rotary_angles(jnp.asarray(ids_q)[None], inv))
  rk = rope.apply_rotary(jnp.asarray(k)[None, :, None], rope.rotary_angles(jnp.asarray(ids_k)[None], inv))
  return np.asarray(rq[0, :, 0] @ rk[0, :, 0].T)


def test_rotation_matches_complex_pairs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 3, 16)).astype(np.float32)
  ids = rng.integers(0, 50, size=(2, 7))
  inv = rope.inverse_frequencies(16, 500.0)
  got = rope.apply_rotary(jnp.asarray(x)[None], rope.rotary_angles(jnp.asarray(ids)[None], inv))[0]
  np.testing.assert_allclose(got, rope_complex(x.astype(np.float64), ids, 500.0), atol=2e-5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(-300, 300), st.integers(-300, 300))
def test_scores_depend_only_on_per_stream_differences(seed, shift_even, shift_odd):
  rng = np.random.default_rng(seed)
  q, k = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))
  ids_q = rng.integers(0, 400, size=(2, 5))
  ids_k = rng.integers(0, 400, size=(2, 6))
  shift = np.array([[shift_even], [shift_odd]])
  base = rotated_scores(q, k, ids_q, ids_k)
  np.testing.assert_allclose(rotated_scores(q, k, ids_q + 1000 + shift, ids_k + 1000 + shift),
                             base, atol=2e-3, rtol=1e-4)


def test_each_stream_matters_and_drives_its_own_pairs():
  rng = np.random.default_rng(1)
  q, k = rng.normal(size=(1, 16)), rng.normal(size=(1, 16))
  ids = np.array([[3], [3]])
  base = rotated_scores(q, k, ids, ids)
  for row in (0, 1):
    moved = ids.copy()
    moved[row] += 5
    assert abs(rotated_scores(q, k, ids, moved) - base).max() > 1e-3
  # zeroing the odd pairs of q and k makes the score blind to the odd stream (row 1)
  odd = np.zeros(16, bool)
  odd[[1, 3, 5, 7, 9, 11, 13, 15]] = True
  q0, k0 = np.where(odd, 0, q), np.where(odd, 0, k)
  np.testing.assert_allclose(rotated_scores(q0, k0, ids, ids + [[0], [7]]),
                             rotated_scores(q0, k0, ids, ids), atol=1e-5)
  assert abs(rotated_scores(q0, k0, ids, ids + [[7], [0]]) - rotated_scores(q0, k0, ids, ids)).max() > 1e-3


def test_rope_scaling():
  base = rope.inverse_frequencies(64, 10000.0)
  np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)
  np.testing.assert_allclose(rope.inverse_frequencies(64, 10000.0, {"rope_type": "linear", "factor": 4.0}),
                             base / 4, rtol=1e-6)
  llama3 = rope.inverse_frequencies(64, 500000.0, {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})
  plain = rope.inverse_frequencies(64, 500000.0)
  wavelen = 2 * np.pi / plain
  np.testing.assert_allclose(llama3[wavelen < 8192 / 4], plain[wavelen < 8192 / 4], rtol=1e-6)
  np.testing.assert_allclose(llama3[wavelen > 8192], plain[wavelen > 8192] / 8, rtol=1e-6)
  import pytest
  with pytest.raises(ValueError, match="yarn"):
    rope.inverse_frequencies(64, 1e4, {"rope_type": "yarn", "factor": 2.0})
