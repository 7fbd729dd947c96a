"""Sequence layout of MASH-VLM: token types, the two position-id streams and the DST mask.

Every row is ``[temporal M][spatial N][text L][pad]`` (docs/design.md). All functions here are
pure and work on numpy arrays (numpy out) and on jax arrays / tracers (jax out), so the
same definitions serve data pipelines, tests and jitted model code. Trailing axis is the
sequence; any leading batch axes are carried through.

This module is the one home of the mask and the position ids: nothing else builds them.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

TEXT = 0
TEMPORAL = 1
SPATIAL = 2
PAD = 3

TYPE_NAMES = {TEXT: "text", TEMPORAL: "temporal", SPATIAL: "spatial", PAD: "pad"}

ROPE_MODES = ("distinct", "balanced", "harmonic")
RopeMode = Literal["distinct", "balanced", "harmonic"]
ATTENTION_KINDS = ("causal", "bidirectional")
AttentionKind = Literal["causal", "bidirectional"]

NUM_SEGMENTS = 4  # temporal segments of the spatial tokens (paper Sec. 3.1)


def _xp(x):
  """numpy for numpy input, jax.numpy for jax arrays and tracers."""
  if isinstance(x, np.ndarray) or np.isscalar(x):
    return np
  import jax.numpy as jnp  # local: keep this module importable without jax
  return jnp


def video_token_counts(num_frames: int, patch_grid: int | Sequence[int]) -> tuple[int, int]:
  """Returns (M, N): M = 3T-1 temporal tokens, N = grid_h * grid_w spatial tokens.

  Args:
    num_frames: T, frames per video (>= NUM_SEGMENTS, since spatial tokens average 4
      temporal segments).
    patch_grid: patches per side, an int for a square grid or (grid_h, grid_w); both even,
      since each segment's grid is 2x2-average-pooled.
  """
  grid_h, grid_w = (patch_grid, patch_grid) if np.isscalar(patch_grid) else tuple(patch_grid)
  if num_frames < NUM_SEGMENTS:
    raise ValueError(f"num_frames must be >= {NUM_SEGMENTS} (one frame per temporal "
                     f"segment), found {num_frames}")
  if grid_h % 2 or grid_w % 2 or grid_h <= 0 or grid_w <= 0:
    raise ValueError(f"patch grid must be positive and even on both sides for 2x2 pooling, "
                     f"found {grid_h}x{grid_w}")
  return 3 * num_frames - 1, grid_h * grid_w


def token_types(num_temporal: int, num_spatial: int, num_text: int,
                pad_to: int | None = None) -> np.ndarray:
  """int32[S]: TEMPORAL * M, SPATIAL * N, TEXT * L, then PAD up to ``pad_to``."""
  if min(num_temporal, num_spatial, num_text) < 0:
    raise ValueError(f"token counts must be >= 0, found M={num_temporal}, "
                     f"N={num_spatial}, L={num_text}")
  length = num_temporal + num_spatial + num_text
  pad_to = length if pad_to is None else pad_to
  if pad_to < length:
    raise ValueError(f"pad_to={pad_to} is shorter than the sequence M+N+L={length}")
  return np.concatenate([
      np.full(num_temporal, TEMPORAL, np.int32),
      np.full(num_spatial, SPATIAL, np.int32),
      np.full(num_text, TEXT, np.int32),
      np.full(pad_to - length, PAD, np.int32),
  ])


def text_token_types(text_mask, num_temporal: int, num_spatial: int):
  """Types [..., M+N+L] for rows whose text part has validity ``text_mask`` [..., L].

  ``text_mask`` is True for real text tokens and False for padding.
  """
  xp = _xp(text_mask)
  text = xp.where(text_mask, TEXT, PAD).astype(xp.int32)
  batch = text.shape[:-1]
  video = xp.concatenate([xp.full(batch + (num_temporal,), TEMPORAL, xp.int32),
                          xp.full(batch + (num_spatial,), SPATIAL, xp.int32)], axis=-1)
  return xp.concatenate([video, text], axis=-1)


def _rank_within(types, kind, xp):
  """0-based index of each token among the tokens of its own type, [..., S]."""
  is_kind = (types == kind).astype(xp.int32)
  return xp.cumsum(is_kind, axis=-1) - is_kind


def distinct_ids(types):
  """0, 1, ..., S-1 in sequence order (standard RoPE ids, paper eq. (4) minus one)."""
  xp = _xp(types)
  return xp.broadcast_to(xp.arange(types.shape[-1], dtype=xp.int32), types.shape)


def balanced_ids(types):
  """Balanced ids [..., S] (paper eq. (5) minus one, generalised to N < M).

  With V = max(M, N), the temporal and the spatial block are right-aligned to end at id
  V-1 (temporal V-M .. V-1, spatial V-N .. V-1); text continues V, V+1, ...; padding
  continues after the text so its ids stay finite and increasing.
  """
  xp = _xp(types)
  count = lambda kind: xp.sum(types == kind, axis=-1, keepdims=True).astype(xp.int32)
  num_t, num_s, num_x = count(TEMPORAL), count(SPATIAL), count(TEXT)
  top = xp.maximum(num_t, num_s)
  ids = xp.where(types == TEMPORAL, top - num_t + _rank_within(types, TEMPORAL, xp), 0)
  ids = xp.where(types == SPATIAL, top - num_s + _rank_within(types, SPATIAL, xp), ids)
  ids = xp.where(types == TEXT, top + _rank_within(types, TEXT, xp), ids)
  ids = xp.where(types == PAD, top + num_x + _rank_within(types, PAD, xp), ids)
  return ids.astype(xp.int32)


def position_ids(types, mode: RopeMode = "harmonic"):
  """int32[..., 2, S]: row 0 feeds the even rotary pairs, row 1 the odd pairs.

  mode "harmonic" (paper eq. (6)): row 0 balanced, row 1 distinct; "distinct" (standard
  RoPE): both distinct; "balanced": both balanced.
  """
  if mode not in ROPE_MODES:
    raise ValueError(f"rope mode must be one of {ROPE_MODES}, found {mode!r}")
  xp = _xp(types)
  distinct = distinct_ids(types)
  balanced = balanced_ids(types) if mode != "distinct" else distinct
  rows = {"distinct": (distinct, distinct), "balanced": (balanced, balanced),
          "harmonic": (balanced, distinct)}[mode]
  return xp.stack(rows, axis=-2)


def _check_kind(name, value):
  if value not in ATTENTION_KINDS:
    raise ValueError(f"{name} attention must be one of {ATTENTION_KINDS}, found {value!r}")


def dst_mask(types, *, temporal: AttentionKind = "causal",
             spatial: AttentionKind = "bidirectional",
             temporal_sees_spatial: bool = False, spatial_sees_temporal: bool = False):
  """bool[..., S, S]: True where query row q may attend key column k.

  - temporal->temporal: causal (k <= q) or bidirectional, per ``temporal``;
  - spatial->spatial: causal or bidirectional, per ``spatial``;
  - temporal queries -> spatial keys: all visible iff ``temporal_sees_spatial``;
  - spatial queries -> temporal keys: all visible iff ``spatial_sees_temporal``;
  - text queries: causal over every non-pad key; video queries never see text keys
    (text follows the video, so causal order hides it);
  - pad keys are hidden from every non-pad query; a pad query sees only itself, so its
    softmax row is well defined (no NaN).
  DST (paper Sec. 3.3) is the default. Plain causal attention is temporal="causal",
  spatial="causal", temporal_sees_spatial=False, spatial_sees_temporal=True.
  """
  _check_kind("temporal", temporal)
  _check_kind("spatial", spatial)
  xp = _xp(types)
  length = types.shape[-1]
  pos = xp.arange(length)
  causal = pos[None, :] <= pos[:, None]  # [S(q), S(k)]
  q = types[..., :, None]
  k = types[..., None, :]

  def within(kind, how):
    return (q == kind) & (k == kind) & (causal if how == "causal" else True)

  allowed = within(TEMPORAL, temporal) | within(SPATIAL, spatial)
  if temporal_sees_spatial:
    allowed = allowed | ((q == TEMPORAL) & (k == SPATIAL))
  if spatial_sees_temporal:
    allowed = allowed | ((q == SPATIAL) & (k == TEMPORAL))
  allowed = allowed | ((q == TEXT) & (k != PAD) & causal)
  pad_diagonal = (q == PAD) & (k == PAD) & (pos[None, :] == pos[:, None])
  return allowed | pad_diagonal


def plain_causal_switches() -> dict:
  """dst_mask switches under which the mask is ordinary causal attention."""
  return dict(temporal="causal", spatial="causal", temporal_sees_spatial=False,
              spatial_sees_temporal=True)


# ------------------------------------------------------------------------------ decoding

def last_real_index(types):
  """int[...]: sequence index of each row's last non-pad token (-1 for an all-pad row)."""
  xp = _xp(types)
  pos = xp.arange(types.shape[-1])
  return xp.max(xp.where(types != PAD, pos, -1), axis=-1).astype(xp.int32)


def next_position_ids(position_ids, types, steps=0):
  """int[..., 2]: both id streams of the token generated ``steps`` tokens after the last
  real one, i.e. each stream's id of the last non-pad token + 1 + steps.

  ``position_ids`` int[..., 2, S] and ``types`` int[..., S] describe the prompt (the KV
  cache's prefill); ``steps`` is an int or int[...]. Appending text tokens right after
  the last real token, this equals ``position_ids`` of the grown sequence (docs/design.md:
  decoding continues both streams by +1 per generated token).
  """
  xp = _xp(types)
  last = last_real_index(types)
  index = xp.broadcast_to(last[..., None, None], position_ids.shape[:-1] + (1,))
  ids = xp.take_along_axis(position_ids, index, axis=-1)[..., 0]
  return (ids + 1 + xp.asarray(steps, xp.int32)[..., None]).astype(xp.int32)


def text_query_mask(key_types, query_positions):
  """bool[..., Q, S]: the ``dst_mask`` rows of text queries at sequence indices
  ``query_positions`` int[..., Q] over keys of types ``key_types`` int[..., S]: every
  non-pad key at or before the query (text is causal over the whole row). Used for the
  KV-cache steps, where ``key_types`` is the cache's (PAD where nothing is written yet).
  """
  xp = _xp(key_types)
  pos = xp.arange(key_types.shape[-1])
  return (key_types[..., None, :] != PAD) & (pos <= query_positions[..., :, None])
