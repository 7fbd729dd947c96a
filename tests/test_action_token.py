"""LLaVAction's action token (model/action_token.py, issue 18): its config; its mask row
(every video token, no text) and its hidden state (changes with the frames, not with the
question); the heads' loss against numpy on a batch with an unlabelled row, lambda = 0
giving the plain LM loss, gradient accumulation 2 = 1; KV-cache generation, one-pass
scoring and RVE decoding with the token equal a full recompute; export-torch and
torch_reference parity of logits and heads; the pipeline's class labels and a short
training run that logs the heads' accuracies."""
import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, load_config
from mashvlm_jax import layout
from mashvlm_jax.convert import param_map
from mashvlm_jax.eval import generate, scoring
from mashvlm_jax.model import action_token, mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.train import trainer
from test_generate import recompute_greedy

HEADS = action_token.HEADS


FRAMES = 4
# the loss tests' token settings (every test reuses this config: one compile per function)
LOSS = dict(loss_weight=0.7, head_weights=(0.5, 0.3, 0.2))


def token_config(**action):
  """The tiny config shrunk to 4 frames of 32x32 (M=11, N=16), one decoder layer and a
  64-token vocabulary, with the action token enabled (``action`` overrides its fields)."""
  config = load_config("tiny_synthetic")
  config.model.num_frames = FRAMES
  config.model.vision.update(image_size=32, num_layers=1)
  config.model.llm.update(num_layers=1, vocab_size=64)
  model = config.model.to_dict()  # a plain dict: values of any type reach the checks
  model["action_token"].update({"enabled": True, **action})
  return ModelConfig.from_dict(model)


@functools.lru_cache(maxsize=None)
def tiny(**action):
  """(cfg, params): the token config and random parameters, the language model's and the
  token's weights sharpened (x8) so attention is not near uniform."""
  cfg = token_config(**action)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(1)))
  sharp = lambda path, x: x * 8 if jax.tree_util.keystr(path).startswith(
      ("['language_model']", "['action_token']")) and x.ndim >= 1 and "scale" not in \
      jax.tree_util.keystr(path) else x
  return cfg, jax.tree_util.tree_map_with_path(sharp, params)


def frames_for(rows, seed=0, size=32):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(rows, FRAMES, size, size, 3)).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def forward(cfg, with_heads=False):
  return jax.jit(functools.partial(mashvlm.MashVLM(cfg).apply, with_heads=with_heads))


# ------------------------------------------------------------------------------ config

def test_config_defaults_7b_sizes_and_errors():
  default = ModelConfig.from_dict(load_config("tiny_synthetic").model)
  assert not default.action_token.enabled
  assert default.prefix_len == sum(default.video_token_counts)  # today's prefix
  token = token_config()
  assert token.action_token.num_classes == (8, 8, 64)
  assert token.action_token.head_weights == (0.5, 0.5, 0.1)
  assert token.prefix_len == sum(token.video_token_counts) + 1
  hash(token)  # static: a jit argument and a module field
  # the stored model config (JSON: lists) reads back as the same config
  assert ModelConfig.from_dict(json.loads(json.dumps(token.to_dict()))) == token
  big = ModelConfig.from_dict(load_config("mashvlm_7b").model).action_token
  assert big.num_classes == (97, 300, 3806) and not big.enabled
  bad = {"num_verbs": 0, "loss_weight": -1.0, "head_weights": (1.0, 2.0),
         "enabled": "yes"}
  for key, value in bad.items():
    with pytest.raises(ValueError, match=f"action_token.{key}"):
      token_config(**{key: value})
  with pytest.raises(ValueError, match="unknown config key.*action_token.lambda"):
    token_config(**{"lambda": 0.1})


# ------------------------------------------------------------------------------ the token

def test_mask_row_of_the_token_sees_every_video_token_and_no_text():
  """layout.dst_mask of a ``[video][action][text]`` row (types as MashVLM.sequence builds
  them): the token's row holds exactly the M + N video keys and itself; no video query
  sees it; every text query does."""
  cfg = token_config()
  m, n = cfg.video_token_counts
  text_mask = np.array([True] * 5 + [False] * 2)
  types = layout.text_token_types(np.concatenate([[True], text_mask]), m, n)
  mask = layout.dst_mask(types, **cfg.mask.as_kwargs())
  token = m + n
  assert types[token] == layout.TEXT
  np.testing.assert_array_equal(mask[token], np.arange(len(types)) <= token)
  assert not mask[:token, token].any()  # video never sees it
  assert mask[token + 1:token + 6, token].all()  # every real text token does
  ids = layout.position_ids(types, cfg.rope_mode)
  assert ids[0, token] == max(m, n) and ids[1, token] == token  # text ids start at it


def test_token_state_changes_with_frames_and_not_with_the_question():
  """The heads read the token's final state: other questions and padding leave it bit for
  bit (another length: up to float rounding), other frames change it; the text sees the token (its embedding changes
  the text logits)."""
  cfg, params = tiny(**LOSS)
  frames = frames_for(2)
  rng = np.random.default_rng(1)
  text_a = rng.integers(4, 64, size=(2, 9)).astype(np.int32)
  text_b = rng.integers(4, 64, size=(2, 9)).astype(np.int32)
  mask_b = np.arange(9)[None] < np.array([[9], [3]])
  text_short = rng.integers(4, 64, size=(2, 4)).astype(np.int32)
  run = forward(cfg, True)
  logits_a, heads_a = run({"params": params}, frames, text_a)
  _, heads_b = run({"params": params}, frames, text_b, mask_b)
  _, heads_short = run({"params": params}, frames, text_short)
  _, heads_c = run({"params": params}, frames[::-1], text_a)
  for head in HEADS:
    np.testing.assert_array_equal(heads_a[head], heads_b[head])  # same shapes: bitwise
    np.testing.assert_allclose(heads_a[head], heads_short[head], atol=1e-5)
    assert np.abs(np.asarray(heads_a[head])[::-1] - heads_c[head]).max() < 1e-5
    assert np.abs(np.asarray(heads_a[head]) - heads_c[head]).max() > 1e-3
  moved = jax.tree_util.tree_map(lambda x: x, params)
  moved["action_token"] = dict(params["action_token"],
                               embedding=params["action_token"]["embedding"] + 1.0)
  logits_moved, _ = run({"params": moved}, frames, text_a)
  assert np.abs(np.asarray(logits_moved) - logits_a).max() > 1e-3


def test_gpu_backend_equals_dense_with_the_token():
  """The token is text to the mask: the gpu backend (causal flash attention plus the
  recomputed video rows) gives the dense logits and heads."""
  cfg, params = tiny(**LOSS)
  frames = frames_for(2)
  text = np.random.default_rng(2).integers(4, 64, size=(2, 7)).astype(np.int32)
  mask = np.arange(7)[None] < np.array([[7], [4]])
  want_logits, want_heads = forward(cfg, True)({"params": params}, frames, text, mask)
  fast = dataclasses.replace(cfg, attention_backend="gpu").validate()
  logits, heads = forward(fast, True)({"params": params}, frames, text, mask)
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(want_logits)[mask],
                             atol=2e-4)
  for head in HEADS:
    np.testing.assert_allclose(heads[head], want_heads[head], atol=2e-4)


# ------------------------------------------------------------------------------ the loss

def head_batch(vocab=64, rows=4, length=6, seed=0):
  """A trainer batch (data/pipeline.py contract with class_labels) for ``tiny``'s model:
  row 1 has no action label (-1s), row 3 has 2 text pads."""
  rng = np.random.default_rng(seed)
  text_mask = np.ones((rows, length), bool)
  text_mask[3, -2:] = False
  labels = np.stack([rng.integers(0, 8, rows), rng.integers(0, 8, rows),
                     rng.integers(0, 64, rows)], axis=1).astype(np.int32)
  labels[1] = -1
  return dict(frames=jnp.asarray(frames_for(rows, seed)),
              text_ids=jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
              text_mask=jnp.asarray(text_mask),
              labels=jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32),
              label_mask=jnp.asarray(rng.integers(0, 2, (rows, length)) * text_mask,
                                     jnp.float32),
              class_labels=jnp.asarray(labels))


def sgd_step(cfg, params, batch, accum=1):
  """One SGD (lr 1) step of the trainer's train step: (new state, metrics)."""
  model = mashvlm.MashVLM(cfg)
  tx = optax.sgd(1.0)
  trainable = jax.tree_util.tree_map(lambda _: True, params)
  step = jax.jit(trainer.make_train_step(model, tx, optax.constant_schedule(1.0),
                                         accum=accum, trainable=trainable))
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                             nonfinite=jnp.zeros((), jnp.int32))
  return step(state, batch)


def numpy_xent(logits, labels):
  """Mean CE and accuracy over rows with label >= 0 (float64 numpy)."""
  logits = np.asarray(logits, np.float64)
  keep = labels >= 0
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(labels)), np.where(keep, labels, 0)]
  return nll[keep].mean(), (logits.argmax(-1) == labels)[keep].mean()


def test_head_loss_against_numpy_and_accumulation_two_equals_one():
  """loss = LM CE (label tokens) + lambda * sum_h w_h CE_h (labelled rows only), every
  term from the model's logits and heads in float64 numpy; per-head metrics likewise.
  2 microbatches (rows 0, 2 and 1, 3: 2 and 1 labelled rows, unequal label tokens) give
  the same loss, metrics and SGD update."""
  cfg, params = tiny(**LOSS)
  batch = head_batch()
  one, metrics = sgd_step(cfg, params, batch, accum=1)
  logits, heads = forward(cfg, True)({"params": params}, batch["frames"], batch["text_ids"],
                                     batch["text_mask"])
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  labels, weight = np.asarray(batch["labels"]), np.asarray(batch["label_mask"])
  nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  lm = (nll * weight).sum() / weight.sum()
  classes = np.asarray(batch["class_labels"])
  total = lm
  for index, (head, w) in enumerate(zip(HEADS, LOSS["head_weights"])):
    xent, accuracy = numpy_xent(heads[head], classes[:, index])
    total += LOSS["loss_weight"] * w * xent
    assert float(metrics[f"{head}_loss"]) == pytest.approx(xent, rel=1e-5)
    assert float(metrics[f"{head}_accuracy"]) == pytest.approx(accuracy)
  assert float(metrics["lm_loss"]) == pytest.approx(lm, rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(total, rel=1e-5)
  assert float(metrics["labelled_rows"]) == 3
  assert total - lm > 0.1  # the heads' term is not negligible here

  two, metrics_two = sgd_step(cfg, params, batch, accum=2)
  for key in ("loss", "lm_loss", "accuracy") + tuple(f"{h}_loss" for h in HEADS) + tuple(
      f"{h}_accuracy" for h in HEADS):
    np.testing.assert_allclose(metrics_two[key], metrics[key], rtol=1e-6, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                         two.params, one.params)
  for head in HEADS:
    moved = np.abs(one.params["action_token"][f"{head}_head"]["kernel"]
                   - params["action_token"][f"{head}_head"]["kernel"]).max()
    assert moved > 1e-4, head


def test_lambda_zero_gives_the_lm_loss():
  """lambda = 0: the step's loss equals its LM loss exactly, the heads get exactly no
  update, and loss and update equal the LM objective computed on its own (masked_xent
  of the same forward, summed NLL / label tokens, as the trainer always computed it; a
  separately compiled program, so up to float rounding)."""
  cfg, params = tiny(loss_weight=0.0)
  batch = head_batch()
  state, metrics = sgd_step(cfg, params, batch)
  model = mashvlm.MashVLM(cfg)

  def lm(p):
    logits = model.apply({"params": p}, batch["frames"], batch["text_ids"], batch["text_mask"])
    nll, count, _ = trainer.masked_xent(logits, batch["labels"], batch["label_mask"])
    return nll, count

  (nll, count), grads = jax.jit(jax.value_and_grad(lm, has_aux=True))(params)
  want = jax.tree_util.tree_map(lambda p, g: p - g / jnp.maximum(count, 1.0), params, grads)
  assert float(metrics["loss"]) == float(metrics["lm_loss"])
  assert float(metrics["loss"]) == pytest.approx(float(nll / count), rel=1e-6)
  assert float(metrics["verb_loss"]) > 1.0  # the heads' CE is there, weighted by 0
  for path, got in jax.tree_util.tree_leaves_with_path(state.params):
    start = np.asarray(param_map.get_path(params, tuple(k.key for k in path)))
    update = np.asarray(param_map.get_path(want, tuple(k.key for k in path))) - start
    # float32 rounding of two programs: relative to the leaf's largest update
    assert np.abs((np.asarray(got) - start) - update).max() <= 1e-4 * np.abs(update).max() \
        + 1e-7, jax.tree_util.keystr(path)
  for head in HEADS:
    np.testing.assert_array_equal(state.params["action_token"][f"{head}_head"]["kernel"],
                                  params["action_token"][f"{head}_head"]["kernel"])


def test_heads_need_the_token():
  plain = token_config(enabled=False)
  frames, text = frames_for(1), np.zeros((1, 3), np.int32)
  with pytest.raises(ValueError, match="with_heads needs model.action_token.enabled"):
    mashvlm.MashVLM(plain).apply({"params": {}}, frames, text, with_heads=True)


# ------------------------------------------------------------------------------ decoding

PROMPTS = [[5, 9, 13, 7, 30], [11, 40, 3, 22, 8, 17, 19, 2, 25, 6, 12], [33, 4]]
STEPS = 4


def test_cached_generation_with_the_token_equals_a_recompute():
  """Greedy decoding through the KV cache (prefill of P = M + N + 1 prefix tokens and the
  prompt, then one step per token), in both decode loops, equals the full forward of the
  grown rows at every step; with RVE (its last-token rows after the P-token prefix) the
  enhanced full forward with ``rve_from`` at the prompt's last token."""
  from mashvlm_jax.analysis import rve
  cfg, params = tiny(**LOSS)
  frames = frames_for(len(PROMPTS))
  want_tokens, want_logits = recompute_greedy(cfg, params, frames, PROMPTS, STEPS)
  gen = generate.Generator(cfg, params)
  for loop in generate.LOOPS:
    out = gen.generate(frames, PROMPTS, generate.SamplingParams(max_new_tokens=STEPS),
                       return_logits=True, loop=loop)
    assert out.tokens == want_tokens, loop
    np.testing.assert_allclose(out.step_logits, want_logits, atol=1e-4, rtol=1e-4)

  table = np.random.default_rng(0).random((cfg.llm.num_layers, cfg.llm.num_heads))
  record = rve.heads_record(table, cfg, k=1, layers="0", pairs=[])
  option = rve.config_from_heads(record, cfg, alpha=0.1, beta=2.0)
  run = jax.jit(mashvlm.MashVLM(cfg, rve=option).apply)
  rows = [list(p) for p in PROMPTS]
  width = max(map(len, PROMPTS)) + STEPS
  start = np.array([len(p) - 1 for p in PROMPTS], np.int32)
  want = []
  for _ in range(STEPS):
    ids = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
      ids[r, :len(row)] = row
    mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
    logits = np.asarray(run({"params": params}, frames, ids, mask, start))
    last = logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    want.append(last)
    for row, token in zip(rows, last.argmax(-1)):
      row.append(int(token))
  want = np.stack(want, axis=1)
  out = generate.Generator(cfg, params, rve=option).generate(
      frames, PROMPTS, generate.SamplingParams(max_new_tokens=STEPS), return_logits=True)
  assert out.tokens == [r[len(p):] for r, p in zip(rows, PROMPTS)]
  np.testing.assert_allclose(out.step_logits, want, atol=2e-4)
  assert np.abs(want_logits[:, 0] - want[:, 0]).max() > 1e-3  # RVE acted


def test_one_pass_scoring_with_the_token_equals_the_full_forward():
  """Scorer: the shared prefill (video + token, once per clip) and the text as one chunk
  give the full forward's log-probabilities; clips are gathered per row."""
  cfg, params = tiny(**LOSS)
  frames = frames_for(2)
  clips = [1, 0, 1]
  scorer = scoring.Scorer(cfg, params)
  got = scorer.score_rows(frames, clips, PROMPTS, text_len=12)
  ids, mask = generate.pad_prompts(PROMPTS, 0, length=12)
  logits = forward(cfg)({"params": params}, frames[clips], ids, mask)
  logp = np.asarray(jax.nn.log_softmax(logits))
  for row, prompt in enumerate(PROMPTS):
    want = [logp[row, i, prompt[i + 1]] for i in range(len(prompt) - 1)]
    np.testing.assert_allclose(got.token_logprobs[row, :len(prompt) - 1], want, atol=1e-4)
    np.testing.assert_allclose(got.next_logprobs[row], logp[row, len(prompt) - 1], atol=1e-4)


# ------------------------------------------------------------------------------ export

def test_export_torch_and_torch_reference_with_the_token(tmp_path):
  """export-torch writes the token and heads (the name table covers each leaf once) and
  the PyTorch reference gives the JAX logits and head logits (tolerance of
  test_torch_reference.py)."""
  from conftest import require
  require("torch")
  from mashvlm_jax import torch_reference
  from mashvlm_jax.convert import params_io, torch_export
  from test_torch_reference import inputs, random_params
  cfg = tiny(**LOSS)[0]
  params = random_params(cfg)
  tensors = param_map.plan("action_token", params["action_token"])
  assert sorted(t.hf for t in tensors) == ["action_head.weight", "embedding",
                                           "noun_head.weight", "verb_head.weight"]
  assert {t.hf: t.hf_shape for t in tensors}["noun_head.weight"] == (8, cfg.llm.hidden_size)
  params_io.save_params(tmp_path / "ckpt", params, cfg)
  loaded, _ = params_io.load_params(tmp_path / "ckpt")
  out = torch_export.export_torch(loaded, cfg, tmp_path / "export")
  config = json.loads((out / torch_export.MASH_CONFIG).read_text())
  assert config["files"]["action_token"] == torch_export.ACTION_TOKEN_FILE
  assert "[action 1]" in config["token_split"]["sequence"]
  frames, text, mask = inputs(cfg)
  want_logits, want_heads = forward(cfg, True)({"params": params}, frames, text, mask)
  reference = torch_reference.load(out)
  logits, heads = reference.forward(frames, text, mask)
  assert np.abs(logits.numpy() - np.asarray(want_logits))[mask].max() <= 1e-4
  np.testing.assert_array_equal(reference.logits(frames, text, mask).numpy(), logits.numpy())
  for head in HEADS:
    assert heads[head].shape == want_heads[head].shape
    assert np.abs(heads[head].numpy() - np.asarray(want_heads[head])).max() <= 1e-4, head
  assert np.abs(np.asarray(want_heads["action"])).max() > 1e-2  # not all zero
  # a model without the token exports no token file and its reference returns no heads
  plain = dataclasses.replace(cfg, action_token=dataclasses.replace(cfg.action_token,
                                                                    enabled=False))
  bare = {k: v for k, v in loaded.items() if k != "action_token"}
  out = torch_export.export_torch(bare, plain, tmp_path / "plain")
  assert not (out / torch_export.ACTION_TOKEN_FILE).exists()
  assert torch_reference.load(out).forward(frames, text, mask)[1] == {}


# ------------------------------------------------------------------------------ data, train

def test_record_class_labels_rules():
  """Synthetic: tasks/mqa.clip_labels of action and scene, -1s for a scene-only clip;
  a record's own class_labels field wins; users' records without one get -1s."""
  from mashvlm_jax.data import pipeline
  from mashvlm_jax.data.tasks import mqa
  clip = {"id": "a", "action": "running", "scene": "beach"}
  want = mqa.clip_labels("running", "beach")
  verb, noun = mqa.VERBS.index("running"), mqa.NOUNS.index("beach")
  assert want == (verb, noun, verb * 8 + noun)
  np.testing.assert_array_equal(pipeline.record_class_labels({}, clip, True), want)
  scene_only = dict(clip, action="")
  np.testing.assert_array_equal(pipeline.record_class_labels({}, scene_only, True), [-1] * 3)
  np.testing.assert_array_equal(pipeline.record_class_labels({}, clip, False), [-1] * 3)
  own = {"class_labels": np.array([3, 7, 40])}
  np.testing.assert_array_equal(pipeline.record_class_labels(own, clip, False), [3, 7, 40])
  for bad in ([1, 2], [1.5, 2, 3], [0, -2, 1]):
    with pytest.raises(ValueError, match="'a': class_labels must be 3 integer"):
      pipeline.record_class_labels({"class_labels": np.array(bad)}, clip, False)
  with pytest.raises(ValueError, match="unknown synthetic action 'flying'"):
    pipeline.record_class_labels({}, dict(clip, action="flying"), True)


def cli(cwd, command, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("MASHVLM_DATA_DIR", None)  # the config's ./data_cache, under cwd
  env.pop("PYTEST_CURRENT_TEST", None)
  return subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", command, *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # make-data and a 3-step CLI run / a train-step compile
def test_pipeline_labels_and_a_short_training_run_log_the_heads(tmp_path):
  """On the tiny synthetic set with the token enabled: every batch row's class_labels are
  its clip's (verb, noun, action); `mashvlm train` (relative paths) logs the heads' losses
  and accuracies, and the logged loss is lm_loss + 0.05 (0.5 verb + 0.5 noun + 0.1
  action)."""
  import shutil
  from mashvlm_jax.data import pipeline, registry
  from mashvlm_jax.data.tasks import mqa
  (tmp_path / "configs").mkdir()
  shutil.copy(ROOT / "configs" / "tiny_synthetic.py", tmp_path / "configs")
  flags = ["--config=configs/tiny_synthetic.py", "--config.data.builder_config=tiny",
           "--config.model.action_token.enabled=True"]
  out = cli(tmp_path, "make-data", *flags)
  assert out.returncode == 0, out.stderr[-3000:]

  config = load_config("tiny_synthetic")
  config.data.update(builder_config="tiny", data_dir=str(tmp_path / "data_cache"))
  config.model.action_token.enabled = True
  transform = pipeline.example_transform(config, "train")
  source = registry.data_source(config, "train")
  rng = np.random.default_rng(0)
  for index in range(min(len(source), 12)):
    raw = source[index]
    record = pipeline.decode_record(raw)
    labels = mqa.clip_labels(record["action"], record["scene"])
    want = [-1, -1, -1] if labels is None else list(labels)
    np.testing.assert_array_equal(transform(raw, rng)["class_labels"], want)
  batch = next(pipeline.make_iterator(config, "train", process_index=0, process_count=1))
  assert batch["class_labels"].dtype == np.int32
  assert batch["class_labels"].shape == (config.data.batch_size, 3)
  assert set(pipeline.batch_keys(True)) <= set(batch)

  out = cli(tmp_path, "train", *flags, "--workdir=run", "--config.total_steps=3",
            "--config.log_every=1", "--config.checkpoint_every=3",
            "--config.data.batch_size=4", "--config.data.text_len=24")
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
          .splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    for head in HEADS:
      assert 0.0 <= row[f"{head}_accuracy"] <= 1.0 and row[f"{head}_loss"] > 0
    assert 1 <= row["labelled_rows"] <= 4
    heads = 0.5 * row["verb_loss"] + 0.5 * row["noun_loss"] + 0.1 * row["action_loss"]
    assert row["loss"] == pytest.approx(row["lm_loss"] + 0.05 * heads, rel=1e-5)
  stored = json.loads((tmp_path / "run" / "model_config.json").read_text())
  assert stored["action_token"]["enabled"] is True


@pytest.mark.slow  # make-data and a 3-step CLI run / a train-step compile
def test_compile_check_lowers_the_step_with_class_labels():
  """`mashvlm compile`'s check builds the batch contract with class_labels [B, 3] and
  compiles the train step with the heads' loss (a 1-chip slice on the CPU device)."""
  from mashvlm_jax.train import compile_check
  config = load_config("tiny_synthetic")
  config.model.action_token.enabled = True
  config.data.update(batch_size=2, text_len=16)
  report = compile_check.check(config, "v6e-1", attention_backend="dense",
                               mesh={"data": 1}, devices=jax.devices()[:1])
  m, n = ModelConfig.from_dict(config.model).video_token_counts
  assert report.seq_len == m + n + 1 + 16
  assert report.error is None and report.memory.total > 0


def test_captured_attention_of_the_token_row():
  """The model's own attention probabilities (eval/plots.py capture, types with the token
  as text): the token's row puts all its weight on the video keys and itself, none on
  the text; the text rows attend to the token; `mashvlm info` names it."""
  from mashvlm_jax.commands import info
  from mashvlm_jax.eval import plots
  cfg, params = tiny(**LOSS)
  m, n = cfg.video_token_counts
  probs, types = plots.attention_probs(cfg, params, frames_for(1)[0], PROMPTS[0])
  assert probs.shape[-1] == types.shape[0] == cfg.prefix_len + len(PROMPTS[0])
  assert types[m + n] == layout.TEXT
  token = probs[:, m + n]  # [layers, S]
  np.testing.assert_allclose(token[:, :m + n + 1].sum(-1), 1.0, atol=1e-5)
  assert token[:, m + n + 1:].max() == 0.0
  assert probs[:, m + n + 1:, m + n].min() > 0.0
  assert f"action token at {m + n}" in info.describe_layout(cfg)
