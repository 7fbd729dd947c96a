"""Likelihood scoring with shared video caches equals the full forward of each row; the
attention capture sums to one, respects DST and leaves the logits unchanged; plot PNG."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from mashvlm_jax import layout
from mashvlm_jax.eval import plots, scoring
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from conftest import load_config


@pytest.fixture(scope="module")
def tiny():
  """Tiny config at 32x32 (M=23, N=16), 2 decoder layers, random weights, 2 videos."""
  config = load_config("tiny_synthetic")
  config.model.vision.image_size = 32
  config.model.llm.num_layers = 2
  cfg = ModelConfig.from_dict(config.model)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(2)))
  frames = np.random.default_rng(0).integers(0, 256, (2, 8, 32, 32, 3)).astype(np.uint8)
  return cfg, params, frames


def full_logprobs(cfg, params, frames, texts):
  """log-softmax of the full forward of each [video][text] row, [len(text), vocab] per
  row (one right-padded batch; padding leaves the real positions' logits unchanged)."""
  width = max(map(len, texts))
  ids = np.zeros((len(texts), width), np.int32)
  for row, text in enumerate(texts):
    ids[row, :len(text)] = text
  mask = np.arange(width)[None] < np.array([len(t) for t in texts])[:, None]
  logits = jax.jit(mashvlm.MashVLM(cfg).apply)({"params": params}, frames, ids, mask)
  logp = np.asarray(jax.nn.log_softmax(logits))
  return [logp[row, :len(text)] for row, text in enumerate(texts)]


def test_scores_equal_full_forward_per_row(tiny):
  cfg, params, frames = tiny
  rng = np.random.default_rng(1)
  texts = [list(rng.integers(4, 512, size=n)) for n in (6, 3, 9, 5, 2)]
  clips = [0, 0, 1, 1, 0]
  scores = scoring.Scorer(cfg, params).score_rows(frames, clips, texts)
  reference = full_logprobs(cfg, params, frames[clips], texts)
  for row, (text, want) in enumerate(zip(texts, reference)):
    np.testing.assert_allclose(scores.next_logprobs[row], want[-1], atol=1e-5)
    got = scores.token_logprobs[row, :len(text) - 1]
    np.testing.assert_allclose(got, want[np.arange(len(text) - 1), text[1:]], atol=1e-5)


def test_answer_logprobs_and_yes_probability(tiny):
  cfg, params, frames = tiny
  scorer = scoring.Scorer(cfg, params)
  prompts, answers, clips = [[2, 10, 11], [2, 12]], [[20, 21], [30]], [1, 0]
  got = scorer.answer_logprobs(frames, clips, prompts, answers)
  full = full_logprobs(cfg, params, frames[clips + clips],
                       [p + a for p, a in zip(prompts, answers)] + prompts)
  for row in range(2):
    want = full[row]
    n = len(prompts[row])
    expected = sum(want[n - 1 + k, tok] for k, tok in enumerate(answers[row]))
    assert got[row] == pytest.approx(expected, abs=1e-4)
  probs = scorer.yes_probability(frames, clips, prompts, yes_id=7, no_id=8)
  for row in range(2):
    last = full[2 + row][-1]
    assert probs["p_yes"][row] == pytest.approx(np.exp(last[7]), rel=1e-4)
    ratio = np.exp(last[7]) / (np.exp(last[7]) + np.exp(last[8]))
    assert probs["p_yes_vs_no"][row] == pytest.approx(ratio, rel=1e-4)
  with pytest.raises(ValueError, match="clip_index"):
    scorer.score_rows(frames, [0, 2], prompts)


def test_attention_capture_and_plot(tiny, tmp_path):
  cfg, params, frames = tiny
  text = [2, 40, 41, 42, 43]
  probs, types = plots.attention_probs(cfg, params, frames[0], text)
  m, n = cfg.video_token_counts
  assert probs.shape == (cfg.llm.num_layers, m + n + 5, m + n + 5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # DST: spatial queries put no weight on temporal keys, and nobody looks ahead at text
  assert probs[:, m:m + n, :m].max() < 1e-6
  assert probs[:, :m + n, m + n:].max() < 1e-6
  mass = plots.attention_mass(probs, types)
  total = mass["spatial"] + mass["temporal"] + mass["text"]
  np.testing.assert_allclose(total, 1.0, atol=1e-5)
  last = plots.attention_mass(probs, types, "last")
  np.testing.assert_allclose(last["spatial"], probs[:, -1, m:m + n].sum(-1), atol=1e-6)
  # capturing does not change what the model computes
  plain = jax.jit(mashvlm.MashVLM(cfg).apply)({"params": params}, frames[:1], np.asarray([text]))
  captured, _ = jax.jit(lambda p, f, t: mashvlm.MashVLM(cfg, capture_attention=True).apply(
      {"params": p}, f, t, mutable=["intermediates"]))(params, frames[:1], np.asarray([text]))
  np.testing.assert_array_equal(plain, captured)
  path = plots.plot_mass({"random": mass, "again": last}, tmp_path / "attention.png",
                         "Is the person skiing?")
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
  assert layout.TYPE_NAMES[int(types[-1])] == "text"
