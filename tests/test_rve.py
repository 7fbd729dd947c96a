"""RVE (analysis/rve.py): the Action Relation Score, head sets, target mask and enhanced
logits on hand-computed cases; the enhancement inside the dense attention path against a
numpy reference and a hand-built one-layer attention; off-switches (beta=0, m=0, layers
outside the set) leave outputs bit for bit; enhanced KV-cache generation and scoring equal
an enhanced full recompute; head scoring ranks the only head with queries top; the heads
file's checks; `mashvlm rve-heads` and `mashvlm eval --rve` end to end with relative
paths."""
import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, run_cli
from mashvlm_jax import layout
from mashvlm_jax.analysis import rve, rve_heads
from mashvlm_jax.eval import common, generate, scoring
from mashvlm_jax.model import attention, llm, mashvlm
from mashvlm_jax.model.config import LlamaConfig, ModelConfig
from test_eval_values import sharpened, tiny_eval_config


# ------------------------------------------------------------------------------ the maths

def test_ars_of_hand_made_rows():
  same = np.array([0.2, 0.5, 0.3])
  assert rve.ars(same, same.copy()) == 0.0
  # disjoint rows of equal norm: ||a - â|| = sqrt(2), ½(1 + 1) = 1
  assert rve.ars(np.array([1.0, 0, 0]), np.array([0, 1.0, 0])) == pytest.approx(np.sqrt(2))
  # ||(3, 4) - 0|| = 5 over ½(5 + 0): 2; both rows zero: 0 (no division by zero)
  assert rve.ars(np.array([3.0, 4.0]), np.zeros(2)) == pytest.approx(2.0)
  assert rve.ars(np.zeros(2), np.zeros(2)) == 0.0
  # per [layers, heads] over the last axis, numpy or jax alike
  a = np.random.default_rng(0).random((3, 4, 5))
  b = np.random.default_rng(1).random((3, 4, 5))
  want = np.array([[np.linalg.norm(a[l, h] - b[l, h])
                    / (0.5 * (np.linalg.norm(a[l, h]) + np.linalg.norm(b[l, h])))
                    for h in range(4)] for l in range(3)])
  np.testing.assert_allclose(rve.ars(a, b), want, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(rve.ars(jnp.asarray(a), jnp.asarray(b))), want,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="one shape"):
    rve.ars(a, b[..., :4])


def test_select_heads_top_and_bottom_k_disjoint():
  table = np.array([[0.1, 0.9, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0]])
  sens, non = rve.select_heads(table, 2)
  assert sens.tolist() == [[1, 2], [0, 1]]
  assert non.tolist() == [[0, 3], [3, 2]]  # ties: still disjoint from the top set
  sens, non = rve.select_heads(jnp.asarray(table), 1)
  assert np.asarray(sens).tolist() == [[1], [0]] and np.asarray(non).tolist() == [[0], [3]]
  with pytest.raises(ValueError, match="2K <= heads"):
    rve.select_heads(table, 3)
  assert rve.middle_layers(4) == (1, 2) and rve.middle_layers(32) == tuple(range(8, 24))
  assert rve.auto_layers(np.array([[0.1], [0.4], [0.3], [0.2], [0.0]])) == (1, 2, 3)
  assert rve.default_k(4) == 1 and rve.default_k(32) == 5
  assert rve.num_selected(0.05, 87) == 4 and rve.num_selected(0.1, 30) == 3


# Two heads, four visual keys; head 0 sensitive (K=1), head 1 insensitive, m=2, beta=1.
SCORES = np.array([[3.0, 1.0, 2.0, -1.0],
                   [-2.0, 5.0, 4.0, 1.0]])
# M_enh: head 0's top 2 = keys {0, 2}; M_den: head 1's top 2 = keys {1, 2};
# M_target = {0}; S + |S| there: 3 -> 6 (head 0), -2 -> 0 (head 1).
ENHANCED_GLOBAL = np.array([[6.0, 1.0, 2.0, -1.0], [0.0, 5.0, 4.0, 1.0]])
ENHANCED_SENSITIVE = np.array([[6.0, 1.0, 2.0, -1.0], [-2.0, 5.0, 4.0, 1.0]])
# without the denoising mask the target is M_enh = {0, 2}: 2 -> 4, 4 -> 8
ENHANCED_NO_DENOISE = np.array([[6.0, 1.0, 4.0, -1.0], [0.0, 5.0, 8.0, 1.0]])


def test_hand_computed_target_mask_and_enhancement():
  sens, non = np.array([0]), np.array([1])
  target = rve.target_mask(SCORES, sens, non, 2)
  assert target.tolist() == [True, False, False, False]
  np.testing.assert_array_equal(rve.enhance_logits(SCORES, target, 1.0), ENHANCED_GLOBAL)
  np.testing.assert_array_equal(
      rve.enhance_logits(SCORES, target, 1.0, heads=np.array([True, False])),
      ENHANCED_SENSITIVE)
  loose = rve.target_mask(SCORES, sens, None, 2)
  assert loose.tolist() == [True, False, True, False]
  np.testing.assert_array_equal(rve.enhance_logits(SCORES, loose, 1.0), ENHANCED_NO_DENOISE)
  assert not rve.target_mask(SCORES, sens, non, 0).any()
  # ties at the m-th value keep every tied key (">= the m-th largest")
  assert rve.target_mask(np.array([[1.0, 1.0, 0.0]]), np.array([0]), None, 1).tolist() == [
      True, True, False]
  traced = jax.jit(lambda s: rve.target_mask(s, jnp.array([0]), jnp.array([1]), 2))(SCORES)
  assert np.asarray(traced).tolist() == target.tolist()


def one_layer_option(**kwargs):
  base = dict(sensitive=((0,),), insensitive=((1,),), layers=(0,), visual_keys=(0, 4),
              num_heads=2, alpha=0.5, beta=1.0)
  return rve.RveConfig(**dict(base, **kwargs))


def one_layer_attention(option):
  """An attention layer (2 query heads sharing 1 kv head, head dim 4, hidden 8) whose last
  row's logits over 4 visual keys are SCORES, whose value at visual key j is e_j (so the
  output of head h holds its softmax weights on the visual keys) and whose own key is 0.
  Returns (module, params, inputs x [1, 5, 8], angles, mask [1, 5, 5])."""
  cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=4)
  wq, wk, wv, wo = (np.zeros((8, 2, 4)), np.zeros((8, 1, 4)), np.zeros((8, 1, 4)),
                    np.zeros((2, 4, 8)))
  wq[4] = SCORES  # the last token (x = e_4) asks SCORES[h]
  for j in range(4):
    wk[j, 0, j] = 2.0  # k_j = 2 e_j: q.k_j / sqrt(4) = SCORES[h, j]
    wv[j, 0, j] = 1.0
  for h in range(2):
    wo[h, np.arange(4), 4 * h + np.arange(4)] = 1.0
  params = {name: {"kernel": jnp.asarray(w, jnp.float32)} for name, w in
            (("q_proj", wq), ("k_proj", wk), ("v_proj", wv), ("o_proj", wo))}
  types = np.array([[layout.TEMPORAL] + [layout.SPATIAL] * 3 + [layout.TEXT]])
  x = jnp.asarray(np.eye(5, 8)[None], jnp.float32)
  return (llm.Attention(cfg, rve=option), params, x, jnp.zeros((1, 5, 2)),
          jnp.asarray(layout.dst_mask(types)))


def softmax_weights_on_visual(logits_on_visual):
  """Per head: softmax over [4 visual keys, own key (logit 0)], the visual part."""
  full = np.concatenate([logits_on_visual, np.zeros((len(logits_on_visual), 1))], axis=1)
  e = np.exp(full - full.max(1, keepdims=True))
  return (e / e.sum(1, keepdims=True))[:, :4].reshape(-1)


@pytest.mark.parametrize("kwargs,enhanced", [
    ({}, ENHANCED_GLOBAL), ({"scope": "sensitive"}, ENHANCED_SENSITIVE),
    ({"denoise": False}, ENHANCED_NO_DENOISE)])
def test_one_layer_attention_applies_the_hand_computed_enhancement(kwargs, enhanced):
  module, params, x, angles, mask = one_layer_attention(one_layer_option(**kwargs))
  last_row = jnp.array([[False] * 4 + [True]])
  plain = module.apply({"params": params}, x, angles, mask)
  np.testing.assert_allclose(plain[0, 4], softmax_weights_on_visual(SCORES), rtol=1e-6)
  out = module.apply({"params": params}, x, angles, mask, None, last_row, 0)
  np.testing.assert_allclose(out[0, 4], softmax_weights_on_visual(enhanced), rtol=1e-6)
  np.testing.assert_array_equal(out[0, :4], plain[0, :4])  # other rows untouched
  # the same through the KV-cache path (a traced layer index, as inside the layer scan)
  cached, _ = module.apply({"params": params}, x, angles, mask, jnp.zeros(1, jnp.int32),
                           last_row, jnp.int32(0), mutable=["cache"])
  np.testing.assert_allclose(cached[0, 4], out[0, 4], rtol=1e-6)


def numpy_rve_attention(q, k, v, visible, rows, option, layer):
  """float64 reference: per row and head, scaled logits, RVE at enhanced rows as the
  decided reading states it (top-m by sorting each head-set mean), softmax, weights @ v."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  batch, length, heads, dim = q.shape
  group = heads // k.shape[2]
  start, stop = option.visual_keys
  m = int(np.floor(option.alpha * (stop - start) + 1e-9))
  sens = list(option.sensitive[layer])
  non = list(option.insensitive[layer])
  out = np.zeros_like(q)
  for b in range(batch):
    for i in range(length):
      logits = np.stack([k[b, :, h // group] @ q[b, i, h] / np.sqrt(dim) for h in range(heads)])
      logits[:, ~visible[b, i]] = -np.inf
      if rows[b, i] and layer in option.layers and m > 0:
        s = logits[:, start:stop]
        def top(mean):  # the m largest values, ties at the m-th included
          return mean >= np.sort(mean)[::-1][m - 1]
        target = top(s[sens].mean(0))
        if option.denoise:
          target &= ~top(s[non].mean(0))
        target &= visible[b, i, start:stop]
        scope = sens if option.scope == "sensitive" else range(heads)
        for h in scope:
          s[h, target] += option.beta * np.abs(s[h, target])
      weights = np.exp(logits - logits.max(1, keepdims=True))
      weights /= weights.sum(1, keepdims=True)
      for h in range(heads):
        out[b, i, h] = weights[h] @ v[b, :, h // group]
  return out


@pytest.mark.parametrize("scope,denoise,visual", [
    ("global", True, "all"), ("sensitive", True, "all"), ("global", False, "spatial")])
def test_dense_rve_attention_equals_numpy_reference(scope, denoise, visual):
  rng = np.random.default_rng(3)
  m, n, text, heads, kv, dim = 5, 12, 6, 4, 2, 8
  text_mask = np.arange(text)[None] < np.array([[6], [4]])
  types = layout.text_token_types(text_mask, m, n)
  visible = layout.dst_mask(types)
  length = m + n + text
  q, k, v = (rng.normal(size=(2, length, h, dim)).astype(np.float32) * 2
             for h in (heads, kv, kv))
  rows = np.zeros((2, length), bool)
  rows[0, m + n + 3:] = True  # the last three text rows of row 0
  rows[1, m + n + 3] = True  # the last real text row of row 1
  keys = {"all": (0, m + n), "spatial": (m, m + n)}[visual]
  option = rve.RveConfig(sensitive=((0, 1), (2, 3), (1, 3)), insensitive=((3, 2), (0, 1),
                         (0, 2)), layers=(0, 1), visual_keys=keys, num_heads=heads,
                         alpha=0.25, beta=1.5, scope=scope, denoise=denoise)
  @jax.jit
  def dense(q, k, v, layer):  # the layer index traced, as inside the layer scan
    hook = functools.partial(rve.enhance_attention_logits, rows=jnp.asarray(rows),
                             layer=layer, config=option)
    return attention.dense_attention(q, k, v, visible, hook)

  want = {layer: numpy_rve_attention(q, k, v, visible, rows, option, layer)
          for layer in (1, 2)}  # layer 2 is outside the set
  for layer, expected in want.items():
    np.testing.assert_allclose(dense(q, k, v, jnp.int32(layer)), expected, atol=2e-5)
  plain = numpy_rve_attention(q, k, v, visible, np.zeros_like(rows), option, 1)
  changed = np.abs(want[1] - plain).max(axis=(2, 3)) > 1e-3  # the enhancement is not moot
  assert changed[rows].all() and not changed[~rows].any()


def test_fast_backends_refuse_rve_rather_than_ignore_it():
  q = jnp.zeros((1, 4, 2, 4))
  hook = functools.partial(rve.enhance_attention_logits, rows=jnp.ones((1, 4), bool),
                           layer=0, config=one_layer_option())
  types = np.array([[layout.TEMPORAL] + [layout.SPATIAL] * 3])
  spec = attention.AttentionSpec(1, 3)
  for backend in ("splash", "gpu"):
    mask = attention.attention_mask(types, spec, backend)
    with pytest.raises(ValueError, match="only the dense backend"):
      attention.attend(q, q[:, :, :1], q[:, :, :1], mask, backend=backend, enhance=hook)


# ------------------------------------------------------------------------------ the model

@pytest.fixture(scope="module")
def tiny():
  """The tiny config at 32x32 (M=23, N=16), 2 decoder layers of 4 heads (2 kv heads), a
  64-token vocabulary, sharpened random weights; 3 videos and ragged prompts; an RVE
  option on both layers with K=1."""
  config = tiny_eval_config("unused")
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, size=(3, 8, 32, 32, 3)).astype(np.uint8)
  prompts = [list(rng.integers(4, 64, size=n)) for n in (6, 9, 3)]
  table = rng.random((2, 4))
  record = rve.heads_record(table, cfg, k=1, layers="0,1", pairs=[])
  option = rve.config_from_heads(record, cfg, alpha=0.1, beta=2.0)
  return cfg, params, frames, prompts, option


WIDTH = 13  # every reference row is padded to this (the longest prompt + 4 new tokens)


@functools.lru_cache(maxsize=None)
def forward(cfg, option):
  """The jitted ``MashVLM(cfg, rve=option).apply``, one per option (compiled once)."""
  return jax.jit(mashvlm.MashVLM(cfg, rve=option).apply)


def full_forward(cfg, params, frames, texts, option=None, rve_from=None):
  """MashVLM.__call__ logits float32 [B, WIDTH, vocab] of rows right-padded to WIDTH
  (padding leaves real positions unchanged): the reference."""
  ids = np.zeros((len(texts), WIDTH), np.int32)
  for row, text in enumerate(texts):
    ids[row, :len(text)] = text
  mask = np.arange(WIDTH)[None] < np.array([len(t) for t in texts])[:, None]
  extra = () if rve_from is None else (np.asarray(rve_from, np.int32),)
  return np.asarray(forward(cfg, option)({"params": params}, frames, ids, mask, *extra))


def prefill_state(cfg, params, frames, prompts, option):
  """(text logits, the KV cache per layer) of MashVLM.prefill."""
  ids, mask = generate.pad_prompts(prompts, 0)
  cache_len = sum(cfg.video_token_counts) + ids.shape[1]
  (logits, _, _), state = jax.jit(
      functools.partial(mashvlm.MashVLM(cfg, rve=option).apply, method="prefill",
                        mutable=["cache"]), static_argnums=4)(
      {"params": params}, frames, ids, mask, cache_len)
  cache = state["cache"]["language_model"]["layers"]["self_attn"]
  return np.asarray(logits), {k: np.asarray(v) for k, v in cache.items()}


def test_off_switches_leave_every_output_bit_for_bit(tiny):
  """beta=0 and m=0 equal RVE off exactly; enhancing only the last layer leaves the layer
  outside the set, every cache (keys and values come before the layer's attention) and
  every row but the last-token rows exactly as they were."""
  cfg, params, frames, prompts, option = tiny
  plain_logits, plain_cache = prefill_state(cfg, params, frames, prompts, None)
  for off in (dataclasses.replace(option, beta=0.0),
              dataclasses.replace(option, alpha=0.02)):  # m = floor(0.02 * 39) = 0
    logits, cache = prefill_state(cfg, params, frames, prompts, off)
    np.testing.assert_array_equal(logits, plain_logits)
    for name in cache:
      np.testing.assert_array_equal(cache[name], plain_cache[name])
  last = [len(p) - 1 for p in prompts]
  rows = np.arange(len(prompts))
  logits, cache = prefill_state(cfg, params, frames, prompts,
                                dataclasses.replace(option, layers=(1,)))
  for name in cache:
    np.testing.assert_array_equal(cache[name], plain_cache[name])
  changed = np.abs(logits - plain_logits).max(-1) > 1e-4
  assert changed[rows, last].all()
  changed[rows, last] = False
  assert not changed.any()


def test_enhanced_generation_equals_enhanced_full_recompute(tiny):
  """Greedy decoding with RVE (the prompt's last token enhanced at the prefill, each new
  token at its step, through the KV cache) equals the full forward of the grown rows with
  every row from the prompt's last token on enhanced; and RVE changes the logits."""
  cfg, params, frames, prompts, option = tiny
  steps = 4
  rows = [list(p) for p in prompts]
  want = []
  for _ in range(steps):
    logits = full_forward(cfg, params, frames, rows, option, [len(p) - 1 for p in prompts])
    last = logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    want.append(last)
    for row, token in zip(rows, last.argmax(-1)):
      row.append(int(token))
  want = np.stack(want, axis=1)
  # the default Generator: prefill through the layer scan (traced layer index), decode
  # steps with per-layer weights (static index) in the device loop; the scanned decode
  # step (MashVLM.extend) is the Scorer's path, checked below
  gen = generate.Generator(cfg, params, rve=option)
  out = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=steps),
                     return_logits=True)
  assert out.tokens == [r[len(p):] for r, p in zip(rows, prompts)]
  np.testing.assert_allclose(out.step_logits, want, atol=2e-4)
  plain = full_forward(cfg, params, frames, prompts)
  plain = plain[np.arange(len(prompts)), [len(p) - 1 for p in prompts]]
  assert np.abs(plain - want[:, 0]).max() > 1e-2


def test_enhanced_scoring_equals_enhanced_full_forward(tiny):
  """Scorer with RVE (built inside common.attention_enhancement): answer log-likelihoods
  equal the full forward enhanced from the prompt's last token, P(yes) the full forward
  enhanced at the prompt's last token."""
  cfg, params, frames, prompts, option = tiny
  answers = [[10, 11], [12], [13, 14, 15]]
  clips = [2, 0, 1]
  with common.attention_enhancement(option):
    scorer = scoring.Scorer(cfg, params)
  assert scorer.rve is option and scoring.Scorer(cfg, params).rve is None
  got = scorer.answer_logprobs(frames, clips, prompts, answers)
  texts = [p + a for p, a in zip(prompts, answers)]
  logits = full_forward(cfg, params, frames[clips], texts, option,
                        [len(p) - 1 for p in prompts])
  logp = np.asarray(jax.nn.log_softmax(logits))
  want = [sum(logp[r, len(p) - 1 + j, t] for j, t in enumerate(a))
          for r, (p, a) in enumerate(zip(prompts, answers))]
  np.testing.assert_allclose(got, want, atol=2e-4)
  probs = scorer.yes_probability(frames, clips, prompts, yes_id=7, no_id=8)
  last_token = [len(p) - 1 for p in prompts]
  logits = full_forward(cfg, params, frames[clips], prompts, option, last_token)
  last = np.asarray(jax.nn.log_softmax(logits))[np.arange(3), last_token]
  np.testing.assert_allclose(probs["p_yes"], np.exp(last[:, 7]), rtol=1e-3)
  plain = np.asarray(jax.nn.log_softmax(full_forward(cfg, params, frames[clips], prompts)))
  assert np.abs(np.exp(plain[np.arange(3), last_token, 7]) - probs["p_yes"]).max() > 1e-4


def test_head_with_the_only_queries_ranks_top(tiny):
  """Zero query weights in every head but one: the others attend uniformly whatever the
  verb (ARS exactly 0), so that head is the top head of every layer (score_pairs over two
  verb-swapped pairs). The capture through the KV cache equals the full forward's
  per-head attention of the last token."""
  cfg, params, frames, _, _ = tiny
  chosen = 2
  kernel = np.array(params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"])
  keep = np.zeros(kernel.shape[2], bool)
  keep[chosen] = True
  kernel[:, :, ~keep] = 0.0  # [layers, D, heads, d]
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"] = jnp.asarray(kernel)
  capture = rve_heads.HeadAttention(cfg, params)
  words = {"skiing": 30, "climbing": 31, "boxing": 40, "walking": 41}
  prompter = lambda question: [2, 5, 9, words[question.split()[-1][:-1]], 6]  # noqa: E731
  pairs = [{"clip": "a", "verb": "skiing", "swap": "climbing", "frames": frames[0]},
           {"clip": "b", "verb": "boxing", "swap": "walking", "frames": frames[1]}]
  table = rve_heads.score_pairs(capture, prompter, pairs, batch_size=2).mean(0)
  others = np.delete(table, chosen, axis=1)
  assert (others == 0).all() and (table[:, chosen] > 1e-4).all()
  sens, _ = rve.select_heads(table, 1)
  assert sens.ravel().tolist() == [chosen, chosen]
  # the capture (ragged prompts) against the full forward's sown per-head weights (no
  # cache): the last token's row at the visual keys
  texts = [[2, 5, 9, 30, 6], [2, 7, 40, 6]]
  attn = capture(frames[:2], texts)  # [2, layers, heads, V]
  ids = np.array([t + [0] * (5 - len(t)) for t in texts], np.int32)
  mask = np.arange(5)[None] < np.array([[5], [4]])
  _, state = jax.jit(functools.partial(mashvlm.MashVLM(cfg, capture_heads=True).apply,
                                       mutable=["intermediates"]))(
      {"params": params}, frames[:2], ids, mask)
  full = np.asarray(state["intermediates"]["language_model"]["layers"]["self_attn"][
      "attention_head_probs"][0])  # [layers, B, heads, S, S]
  m_n = sum(cfg.video_token_counts)
  for row, length in enumerate((5, 4)):
    np.testing.assert_allclose(attn[row], full[:, row, :, m_n + length - 1, :m_n], atol=1e-6)


# ------------------------------------------------------------------------------ heads file

def test_heads_file_roundtrip_overrides_and_rejections(tiny, tmp_path):
  cfg = tiny[0]
  table = np.array([[0.1, 0.4, 0.3, 0.2], [0.5, 0.0, 0.6, 0.1]])
  pairs = [{"clip": "train/000001", "verb": "skiing", "swap": "climbing"}]
  record = rve.heads_record(table, cfg, k=1, layers="middle", pairs=pairs)
  path = rve.write_heads(tmp_path / "heads.json", record)
  read = rve.read_heads(path, cfg)
  assert read["sensitive"] == [[1], [2]] and read["insensitive"] == [[0], [1]]
  assert read["layers"] == [0] and read["pairs"] == pairs  # middle of 2 layers: [0, 1)
  option = rve.load(path, cfg)
  m, n = cfg.video_token_counts
  assert option.visual_keys == (0, m + n) and option.m == 1  # floor(0.05 * 39)
  assert (option.alpha, option.beta, option.scope, option.denoise) == (0.05, 1.0, "global",
                                                                      True)
  wide = rve.load(path, cfg, k=2, layers="auto", alpha=0.2, beta=0.5, scope="sensitive",
                  denoise=False)
  assert wide.sensitive == ((1, 2), (2, 0)) and wide.insensitive == ((0, 3), (1, 3))
  assert wide.layers == (1,) and wide.m == 7 and wide.scope == "sensitive"
  other = dataclasses.replace(cfg, num_frames=4)
  with pytest.raises(ValueError, match="model_config_hash.*another model"):
    rve.read_heads(path, other)
  broken = dict(record, ars=table[:, :3].tolist())
  rve.write_heads(tmp_path / "broken.json", broken)
  with pytest.raises(ValueError, match=r"broken.json: field 'ars' should be \[2 layers\]"
                                       r"\[4 heads\].*found \[2, 3\]"):
    rve.read_heads(tmp_path / "broken.json", cfg)
  with pytest.raises(ValueError, match="layers must be in"):
    rve.load(path, cfg, layers="0,5")
  with pytest.raises(ValueError, match="2K <= heads"):
    rve.load(path, cfg, k=3)
  with pytest.raises(ValueError, match="scope"):
    rve.load(path, cfg, scope="all")
  with pytest.raises(FileNotFoundError, match="mashvlm rve-heads"):
    rve.read_heads(tmp_path / "missing.json", cfg)


# ------------------------------------------------------------------------------ commands


def test_rve_heads_then_eval_with_relative_paths(tiny, tmp_path):
  """In a fresh directory, with the paths a user types: `mashvlm rve-heads` on a random
  checkpoint writes the heads file and heatmap; `mashvlm eval --rve` applies it (its
  P(yes) equals an enhanced Scorer's and differs from the plain one)."""
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.data import pipeline, registry
  cfg, params = tiny[:2]
  config = tiny_eval_config(tmp_path / "data")
  registry.ensure_built(config)
  params_io.save_params(tmp_path / "ckpt", params, cfg)
  overrides = [f"--config={ROOT / 'configs' / 'tiny_synthetic.py'}",
               "--config.model.vision.image_size=32", "--config.model.llm.num_layers=2",
               "--config.model.llm.vocab_size=256", "--config.data.builder_config=tiny",
               "--config.data.train_size=2", "--config.data.test_size=2",
               "--config.data.data_dir=data"]
  out = run_cli("rve-heads", *overrides, "--checkpoint=ckpt", "--pairs=2",
                "--out=heads/rve.json", cwd=tmp_path)
  record = json.loads((tmp_path / "heads" / "rve.json").read_text())
  png = (tmp_path / "heads" / "rve.png").read_bytes()
  assert png[:4] == b"\x89PNG" and len(png) > 5000
  assert np.asarray(record["ars"]).shape == (2, 4) and record["k"] == 1
  assert record["layers"] == [0] and record["checkpoint"] == str(tmp_path / "ckpt")
  train = pipeline.make_eval_records(config, "train")
  assert [p["clip"] for p in record["pairs"]] == [train[i]["id"] for i in range(2)]
  assert all(p["swap"] == rve.CONTRAST_ACTION[p["verb"]] for p in record["pairs"])
  table = np.asarray(record["ars"])
  assert (table > 0).all()  # every head's attention moves with the verb
  assert record["sensitive"] == table.argmax(1)[:, None].tolist()
  assert record["insensitive"] == table.argmin(1)[:, None].tolist()
  assert record["layers_by_mean_ars"] == np.argsort(-table.mean(1)).tolist()
  assert "heatmap:" in out.stdout

  run_cli("eval", *overrides, "--checkpoint=ckpt", "--benchmark=unscene_binary",
          "--mode=likelihood", "--splits=test_unusual", "--max_items=1",
          "--rve=heads/rve.json", "--rve_layers=0,1", "--rve_beta=2", "--out=eval_rve",
          cwd=tmp_path)
  claimed = json.loads((tmp_path / "eval_rve" / "checkpoint.json").read_text())
  assert claimed["rve"]["layers"] == [0, 1] and claimed["rve"]["beta"] == 2.0
  assert claimed["rve"]["heads_file"] == str(tmp_path / "heads" / "rve.json")
  rows = [json.loads(line) for line in open(tmp_path / "eval_rve" / "predictions.jsonl")]
  option = rve.load(tmp_path / "heads" / "rve.json", cfg, layers="0,1", beta=2.0)
  clip = pipeline.make_eval_records(config, "test_unusual")[0]
  prompter = common.Prompter(config)
  prompts = [prompter(r["question"], r["instruction"]) for r in rows]
  yes, no = prompter.token("Yes"), prompter.token("No")
  frames = clip["frames"][None]
  width = max(int(config.data.text_len), max(map(len, prompts)))
  enhanced = scoring.Scorer(cfg, params, prompter.tok.pad_id, rve=option).yes_probability(
      frames, [0] * len(rows), prompts, yes, no, text_len=width)["p_yes_vs_no"]
  plain = scoring.Scorer(cfg, params, prompter.tok.pad_id).yes_probability(
      frames, [0] * len(rows), prompts, yes, no, text_len=width)["p_yes_vs_no"]
  np.testing.assert_allclose([r["p_yes"] for r in rows], enhanced, rtol=1e-4)
  assert np.abs(plain - enhanced).max() > 1e-5
