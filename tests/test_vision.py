"""CLIP ViT encoder against an independent numpy CLIP, at several feature layers."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax.model.config import VisionConfig
from mashvlm_jax.model.vision import ClipVisionEncoder, normalize_frames
import reference


@pytest.mark.parametrize("feature_layer", [-2, -1, 0, 1])
def test_clip_matches_numpy(feature_layer):
  cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=24, num_layers=3, num_heads=3,
                     intermediate_size=40, feature_layer=feature_layer)
  model = ClipVisionEncoder(cfg, pooled=True)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(pixels))["params"])
  params = jax.tree_util.tree_map(
      lambda x: x + 0.05 * np.random.default_rng(x.size).normal(size=x.shape), params)
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(pixels))
  for b in range(2):
    state, pooled = reference.clip_vision(params, pixels[b].astype(np.float64), patch=8,
                                          eps=cfg.layer_norm_eps, feature_layer=feature_layer)
    np.testing.assert_allclose(out["cls"][b], state[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["patches"][b], state[1:], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["pooled"][b], pooled, atol=1e-4, rtol=1e-4)


def test_wrong_frame_size_is_named():
  cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=24, num_layers=1, num_heads=3,
                     intermediate_size=40)
  with pytest.raises(ValueError, match="32x32x3"):
    ClipVisionEncoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_normalize_frames():
  frames = np.array([[[[0, 128, 255]]]], np.uint8)
  got = np.asarray(normalize_frames(jnp.asarray(frames)))
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  np.testing.assert_allclose(got[0, 0, 0], (np.array([0, 128, 255]) / 255 - mean) / std, rtol=1e-6)


def test_sincos2d_position_init():
  """Patch (row r, col c) gets [sin(c w_k) | cos(c w_k) | sin(r w_k) | cos(r w_k)],
  w_k = 10000^(-k/q), q = dim/4; the class token's row is zero."""
  grid, dim = 4, 16
  cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=dim, num_layers=1, num_heads=2,
                     intermediate_size=32, position_init="sincos2d")
  params = nn.unbox(ClipVisionEncoder(cfg).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 32, 32, 3)))["params"])
  table = np.asarray(params["position_embedding"])
  assert table.shape == (grid * grid + 1, dim)
  np.testing.assert_array_equal(table[0], 0)
  q = dim // 4
  for r in range(grid):
    for c in range(grid):
      want = []
      for coord in (c, r):
        want += [math.sin(coord * 10000.0 ** (-k / q)) for k in range(q)]
        want += [math.cos(coord * 10000.0 ** (-k / q)) for k in range(q)]
      np.testing.assert_allclose(table[1 + r * grid + c], want, atol=1e-6)


def test_bad_position_init_is_named():
  with pytest.raises(ValueError, match="position_init"):
    VisionConfig(position_init="learned").validate()
  with pytest.raises(ValueError, match="divisible by 4"):
    VisionConfig(hidden_size=18, num_heads=3, position_init="sincos2d").validate()


def scan_lengths(jaxpr) -> list[int]:
  """Lengths of the scans in a jaxpr, sub-jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      found.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += scan_lengths(inner)
  return found


@pytest.mark.parametrize("feature_layer, scan_layers", [(0, True), (1, False), (-2, True),
                                                        (-1, False)])
def test_layers_past_the_feature_layer_do_not_run(feature_layer, scan_layers):
  """The tower applies only the layers the selected hidden state depends on, over the
  first rows of the full parameter stack: the features equal those of a run through every
  layer (``pooled=True``), and the traced layer stack is that many layers long."""
  cfg = VisionConfig(image_size=32, patch_size=8, hidden_size=24, num_layers=3, num_heads=3,
                     intermediate_size=40, feature_layer=feature_layer)
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  full = ClipVisionEncoder(cfg, scan_layers=scan_layers, pooled=True)
  params = nn.unbox(jax.jit(full.init)(jax.random.PRNGKey(0), pixels)["params"])
  assert params["layers"]["fc1"]["kernel"].shape == (3, 24, 40)  # HF layout: every layer
  model = ClipVisionEncoder(cfg, scan_layers=scan_layers)
  got = jax.jit(model.apply)({"params": params}, pixels)
  want = jax.jit(full.apply)({"params": params}, pixels)
  assert sorted(got) == ["cls", "patches"]
  for key in ("cls", "patches"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)
  jaxpr = jax.make_jaxpr(model.apply)({"params": params}, pixels).jaxpr
  assert scan_lengths(jaxpr) == ([cfg.layers_to_run] if cfg.layers_to_run else [])
  assert scan_lengths(jax.make_jaxpr(full.apply)({"params": params}, pixels).jaxpr) == [3]
