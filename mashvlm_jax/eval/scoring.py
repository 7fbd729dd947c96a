"""Likelihood scoring, batched: log p(answer | video, prompt) and P("Yes") for yes/no
prompts.

Questions about one video share its video block: no video query attends to text (every
mask of layout.dst_mask), so the video's keys and values are computed once per clip
(``MashVLM.prefill_video``), gathered for each of its questions and the questions' text
runs as one chunk over that cache (``MashVLM.extend`` with ``layout.text_query_mask``).
This equals the full forward of each ``[video][text]`` row (tests/test_eval_scoring.py).

With RVE (``rve=``, or built inside ``common.attention_enhancement``; analysis/rve.py) the
rows generation would enhance are enhanced: from each row's last prompt token on
(``answer_logprobs``) or its last real token (``score_rows`` by default, P(yes)); video
rows never change, so the shared video prefill stays exact.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout
from mashvlm_jax.analysis import rve as rve_lib
from mashvlm_jax.eval import common
from mashvlm_jax.eval.generate import pad_prompts
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig


@dataclasses.dataclass
class RowScores:
  """token_logprobs float32 [R, L-1]: log p(text[i+1] | video, text[:i+1]);
  next_logprobs float32 [R, V]: log-distribution of the token after each row's last real
  token; lengths int [R]."""
  token_logprobs: np.ndarray
  next_logprobs: np.ndarray
  lengths: np.ndarray


class Scorer:
  """Teacher-forced scoring of text rows against shared videos; ``rve``: an
  analysis.rve.RveConfig (default: ``common.active_enhancement()``)."""

  def __init__(self, model_cfg: ModelConfig, params, pad_id: int = 0, rve=None):
    self.cfg = dataclasses.replace(model_cfg, remat_policy="none", attention_backend="dense")
    self.rve = rve if rve is not None else common.active_enhancement()
    if self.rve is not None:
      self.rve.check_model(self.cfg)
    self.model = mashvlm.MashVLM(self.cfg, rve=self.rve)
    self.params = params
    self.pad_id = pad_id
    self.num_temporal, self.num_spatial = self.cfg.video_token_counts
    self.prefix_len = self.cfg.prefix_len  # M + N (+ the action token)
    self._score = jax.jit(self.score_fn)

  def score_fn(self, params, frames, clip_index, text_ids, text_mask, rve_from=None):
    """(token_logp [R, L-1], next_logp [R, V]); ``rve_from`` int[R] (with RVE): the text
    index rows are enhanced from (default: each row's last real token)."""
    m, n, prefix = self.num_temporal, self.num_spatial, self.prefix_len
    rows, text_len = text_ids.shape
    cache_len = prefix + text_len
    _, variables = self.model.apply({"params": params}, frames, cache_len,
                                    method=mashvlm.MashVLM.prefill_video, mutable=["cache"])
    # cache leaves are [layers, clips, cache_len, Hkv, d]: one copy per question
    cache = jax.tree_util.tree_map(lambda c: jnp.take(c, clip_index, axis=1),
                                   variables["cache"])
    # the action token (when enabled) is a real text-typed token before the text
    token = jnp.ones((rows, prefix - m - n), bool)
    types = layout.text_token_types(jnp.concatenate([token, text_mask], axis=1), m, n)
    ids = layout.position_ids(types, self.cfg.rope_mode)[..., prefix:]
    queries = jnp.broadcast_to(prefix + jnp.arange(text_len), (rows, text_len))
    mask = layout.text_query_mask(types, queries)
    start = jnp.full((rows,), prefix, jnp.int32)
    enhanced = None
    if self.rve is not None:
      enhanced = (rve_lib.last_token_rows(text_mask) if rve_from is None
                  else rve_lib.rows_from(text_mask, rve_from))
    logits, _ = self.model.apply({"params": params, "cache": cache}, text_ids, ids, mask,
                                 start, enhanced, method=mashvlm.MashVLM.extend,
                                 mutable=["cache"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp[:, :-1], text_ids[:, 1:, None], axis=-1)[..., 0]
    last = jnp.sum(text_mask, axis=-1) - 1
    next_logp = jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]
    return token_logp, next_logp

  def score_rows(self, frames, clip_index: Sequence[int], texts: Sequence[Sequence[int]],
                 *, text_len: int | None = None, multiple: int = 8,
                 enhance_from: Sequence[int] | None = None) -> RowScores:
    """Scores text rows; row r is about video ``clip_index[r]`` of ``frames`` [C, T, H, W, 3].

    ``text_len`` fixes the padded width (else the longest row rounded up to ``multiple``).
    ``enhance_from`` (with RVE): per row, the text index from which rows are enhanced
    (the prompt's last token); default each row's last real token.
    """
    text_ids, text_mask = pad_prompts(texts, self.pad_id, multiple, text_len)
    clip_index = np.asarray(clip_index, np.int32)
    if clip_index.shape != (len(texts),) or clip_index.min() < 0 or (
        clip_index.max() >= len(frames)):
      raise ValueError(f"clip_index must give one video in [0, {len(frames)}) per text row, "
                       f"found {clip_index.tolist()}")
    inputs = (self.params, np.asarray(frames), clip_index, text_ids, text_mask)
    if self.rve is not None and enhance_from is not None:
      inputs += (np.asarray(enhance_from, np.int32),)
    token_logp, next_logp = self._score(*inputs)
    return RowScores(np.asarray(token_logp), np.asarray(next_logp), text_mask.sum(-1))

  def answer_logprobs(self, frames, clip_index, prompts, answers, **kwargs) -> np.ndarray:
    """float [R]: log p(answer tokens | video, prompt), summed over the answer's tokens.

    ``prompts``/``answers``: token-id lists per row (the answer follows the prompt).
    """
    texts = [list(p) + list(a) for p, a in zip(prompts, answers)]
    if any(len(a) == 0 for a in answers):
      raise ValueError("every answer needs at least one token")
    if self.rve is not None:  # what generating the answer would enhance
      kwargs.setdefault("enhance_from", [len(p) - 1 for p in prompts])
    scores = self.score_rows(frames, clip_index, texts, **kwargs)
    out = np.zeros(len(texts))
    for row, (p, a) in enumerate(zip(prompts, answers)):
      # token_logprobs[i] scores text[i + 1]: the answer is text[len(p):len(p)+len(a)]
      out[row] = scores.token_logprobs[row, len(p) - 1:len(p) + len(a) - 1].sum()
    return out

  def yes_probability(self, frames, clip_index, prompts, yes_id: int, no_id: int,
                      **kwargs) -> dict:
    """For prompts ending where the answer starts: {"p_yes": P(yes token) over the whole
    vocabulary, "p_no": likewise, "p_yes_vs_no": P(yes) / (P(yes) + P(no))}, each [R]."""
    logp = self.score_rows(frames, clip_index, prompts, **kwargs).next_logprobs
    ly, ln = logp[:, yes_id], logp[:, no_id]
    return {"p_yes": np.exp(ly), "p_no": np.exp(ln),
            "p_yes_vs_no": 1.0 / (1.0 + np.exp(ln - ly))}
