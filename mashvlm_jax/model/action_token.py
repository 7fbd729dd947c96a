"""LLaVAction's action token (paper Sec. 3.2, "vision supervision"; issue 18).

One learnable embedding [D] sits right after the video block, typed as text
(``layout.TEXT``): text is causal over every non-pad key, so the token sees all M + N
video tokens and, coming before the text, no text; no video query sees it (video never
sees text). Every row is ``[temporal M][spatial N][action 1][text L]``, the prefix is
M + N + 1 on every path (training, scoring, KV-cache decoding, RVE).

Three bias-free linear heads on the token's final normalised hidden state predict the
verb, noun and action classes. The training objective is
  L = L_LM + lambda * (w_v CE_v + w_n CE_n + w_a CE_a),
each CE averaged over the labelled rows of the global batch (class label -1: no label,
e.g. a scene-only clip, counted in no head).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mashvlm_jax.model.config import ActionTokenConfig
from mashvlm_jax.model.llm import partitioned

HEADS = ("verb", "noun", "action")
_INIT = nn.initializers.normal(stddev=0.02)


class ActionToken(nn.Module):
  """The token's embedding and its three heads (parameters ``embedding`` [D],
  ``{verb,noun,action}_head/kernel`` [D, classes])."""
  cfg: ActionTokenConfig
  hidden_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param("embedding", partitioned(_INIT, ("embed",)),
                                (self.hidden_size,), self.param_dtype)
    self.heads = [nn.Dense(size, use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype,
                           kernel_init=partitioned(_INIT, ("embed", None)),
                           name=f"{head}_head")
                  for head, size in zip(HEADS, self.cfg.num_classes)]

  def embeds(self, batch: int):
    """[B, 1, D]: the token's input embedding for ``batch`` rows, in the compute dtype."""
    return jnp.broadcast_to(self.embedding.astype(self.dtype), (batch, 1, self.hidden_size))

  def __call__(self, hidden):
    """Final-normed hidden state of the token [B, D] -> {head: float32 logits [B, C]}."""
    return {head: layer(hidden).astype(jnp.float32) for head, layer in zip(HEADS, self.heads)}


def head_xent(head_logits: dict, class_labels):
  """Per-head sums over labelled rows: {head: (sum of CE, labelled rows, correct rows)}.

  ``head_logits``: {head: float[B, C]}; ``class_labels`` int[B, 3] (verb, noun, action),
  -1 where a row has no label (it counts in no head).
  """
  out = {}
  for index, head in enumerate(HEADS):
    logits = head_logits[head].astype(jnp.float32)
    labels = class_labels[:, index]
    labelled = labels >= 0
    safe = jnp.where(labelled, labels, 0)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[:, None], axis=-1)[:, 0]
    weight = labelled.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
    out[head] = (jnp.sum(nll * weight), jnp.sum(weight), jnp.sum(correct * weight))
  return out


def weighted_head_sum(cfg: ActionTokenConfig, sums: dict):
  """sum_h w_h * (sum of CE_h): the heads' term before division by the labelled rows."""
  return sum(w * sums[head][0] for w, head in zip(cfg.head_weights, HEADS))
