"""Trainer building blocks: mesh resolution, sharding rules, optimizer rules, loss,
gradient accumulation and the non-finite guard."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.train import optim, sharding, trainer


def test_mesh_shape_resolution_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 4, "tensor": 2}, 8) == (1, 4, 2)
  assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1)
  with pytest.raises(ValueError, match="needs 6 devices but 8"):
    sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.mesh_shape({"model": 2}, 8)


def test_fit_spec_replicates_indivisible_dims():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  spec = jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding.fit_spec(spec, (4, 6), mesh) == spec  # size-1 axes divide anything

  class FakeMesh:
    shape = {"data": 1, "fsdp": 4, "tensor": 2}
  assert sharding.fit_spec(spec, (8, 3), FakeMesh()) == jax.sharding.PartitionSpec("fsdp", None)


def test_batch_layout_errors_name_the_fix():
  class FakeMesh:
    shape = {"data": 2, "fsdp": 2, "tensor": 1}
  trainer.check_batch_layout(8, 2, FakeMesh(), 1)
  with pytest.raises(ValueError, match="data x fsdp = 4"):
    trainer.check_batch_layout(6, 1, FakeMesh(), 1)
  with pytest.raises(ValueError, match="grad_accum_steps=4"):
    trainer.check_batch_layout(8, 4, FakeMesh(), 1)
  with pytest.raises(ValueError, match="3 processes"):
    trainer.check_batch_layout(8, 1, FakeMesh(), 3)


OPTIM = dict(lr=0.1, warmup_steps=2, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.5, clip_norm=1e9, freeze=["^vision_tower/"],
             lr_multipliers={"^projector/": 0.1}, no_decay=r"(norm|bias)")


def params_tree():
  return {"vision_tower": {"fc1": {"kernel": jnp.ones((2, 2))}},
          "projector": {"linear_1": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
          "language_model": {"norm": {"scale": jnp.ones(2)}, "w": {"kernel": jnp.ones((2, 2))}}}


def test_optimizer_rules_against_adamw_by_hand():
  params = params_tree()
  tx, schedule = optim.make_optimizer(params, OPTIM, total_steps=10)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda x: 0.3 * jnp.ones_like(x), params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
  lr = float(schedule(2))
  assert abs(float(schedule(0))) < 1e-12 and abs(float(schedule(2)) - 0.1) < 1e-7
  # constant gradient: bias-corrected Adam direction is exactly 1 (up to eps)
  adam = 0.3 / (0.3 + 1e-8)
  np.testing.assert_allclose(updates["vision_tower"]["fc1"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["language_model"]["w"]["kernel"], -lr * (adam + 0.5),
                             rtol=1e-5)
  np.testing.assert_allclose(updates["language_model"]["norm"]["scale"], -lr * adam, rtol=1e-5)
  np.testing.assert_allclose(updates["projector"]["linear_1"]["kernel"],
                             -0.1 * lr * (adam + 0.5), rtol=1e-5)
  np.testing.assert_allclose(updates["projector"]["linear_1"]["bias"], -0.1 * lr * adam,
                             rtol=1e-5)
  # frozen parameters carry no Adam moments
  sizes = sum(x.size for x in jax.tree_util.tree_leaves(state))
  assert sizes < 2 * sum(x.size for x in jax.tree_util.tree_leaves(params))


def test_clipping_ignores_frozen_gradients():
  """A huge gradient on a frozen parameter must not shrink the trainable updates: with
  Adam eps=1e-3 a 1e-6 clip factor would turn the update 0.25/(0.25+eps) into ~2.5e-4."""
  params = params_tree()
  cfg = dict(OPTIM, clip_norm=1.0, weight_decay=0.0, lr_multipliers={}, eps=1e-3,
             warmup_steps=0)
  tx, schedule = optim.make_optimizer(params, cfg, total_steps=10)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  grads["vision_tower"]["fc1"]["kernel"] = 1e6 * jnp.ones((2, 2))
  grads["language_model"]["w"]["kernel"] = 0.25 * jnp.ones((2, 2))  # norm 0.5 < clip 1.0
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["language_model"]["w"]["kernel"],
                             -float(schedule(0)) * 0.25 / (0.25 + 1e-3), rtol=1e-5)
  np.testing.assert_allclose(updates["vision_tower"]["fc1"]["kernel"], 0.0)


def test_masked_xent_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 3))
  mask = np.array([[0, 1, 1], [1, 0, 0]], np.float32)
  nll, count, correct = trainer.masked_xent(jnp.asarray(logits), jnp.asarray(labels),
                                            jnp.asarray(mask))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -sum(logp[b, i, labels[b, i]] for b in range(2) for i in range(3) if mask[b, i])
  assert count == 3
  np.testing.assert_allclose(nll, want, rtol=1e-5)
  assert correct == sum((logits[b, i].argmax() == labels[b, i]) for b in range(2)
                        for i in range(3) if mask[b, i])


@functools.lru_cache(maxsize=None)
def small_model():
  """The real MashVLM, shrunk from the tiny config: 4 frames of 32x32 px (M=11, N=16), one
  vision and one LLM layer, 64-token vocabulary; with its parameters."""
  config = load_config("tiny_synthetic")
  config.model.num_frames = 4
  config.model.vision.update(image_size=32, num_layers=1)
  config.model.llm.update(num_layers=1, vocab_size=64)
  cfg = ModelConfig.from_dict(config.model)
  return mashvlm.MashVLM(cfg), nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))


def toy_batch(rows=4, length=6, vocab=64, seed=0):
  """A batch of the trainer's contract (data/pipeline.py) for small_model(); the last row
  has 2 text pads."""
  rng = np.random.default_rng(seed)
  text_mask = np.ones((rows, length), bool)
  text_mask[-1, -2:] = False
  return dict(frames=jnp.asarray(rng.integers(0, 256, (rows, 4, 32, 32, 3)), jnp.uint8),
              text_ids=jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
              text_mask=jnp.asarray(text_mask),
              labels=jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
              label_mask=jnp.asarray(rng.integers(0, 2, (rows, length)) * text_mask,
                                     jnp.float32))


def toy_state(tx, params):
  return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                            nonfinite=jnp.zeros((), jnp.int32))


def test_gradient_accumulation_equals_full_batch():
  """One SGD step of the real model: 4 microbatches of one row give the full batch's
  update (2 microbatches through train(): tests/test_train_paths.py)."""
  model, params = small_model()
  tx = optax.sgd(1.0)
  schedule = optax.constant_schedule(1.0)
  trainable = jax.tree_util.tree_map(lambda _: True, params)
  batch = toy_batch()
  outs = []
  for accum in (1, 4):
    step = jax.jit(trainer.make_train_step(model, tx, schedule, accum=accum,
                                           trainable=trainable))
    outs.append(step(toy_state(tx, params), batch))
  for state, metrics in outs[1:]:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                           state.params, outs[0][0].params)
    np.testing.assert_allclose(metrics["loss"], outs[0][1]["loss"], rtol=1e-6)
  moved = outs[0][0].params["language_model"]["lm_head"]["kernel"] - \
      params["language_model"]["lm_head"]["kernel"]
  assert float(jnp.abs(moved).max()) > 1e-4


def test_nonfinite_step_is_not_applied():
  """An infinite weight makes the real model's loss NaN: nothing is applied, it is counted."""
  model, params = small_model()
  tx = optax.adam(0.1)
  step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(0.1), accum=1,
                                         trainable=jax.tree_util.tree_map(lambda _: True,
                                                                          params)))
  params = jax.tree_util.tree_map_with_path(  # a copy: small_model() is shared
      lambda path, x: x.at[0, 0].set(jnp.inf) if "lm_head" in jax.tree_util.keystr(path)
      else x, params)
  state = toy_state(tx, params)
  new, metrics = step(state, toy_batch())
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["nonfinite"]) == 1 and int(new.step) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.params, state.params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.opt_state, state.opt_state)


def test_nonfinite_update_from_finite_gradients_is_not_applied():
  """A NaN learning rate: loss and gradients are finite, the update is not. Nothing is
  applied and the step is counted (the update used to be applied: NaN parameters)."""
  model, params = small_model()
  tx = optax.adam(float("nan"))
  step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(float("nan")),
                                         accum=1, trainable=jax.tree_util.tree_map(
                                             lambda _: True, params)))
  state = toy_state(tx, params)
  new, metrics = step(state, toy_batch())
  assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
  assert int(metrics["nonfinite"]) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, new.params, state.params)
