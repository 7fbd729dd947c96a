"""The video token builder against an explicit-loop numpy recomputation."""
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax.model.video_tokens import build_video_tokens, segment_bounds


def numpy_tokens(cls, patches, gh, gw):
  t = patches.shape[0]
  # Rule: the first T mod 4 segments hold one extra frame (numpy.array_split).
  sizes = [t // 4 + (1 if i < t % 4 else 0) for i in range(4)]
  starts = np.cumsum([0] + sizes)
  grid = patches.reshape(t, gh, gw, -1)
  spatial = []
  for s in range(4):
    seg = sum(grid[f] for f in range(starts[s], starts[s + 1])) / sizes[s]
    for i in range(gh // 2):
      for j in range(gw // 2):
        spatial.append((seg[2 * i, 2 * j] + seg[2 * i + 1, 2 * j] + seg[2 * i, 2 * j + 1]
                        + seg[2 * i + 1, 2 * j + 1]) / 4)
  means = [patches[f].mean(0) for f in range(t)]
  diffs = [(patches[f + 1] - patches[f]).mean(0) for f in range(t - 1)]
  temporal = list(cls) + means + diffs
  return np.stack(temporal), np.stack(spatial)


@pytest.mark.parametrize("t", [4, 5, 6, 7, 8, 9, 16])
@pytest.mark.parametrize("gh,gw", [(4, 4), (6, 4)])
def test_tokens_match_numpy(t, gh, gw):
  rng = np.random.default_rng(t * 10 + gh)
  batch, dim = 2, 5
  cls = rng.normal(size=(batch, t, dim)).astype(np.float32)
  patches = rng.normal(size=(batch, t, gh * gw, dim)).astype(np.float32)
  temporal, spatial = build_video_tokens(jnp.asarray(cls), jnp.asarray(patches), (gh, gw))
  assert temporal.shape == (batch, 3 * t - 1, dim)
  assert spatial.shape == (batch, gh * gw, dim)
  for b in range(batch):
    want_t, want_s = numpy_tokens(cls[b], patches[b], gh, gw)
    np.testing.assert_allclose(temporal[b], want_t, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spatial[b], want_s, rtol=1e-5, atol=1e-5)


def test_segment_rule_documented():
  assert segment_bounds(6) == [(0, 2), (2, 4), (4, 5), (5, 6)]
  assert segment_bounds(8) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_bad_shapes():
  with pytest.raises(ValueError, match="num_frames"):
    build_video_tokens(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 16, 4)), (4, 4))
  with pytest.raises(ValueError, match="grid"):
    build_video_tokens(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 15, 4)), (4, 4))
