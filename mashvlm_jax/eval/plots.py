"""Where text looks (paper Fig. 6): the attention mass that text queries put on the
spatial and on the temporal tokens, per decoder layer, as a PNG.

The model runs once with ``capture_attention=True`` (each layer sows its head-averaged
softmax weights [B, S, S]); the mass of a text query on a block is the sum of its weights
over that block's keys, averaged over the chosen text queries.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig

QUERY_MODES = ("all", "last")


def attention_probs(cfg: ModelConfig, params, frames, text_ids):
  """float32 [layers, S, S] head-averaged attention weights of one row, and its types
  int[S]. frames uint8 [T, H, W, 3]; text_ids: list of token ids (no padding)."""
  cfg = dataclasses.replace(cfg, remat_policy="none", attention_backend="dense")
  model = mashvlm.MashVLM(cfg, capture_attention=True)
  ids = jnp.asarray([list(text_ids)], jnp.int32)

  @jax.jit
  def run(p, f, t):
    _, state = model.apply({"params": p}, f, t, mutable=["intermediates"])
    return state["intermediates"]["language_model"]["layers"]["self_attn"]["attention_probs"][0]

  probs = run(params, jnp.asarray(frames)[None], ids)[:, 0]
  m, n = cfg.video_token_counts
  # text part: the action token (typed as text) when enabled, then the text
  types = layout.token_types(m, n, cfg.prefix_len - m - n + ids.shape[1])
  return np.asarray(probs), types


def attention_mass(probs: np.ndarray, types: np.ndarray, queries: str = "all") -> dict:
  """{"spatial", "temporal", "text"}: float [layers] mass of text queries on each block.

  queries "all": every text token; "last": the last one (the token that is answered).
  """
  if queries not in QUERY_MODES:
    raise ValueError(f"queries must be one of {QUERY_MODES}, found {queries!r}")
  text = np.flatnonzero(types == layout.TEXT)
  if text.size == 0:
    raise ValueError("the sequence has no text tokens to take attention from")
  rows = text[-1:] if queries == "last" else text
  picked = probs[:, rows, :]  # [layers, Q, S]
  mass = lambda kind: picked[..., types == kind].sum(-1).mean(-1)  # noqa: E731
  return {"spatial": mass(layout.SPATIAL), "temporal": mass(layout.TEMPORAL),
          "text": mass(layout.TEXT)}


def plot_mass(masses: dict[str, dict], path, title: str = "") -> str:
  """Grouped bars per layer (spatial, temporal) for one or more models -> PNG at path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(masses)
  fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), dpi=120,
                           squeeze=False, sharey=True)
  for ax, name in zip(axes[0], names):
    mass = masses[name]
    layers = np.arange(len(mass["spatial"]))
    ax.bar(layers - 0.2, mass["spatial"], width=0.4, label="text -> spatial")
    ax.bar(layers + 0.2, mass["temporal"], width=0.4, label="text -> temporal")
    ax.set_xticks(layers, [str(i + 1) for i in layers])
    ax.set_xlabel("decoder layer")
    ax.set_title(name, fontsize=9)
  axes[0][0].set_ylabel("attention mass")
  axes[0][0].set_ylim(0, 1)
  axes[0][-1].legend(fontsize=8)
  return save_figure(fig, path, title)


def save_figure(fig, path, title: str = "") -> str:
  """Writes a matplotlib figure (with ``title`` as its suptitle) to ``path`` as laid out
  by tight_layout, closes it, and returns the path (the project's plots share this)."""
  import matplotlib.pyplot as plt
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(str(path))
  plt.close(fig)
  return str(path)
