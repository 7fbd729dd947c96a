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

Padding may sit anywhere in the text (right, left of the text, or between text tokens): each
row is first permuted so that its non-pad tokens come first, in their order (``real_first``),
which keeps the video prefix in place and makes the real keys of a row its first ``#non-pad``
positions, the form the causal call with per-row key lengths needs; the output is permuted
back. The permutation is a gather of q, k, v and of the output (its gradient a gather too),
linear in the sequence length beside the quadratic attention.
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


def real_first(types):
  """(order, inverse), int32[B, S] each: ``x[b, order[b]]`` puts row b's non-pad tokens
  first, in sequence order, then its pads; ``y[b, inverse[b]]`` undoes it."""
  real = (types != layout.PAD).astype(jnp.int32)
  real_rank = jnp.cumsum(real, axis=-1) - real
  pad_rank = jnp.cumsum(1 - real, axis=-1) - (1 - real)
  num_real = jnp.sum(real, axis=-1, keepdims=True)
  inverse = jnp.where(real == 1, real_rank, num_real + pad_rank).astype(jnp.int32)
  return jnp.argsort(inverse, axis=-1).astype(jnp.int32), inverse


@jax.custom_vjp
def _permute(x, order, inverse):
  """x[b, order[b]] along axis 1 of x [B, S, ...]; ``inverse`` is order's inverse."""
  index = order.reshape(order.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _permute_fwd(x, order, inverse):
  return _permute(x, order, inverse), (order, inverse)


def _permute_bwd(residual, cotangent):
  order, inverse = residual  # a permutation's transpose is its inverse: a gather again
  return _permute(cotangent, inverse, order), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def dst_flash_attention(q, k, v, types, spec, *, implementation=None):
  """DST attention; equals ``dense_attention`` with ``layout.dst_mask``.

  Args:
    q: [B, S, Hq, D] queries (already rotated); k, v: [B, S, Hkv, D], Hq % Hkv == 0.
    types: int32[B, S], the video prefix of ``spec`` then text, padded anywhere after
      the prefix (PAD tokens).
    spec: ``attention.AttentionSpec`` (M, N and the mask switches).
    implementation: "cudnn" or "xla" (default: ``default_implementation(q.dtype)``).
  Returns:
    [B, S, Hq, D] in q.dtype.
  """
  if types.shape != q.shape[:2]:
    raise ValueError(f"types must be [B, S] = {q.shape[:2]}, found {types.shape}")
  impl = implementation or default_implementation(q.dtype)
  attn = lambda *a, **kw: jax.nn.dot_product_attention(*a, implementation=impl, **kw)
  order, inverse = real_first(types)
  qs, ks, vs = (_permute(x, order, inverse) for x in (q, k, v))
  lengths = jnp.sum(types != layout.PAD, axis=-1).astype(jnp.int32)
  out = attn(qs, ks, vs, is_causal=True, key_value_seq_lengths=lengths)
  for q0, q1, k0, k1, how in recompute_plan(spec):
    is_causal = isinstance(how, str)
    mask = None if how is None or is_causal else jnp.asarray(how)[None, None]
    rows = attn(qs[:, q0:q1], ks[:, k0:k1], vs[:, k0:k1], mask=mask, is_causal=is_causal)
    out = out.at[:, q0:q1].set(rows)
  out = _permute(out, inverse, order)
  own_value = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2)
  return jnp.where((types == layout.PAD)[..., None, None], own_value, out).astype(q.dtype)
