"""The full MashVLM on the tiny config: jitted forward/grad with padding, plumbing against
the numpy LLaMA, frozen vision tower, unrolled layers against nn.scan, video tokens pooled
before the projector's last layer, and parameter counts of the 7B config."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax import layout
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.model.projector import Projector
from mashvlm_jax.model.video_tokens import build_video_tokens
from mashvlm_jax.model.vision import ClipVisionEncoder, normalize_frames
from conftest import load_config
import reference


def setup(arg=None, **overrides):
  config = load_config("tiny_synthetic", arg)
  config.model.update(overrides)
  cfg = ModelConfig.from_dict(config.model)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, size=(2, 8, 64, 64, 3)).astype(np.uint8)
  text = rng.integers(0, cfg.llm.vocab_size, size=(2, 12)).astype(np.int32)
  text_mask = np.arange(12)[None] < np.array([[12], [7]])
  return cfg, params, jnp.asarray(frames), jnp.asarray(text), jnp.asarray(text_mask)


def xent(logits, targets, weights):
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return jnp.sum(nll * weights) / jnp.sum(weights)


@pytest.mark.parametrize("arg", [None, "dtype=bfloat16", "ablation=baseline"])
def test_jit_forward_and_grad_finite_with_padding(arg):
  cfg, params, frames, text, text_mask = setup(arg)
  model = mashvlm.MashVLM(cfg)

  @jax.jit
  def loss_fn(p):
    logits = model.apply({"params": p}, frames, text, text_mask)
    return xent(logits[:, :-1], text[:, 1:], text_mask[:, 1:])

  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert np.isfinite(loss) and loss > 0
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for _, g in leaves)
  norms = {jax.tree_util.keystr(p): float(jnp.linalg.norm(g.astype(jnp.float32)))
           for p, g in leaves}
  # frozen CLIP: no gradient; projector and LLM learn
  assert all(v == 0 for k, v in norms.items() if "vision_tower" in k)
  assert norms["['projector']['linear_1']['kernel']"] > 0
  assert norms["['language_model']['layers']['self_attn']['q_proj']['kernel']"] > 0


@pytest.mark.parametrize("feature_layer", [0, 1])
def test_unfrozen_vision_gets_gradient(feature_layer):
  """Unfrozen, the patch embedding learns; the encoder layers learn exactly when the
  selected features come after them (feature_layer=0 stops before layer 1)."""
  cfg, params, frames, text, text_mask = setup(freeze_vision=False)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision,
                                                             feature_layer=feature_layer))
  grads = jax.jit(jax.grad(
      lambda p: mashvlm.MashVLM(cfg).apply({"params": p}, frames, text).sum()))(params)
  tower = grads["vision_tower"]
  assert float(jnp.abs(tower["patch_embedding"]["kernel"]).max()) > 0
  layer_grad = float(jnp.abs(tower["layers"]["fc1"]["kernel"][0]).max())
  assert (layer_grad > 0) == (feature_layer >= 1)


def test_padding_does_not_change_real_logits():
  cfg, params, frames, text, text_mask = setup()
  apply = jax.jit(mashvlm.MashVLM(cfg).apply)
  padded = apply({"params": params}, frames, text, text_mask)
  short = apply({"params": params}, frames[1:], text[1:, :7])
  np.testing.assert_allclose(padded[1, :7], short[0], atol=1e-4, rtol=1e-4)
  assert np.isfinite(np.asarray(padded)).all()


@pytest.mark.parametrize("arg", ["ablation=mash", "ablation=baseline", "ablation=t6_disable_none"])
def test_logits_equal_numpy_llama_over_the_sequence(arg):
  """Ids, mask and text slicing inside MashVLM agree with layout + the numpy LLaMA."""
  cfg, params, frames, text, text_mask = setup(arg)
  model = mashvlm.MashVLM(cfg)
  logits = jax.jit(model.apply)({"params": params}, frames, text, text_mask)
  embeds, types, ids, mask = jax.jit(
      lambda p: model.apply({"params": p}, frames, text, text_mask,
                            method=mashvlm.MashVLM.sequence))(params)
  m, n = cfg.video_token_counts
  for row, length in ((0, 12), (1, 7)):
    np.testing.assert_array_equal(types[row], layout.token_types(m, n, length, pad_to=m + n + 12))
    s = m + n + length
    want_ids = np.stack([reference.paper_ids(m, n, length)[i] for i in
                         {"harmonic": (1, 0), "distinct": (0, 0)}[cfg.rope_mode]])
    np.testing.assert_array_equal(ids[row, :, :s], want_ids)
    _, want = reference.llama(params["language_model"], np.asarray(embeds[row, :s]),
                              want_ids, np.asarray(mask[row, :s, :s]),
                              theta=cfg.llm.rope_theta, eps=cfg.llm.rms_norm_eps, tied=False)
    np.testing.assert_allclose(logits[row, :length], want[m + n:], atol=2e-4, rtol=1e-4)


def test_remat_policies_agree():
  cfg, params, frames, text, text_mask = setup()

  def grad_fn(model_cfg):
    loss = lambda p: mashvlm.MashVLM(model_cfg).apply({"params": p}, frames, text,
                                                      text_mask).std()
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, grads = grad_fn(cfg)
  for policy in ("full", "dots"):
    cfg2 = cfg.__class__(**{**cfg.__dict__, "remat_policy": policy})
    loss2, grads2 = grad_fn(cfg2)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                           grads2, grads)


def test_unrolled_layers_equal_the_scan():
  """scan_layers=False applies the same stacked parameters layer by layer: the same
  parameter tree, loss and gradients (vision layers included, unfrozen and read after
  layer 1 of 2) and the same prefill logits and KV cache as the nn.scan stacks."""
  cfg, params, frames, text, text_mask = setup(freeze_vision=False)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, feature_layer=1))
  got = {}
  for scan in (True, False):
    model_cfg = dataclasses.replace(cfg, scan_layers=scan)
    model = mashvlm.MashVLM(model_cfg)
    shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype),
                                    nn.unbox(mashvlm.abstract_params(model_cfg)))
    loss = lambda p: xent(model.apply({"params": p}, frames, text, text_mask)[:, :-1],
                          text[:, 1:], text_mask[:, 1:])
    prefill = lambda p: model.apply({"params": p}, frames, text, text_mask, 128,
                                    method=mashvlm.MashVLM.prefill, mutable=["cache"])
    (logits, _, _), cache = jax.jit(prefill)(params)
    got[scan] = shapes, jax.jit(jax.value_and_grad(loss))(params), logits, cache
  (shapes, (loss, grads), logits, cache), want = got[False], got[True]
  assert shapes == want[0]
  np.testing.assert_allclose(loss, want[1][0], rtol=1e-6)
  assert float(jnp.abs(grads["vision_tower"]["layers"]["fc1"]["kernel"][0]).max()) > 0
  for got_tree, want_tree in ((grads, want[1][1]), (cache, want[3])):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                           got_tree, want_tree)
  np.testing.assert_allclose(logits, want[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projector", ["mlp2x_gelu", "linear"])
def test_video_tokens_average_before_the_projectors_last_layer(projector):
  """MashVLM.video_tokens averages frame features before the projector's last (affine)
  layer; the tokens equal build_video_tokens over every projected frame token (the
  paper's order: project, then pool)."""
  cfg, params, frames, _, _ = setup(projector=projector)
  model = mashvlm.MashVLM(cfg)
  temporal, spatial = jax.jit(lambda p: model.apply(
      {"params": p}, frames, method=mashvlm.MashVLM.video_tokens))(params)
  pixels = normalize_frames(frames.reshape((-1,) + frames.shape[2:]))
  feats = ClipVisionEncoder(cfg.vision).apply({"params": params["vision_tower"]}, pixels)
  project = functools.partial(Projector(cfg.llm.hidden_size, cfg.projector).apply,
                              {"params": params["projector"]})
  batch, num_frames = frames.shape[:2]
  cls = project(feats["cls"]).reshape(batch, num_frames, -1)
  patches = project(feats["patches"]).reshape(batch, num_frames, cfg.vision.grid ** 2, -1)
  want_temporal, want_spatial = build_video_tokens(cls, patches, (cfg.vision.grid,) * 2)
  np.testing.assert_allclose(temporal, want_temporal, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(spatial, want_spatial, atol=1e-5, rtol=1e-5)


def test_7b_parameter_counts():
  cfg = ModelConfig.from_dict(load_config("mashvlm_7b").model)
  assert cfg.video_token_counts == (47, 256)
  shapes = mashvlm.abstract_params(cfg)
  # LLaMA-2-7B / Vicuna-7B: vocab V=32000, hidden d=4096, 32 layers, MLP f=11008, untied
  # lm_head; per layer q, k, v, o (4 d^2), gate, up, down (3 d f) and two RMSNorm scales.
  V, d, f = 32000, 4096, 11008
  assert 2 * V * d + 32 * (4 * d * d + 3 * d * f + 2 * d) + d == 6_738_415_616
  assert mashvlm.count_params(shapes["language_model"]) == 6_738_415_616
  # CLIP ViT-L/14 at 224 px: patch conv (no bias), class token, 257 positions, pre/post
  # LayerNorm; per layer q, k, v, o and fc1, fc2 with biases and two LayerNorms.
  w, m = 1024, 4096
  layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 2 * 2 * w
  assert 3 * 14 * 14 * w + w + 257 * w + 2 * w + 24 * layer + 2 * w == 303_179_776
  assert mashvlm.count_params(shapes["vision_tower"]) == 303_179_776
  # projector mlp2x_gelu: 1024 -> 4096 -> 4096 with biases
  assert mashvlm.count_params(shapes["projector"]) == (w * d + d) + (d * d + d) == 20_979_712


def test_wrong_frame_count_is_named():
  cfg, params, frames, text, _ = setup()
  with pytest.raises(ValueError, match="T=8"):
    mashvlm.MashVLM(cfg).apply({"params": params}, frames[:, :5], text)
