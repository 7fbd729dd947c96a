"""DST attention from flash-attention calls (``jax.nn.dot_product_attention``; cuDNN on GPU).

One causal attention over the whole row, with the padded keys cut by per-row lengths, is
already exact for text queries (causal over every real key) and for every video query whose
DST row equals the causal row. The other video rows are recomputed by a second, smaller
attention over the keys their mask allows and written over those rows:
- spatial rows (bidirectional under DST): over the spatial keys, plus the temporal keys when
  ``spatial_sees_temporal``;
- temporal rows only when temporal attention is bidirectional or ``temporal_sees_spatial``.
Which rows need it, over which keys and with which mask is read off ``layout.dst_mask`` of
the video prefix, so the decomposition follows the one definition of the mask. Pad query
rows are set to their own value (a pad query sees only itself in ``layout.dst_mask``).

Text must be right-padded (DESIGN.md): real keys of a row are its first ``#non-pad``
positions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout

FAST_DTYPES = (jnp.bfloat16, jnp.float16)  # dtypes cuDNN flash attention supports


def default_implementation(dtype) -> str:
  """"cudnn" on a GPU for bf16/fp16, else "xla" (CPU, TPU, float32)."""
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and any(dtype == d for d in FAST_DTYPES) else "xla"


def video_mask(spec) -> np.ndarray:
  """bool[M+N, M+N]: ``layout.dst_mask`` of the video prefix; checks that video queries
  never see text (the premise of the decomposition)."""
  types = layout.token_types(spec.num_temporal, spec.num_spatial, 1)
  full = layout.dst_mask(types, **spec.switches())
  if full[:spec.num_video, spec.num_video:].any():
    raise ValueError("gpu attention: video queries see text keys under mask switches "
                     f"{spec.switches()}; the causal + video-recompute decomposition does "
                     "not cover that, use the dense or splash backend")
  return full[:spec.num_video, :spec.num_video]


@functools.lru_cache(maxsize=64)
def recompute_plan(spec) -> tuple[tuple[int, int, int, int, str | np.ndarray | None], ...]:
  """Rows whose DST mask is not causal: (q_start, q_end, k_start, k_end, how), how being
  None (all keys), "causal" (square causal) or a bool[q, k] mask."""
  mask = video_mask(spec)
  causal = np.tril(np.ones_like(mask))
  plan = []
  bounds = ((0, spec.num_temporal), (spec.num_temporal, spec.num_video))
  for q0, q1 in bounds:
    rows = mask[q0:q1]
    if q1 == q0 or (rows == causal[q0:q1]).all():
      continue
    keys = np.flatnonzero(rows.any(axis=0))
    k0, k1 = int(keys[0]), int(keys[-1]) + 1
    sub = rows[:, k0:k1]
    if sub.all():
      how = None
    elif (q0, q1) == (k0, k1) and (sub == causal[q0:q1, k0:k1]).all():
      how = "causal"
    else:
      how = sub
    plan.append((q0, q1, k0, k1, how))
  return tuple(plan)


def dst_flash_attention(q, k, v, types, spec, *, implementation=None):
  """DST attention; equals ``dense_attention`` with ``layout.dst_mask``.

  Args:
    q: [B, S, Hq, D] queries (already rotated); k, v: [B, S, Hkv, D], Hq % Hkv == 0.
    types: int32[B, S], the video prefix of ``spec`` then right-padded text.
    spec: ``attention.AttentionSpec`` (M, N and the mask switches).
    implementation: "cudnn" or "xla" (default: ``default_implementation(q.dtype)``).
  Returns:
    [B, S, Hq, D] in q.dtype.
  """
  if types.shape != q.shape[:2]:
    raise ValueError(f"types must be [B, S] = {q.shape[:2]}, found {types.shape}")
  impl = implementation or default_implementation(q.dtype)
  attn = lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation=impl, **kw)
  lengths = jnp.sum(types != layout.PAD, axis=-1).astype(jnp.int32)
  out = attn(q, k, v, is_causal=True, key_value_seq_lengths=lengths)
  for q0, q1, k0, k1, how in recompute_plan(spec):
    is_causal = isinstance(how, str)
    mask = None if how is None or is_causal else jnp.asarray(how)[None, None]
    rows = attn(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], mask=mask, is_causal=is_causal)
    out = out.at[:, q0:q1].set(rows)
  own_value = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  return jnp.where((types == layout.PAD)[..., None, None], own_value, out).astype(q.dtype)
