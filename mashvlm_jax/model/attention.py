"""Masked multi-head attention with grouped-query heads: one entry point, several backends.

``attend`` is the single call site for every layer. Backends:
- "dense": XLA softmax over a materialised bool mask; the reference every faster backend
  must match (docs/design.md, "Fast backends must equal the dense reference").
- "splash": TPU splash attention (Pallas) with the static DST mask (model/splash.py).
- "gpu": one causal flash attention over the row plus a recompute of the video rows whose
  mask is not causal (model/gpu_attention.py).
- "auto": the fast backend of the platform the program is traced for, read from
  ``jax.default_backend()`` when traced (``resolve_backend``): splash on TPU, gpu on GPUs,
  dense on CPU and anything else.

The dense path alone computes the logits, so it alone takes a ``LogitsHook`` (RVE's
enhancement, analysis/rve.py); ``attend`` refuses one for the fast backends.

The fast backends do not take a dense mask: they take a ``MaskLayout`` (per-row token types
plus the static ``AttentionSpec``), from which the dense backend can also build its mask
with ``layout.dst_mask``. ``attention_mask`` gives each backend the form it needs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mashvlm_jax import layout
from mashvlm_jax.model import gpu_attention, splash

# Large finite negative: a fully masked row gives a uniform softmax instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """Static description of the DST mask of a config: ``[temporal M][spatial N][text]``.

  Hashable, so it can be a static field of a pytree and a cache key for kernels.
  ``block_q``/``block_kv`` are the splash tile sizes; ``interpret`` runs the Pallas kernel
  in interpret mode (None = automatic: interpret unless the devices are TPUs).
  """
  num_temporal: int
  num_spatial: int
  temporal: str = "causal"
  spatial: str = "bidirectional"
  temporal_sees_spatial: bool = False
  spatial_sees_temporal: bool = False
  block_q: int = 128
  block_kv: int = 128
  interpret: bool | None = None

  def __post_init__(self):
    for name in ("temporal", "spatial"):
      if getattr(self, name) not in layout.ATTENTION_KINDS:
        raise ValueError(f"{name} attention must be one of {layout.ATTENTION_KINDS}, "
                         f"found {getattr(self, name)!r}")
    if min(self.num_temporal, self.num_spatial) < 0:
      raise ValueError(f"token counts must be >= 0, found M={self.num_temporal}, "
                       f"N={self.num_spatial}")
    if min(self.block_q, self.block_kv) <= 0:
      raise ValueError(f"block sizes must be positive, found block_q={self.block_q}, "
                       f"block_kv={self.block_kv}")

  @property
  def num_video(self) -> int:
    return self.num_temporal + self.num_spatial

  def switches(self) -> dict:
    """Keyword arguments of ``layout.dst_mask``."""
    return dict(temporal=self.temporal, spatial=self.spatial,
                temporal_sees_spatial=self.temporal_sees_spatial,
                spatial_sees_temporal=self.spatial_sees_temporal)

  @classmethod
  def plain_causal(cls, **kwargs) -> "AttentionSpec":
    """Text-only rows (M = N = 0) under ordinary causal attention."""
    return cls(num_temporal=0, num_spatial=0, **layout.plain_causal_switches(), **kwargs)


@flax.struct.dataclass
class MaskLayout:
  """The DST mask in factored form: token types int32[B, S] (layout.TEXT/TEMPORAL/
  SPATIAL/PAD, video prefix fixed by ``spec``) plus the static switches."""
  types: jax.Array
  spec: AttentionSpec = flax.struct.field(pytree_node=False)

  def dense(self) -> jax.Array:
    """bool[B, S, S], exactly ``layout.dst_mask`` of the types."""
    return layout.dst_mask(self.types, **self.spec.switches())


def attention_mask(types, spec: AttentionSpec, backend: str):
  """What ``attend`` needs for ``backend``: the dense bool mask [B, S, S] for "dense"
  (built by ``layout.dst_mask``), a ``MaskLayout`` for the fast backends ("auto" as
  ``resolve_backend``)."""
  backend = resolve_backend(backend)
  _backend_fn(backend)
  if backend == "dense":
    return layout.dst_mask(types, **spec.switches())
  return MaskLayout(jnp.asarray(types, jnp.int32), spec)


# What the dense path may do to its masked logits before the softmax (RVE,
# analysis/rve.py): f(logits float32 [B, Hq, Sq, Sk], visible bool [B, Sq, Sk] / [Sq, Sk] /
# None) -> logits of the same shape.
LogitsHook = Callable[[jnp.ndarray, jnp.ndarray | None], jnp.ndarray]


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    mask: jnp.ndarray, enhance: LogitsHook | None = None) -> jnp.ndarray:
  """Softmax(q k^T / sqrt(d) + mask) v.

  Args:
    q: [B, Sq, Hq, D] queries (already rotated).
    k, v: [B, Sk, Hkv, D]; Hq must be a multiple of Hkv (grouped-query attention).
    mask: bool [B, Sq, Sk] or [Sq, Sk], True = may attend; None = attend everywhere.
    enhance: optional ``LogitsHook`` applied to the masked logits before the softmax
      (None: the plain computation, exactly as without the argument).
  Returns:
    [B, Sq, Hq, D] in q.dtype; logits and softmax in float32.
  """
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  probs = jax.nn.softmax(_hooked_logits(q, k, mask, enhance), axis=-1).astype(v.dtype)
  probs = probs.reshape(batch, num_kv, -1, probs.shape[-1])  # [B, Hkv, group * Sq, Sk]
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, v.transpose(0, 2, 1, 3))
  out = out.reshape(batch, num_kv, num_heads // num_kv, q_len, head_dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim)


def _masked_logits(q, k, mask):
  """float32 [B, Hkv, group, Sq, Sk]: scaled q.k logits, masked entries at _MASK_VALUE.

  The query heads sharing a kv head are stacked along the query axis, so both products
  are plain batched matmuls over (batch, kv head) with heads-major operands: on CPU this
  saves transposes against contracting a separate group axis (the forward and backward
  of the tiny config's attention take 12% less time)."""
  batch, q_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  if num_heads % num_kv:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv})")
  group = num_heads // num_kv
  qg = q.reshape(batch, q_len, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
  qg = qg.reshape(batch, num_kv, group * q_len, head_dim)
  logits = jnp.einsum("bhqd,bhkd->bhqk", qg, k.transpose(0, 2, 1, 3),
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(batch, num_kv, group, q_len, -1) * (head_dim ** -0.5)
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch,) + mask.shape[-2:])[:, None, None]
    logits = jnp.where(mask, logits, _MASK_VALUE)
  return logits


def _hooked_logits(q, k, mask, enhance):
  """``_masked_logits``, passed through ``enhance`` (heads as [B, Hq, Sq, Sk]) if given."""
  logits = _masked_logits(q, k, mask)
  if enhance is None:
    return logits
  shape = logits.shape
  heads = enhance(logits.reshape(shape[0], shape[1] * shape[2], *shape[3:]), mask)
  return heads.reshape(shape)


def attention_probs(q, k, mask, enhance: LogitsHook | None = None) -> jnp.ndarray:
  """float32 [B, Hq, Sq, Sk]: the dense softmax weights of ``dense_attention`` (analysis:
  attention plots, RVE head scores). ``mask`` as there, or a ``MaskLayout``."""
  if isinstance(mask, MaskLayout):
    mask = mask.dense()
  probs = jax.nn.softmax(_hooked_logits(q, k, mask, enhance), axis=-1)
  batch, num_kv, group, q_len, k_len = probs.shape
  return probs.reshape(batch, num_kv * group, q_len, k_len)


def _dense(q, k, v, mask, mesh=None):
  del mesh  # XLA partitions the dense einsums itself
  if isinstance(mask, MaskLayout):
    mask = mask.dense()
  return dense_attention(q, k, v, mask)


def _needs_layout(name):
  def check(mask):
    if not isinstance(mask, MaskLayout):
      raise ValueError(f"attention backend {name!r} needs the token layout (a MaskLayout "
                       f"from attention.attention_mask), not a dense bool mask; build the "
                       f"mask with attention_mask(types, spec, {name!r})")
    return mask
  return check


def _splash(q, k, v, mask, mesh=None):
  mask = _needs_layout("splash")(mask)
  return splash.dst_splash_attention(q, k, v, mask.types, mask.spec, mesh=mesh)


def _gpu(q, k, v, mask, mesh=None):
  del mesh  # jax.nn.dot_product_attention carries its own partitioning rules
  mask = _needs_layout("gpu")(mask)
  return gpu_attention.dst_flash_attention(q, k, v, mask.types, mask.spec)


BACKENDS: dict[str, Callable] = {"dense": _dense, "splash": _splash, "gpu": _gpu}
# jax.default_backend() -> the backend "auto" picks; platforms not named here get "dense".
AUTO_BACKENDS = {"tpu": "splash", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def resolve_backend(backend: str) -> str:
  """``backend``, with "auto" replaced by the backend of ``jax.default_backend()``
  (``AUTO_BACKENDS``; "dense" on CPU). Called while tracing, so a program traced for a TPU
  gets splash and the same config on a CPU host gets the dense reference."""
  if backend != "auto":
    return backend
  return AUTO_BACKENDS.get(jax.default_backend(), "dense")


def _backend_fn(backend: str) -> Callable:
  try:
    return BACKENDS[backend]
  except KeyError:
    raise ValueError(f"attention backend {backend!r} is not available; "
                     f"choose one of {sorted(BACKENDS)}") from None


def attend(q, k, v, mask, *, backend: str = "dense", mesh=None,
           enhance: LogitsHook | None = None):
  """Attention of q [B, S, Hq, D] over k, v [B, S, Hkv, D] -> [B, S, Hq, D].

  Args:
    mask: bool [B, S, S] / [S, S] (dense backend only) or a ``MaskLayout`` (any backend).
    backend: "dense" (reference), "splash" (TPU Pallas), "gpu" (flash decomposition) or
      "auto" (``resolve_backend``).
    mesh: optional jax Mesh for the splash kernel's shard_map (default: the mesh set with
      ``jax.set_mesh``, if any).
    enhance: a ``LogitsHook`` (RVE); only the dense backend computes logits, so any other
      backend refuses it rather than ignore it.
  """
  backend = resolve_backend(backend)
  if enhance is None:
    return _backend_fn(backend)(q, k, v, mask, mesh=mesh)
  if backend != "dense":
    raise ValueError(f"attention enhancement (RVE) changes the attention logits, which "
                     f"only the dense backend computes; this forward resolved backend "
                     f"{backend!r}: set model.attention_backend='dense' (the Generator and "
                     f"Scorer always decode densely)")
  if isinstance(mask, MaskLayout):
    mask = mask.dense()
  return dense_attention(q, k, v, mask, enhance)
