"""DST attention with the TPU splash-attention kernel (Pallas).

The video block is a fixed prefix of every row (docs/design.md), so the DST mask is static for a
config: it is built once by ``layout.dst_mask`` over ``[temporal M][spatial N][text ...]``
with the text part reaching the padded length, handed to splash as a ``NumpyMask``, and
splash skips every block that mask leaves empty (e.g. spatial queries x temporal keys under
DST). Per-row text padding is dynamic and goes through segment ids: real tokens share
segment 0, every pad position gets its own segment, so pad keys are invisible to real
queries and a pad query sees only itself (as in ``layout.dst_mask``; the row stays finite).

Under a mesh the kernel runs in ``shard_map`` with heads over "tensor" and batch over
("data", "fsdp"); without one it is vmapped over the batch. Off TPU the kernel runs in
Pallas interpret mode.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
from jax.sharding import PartitionSpec as P

from mashvlm_jax import layout

BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def padded_length(seq_len: int, spec) -> int:
  """Sequence length rounded up to a multiple of both block sizes."""
  step = math.lcm(spec.block_q, spec.block_kv)
  return -(-seq_len // step) * step


def static_mask(spec, length: int) -> np.ndarray:
  """bool[length, length]: the DST mask of ``spec`` with text filling positions M+N.."""
  if length < spec.num_video:
    raise ValueError(f"sequence length {length} is shorter than the video prefix "
                     f"M+N={spec.num_video}")
  types = layout.token_types(spec.num_temporal, spec.num_spatial, length - spec.num_video)
  return layout.dst_mask(types, **spec.switches())


def segment_ids(types, length: int):
  """int32[B, length]: 0 for real tokens, position + 1 for pads and the block padding."""
  pos = jnp.arange(length, dtype=jnp.int32)
  is_pad = jnp.pad(types == layout.PAD, ((0, 0), (0, length - types.shape[-1])),
                   constant_values=True)
  return jnp.where(is_pad, pos + 1, 0)


def block_sizes(spec) -> splash_lib.BlockSizes:
  """Forward and backward tiles from the spec (kv tiles must be multiples of 128)."""
  bq, bkv = spec.block_q, spec.block_kv
  return splash_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                               block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                               block_q_dq=bq, block_kv_dq=bkv)


@functools.lru_cache(maxsize=64)
def make_kernel(spec, length: int, interpret: bool):
  """The splash kernel for ``spec`` at padded ``length`` (one mask shared by all heads,
  so it serves any number of local heads). Its mask info is host numpy, so the cached
  kernel holds no tracer and no device array, whatever trace or mesh context calls it."""
  mask = splash_lib.MultiHeadMask([splash_lib.NumpyMask(static_mask(spec, length))])

  def build():
    kernel = splash_lib.make_splash_mha(mask, block_sizes=block_sizes(spec), head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
    return jax.tree_util.tree_map(np.asarray, kernel)

  # make_splash_mha turns the mask info into jax arrays; a fresh thread carries no
  # trace and no mesh context of the caller (both are thread-local in JAX).
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    return pool.submit(build).result()


def _platform(mesh) -> str:
  """Platform of the mesh's devices (concrete or abstract), else of the default backend."""
  abstract = getattr(mesh, "abstract_mesh", mesh)
  device = getattr(abstract, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def context_mesh():
  """The mesh of the context (``jax.set_mesh``, or the legacy ``with mesh:``), else None.

  Inside a shard_map (manual axes) there is nothing left to shard: None.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    try:  # deprecated `with mesh:` context; private location, so guarded
      from jax._src import mesh as mesh_src
      mesh = mesh_src.thread_resources.env.physical_mesh
    except (ImportError, AttributeError):
      return None
  if mesh.empty or getattr(mesh, "manual_axes", ()):
    return None
  return mesh


def _local_attention(kernel, q, k, v, seg):
  """q [B, Hq, S, D], k/v [B, Hkv, S, D], seg int32[B, S] -> [B, Hq, S, D]."""
  def one_row(q, k, v, seg):
    return kernel(q, k, v, segment_ids=splash_lib.SegmentIds(q=seg, kv=seg))
  return jax.vmap(one_row)(q, k, v, seg)


def _mesh_axes(mesh, batch: int, num_heads: int):
  """(batch axes, head axis or None) of ``mesh``, checked against the shapes."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % shards:
    raise ValueError(f"splash attention: batch {batch} does not divide over mesh axes "
                     f"{batch_axes} of total size {shards}")
  head_axis = HEAD_AXIS if HEAD_AXIS in mesh.axis_names else None
  if head_axis and num_heads % mesh.shape[head_axis]:
    raise ValueError(f"splash attention: {num_heads} query heads do not divide over mesh "
                     f"axis {head_axis!r} of size {mesh.shape[head_axis]}")
  return batch_axes or None, head_axis


def _placed(mesh, x, part):
  """``x`` resharded to ``part`` where the mesh has Explicit axes (shard_map then wants
  inputs typed with its in_specs); Auto meshes reshard inside shard_map by themselves."""
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.reshard(x, jax.sharding.NamedSharding(mesh, part))
  return x


def dst_splash_attention(q, k, v, types, spec, *, mesh=None, interpret=None):
  """DST attention with splash; equals ``dense_attention`` with ``layout.dst_mask``.

  Args:
    q: [B, S, Hq, D] queries (already rotated); k, v: [B, S, Hkv, D], Hq % Hkv == 0.
    types: int32[B, S] token types; the first M+N must be the video prefix of ``spec``.
    spec: ``attention.AttentionSpec`` (static mask switches, M, N, block sizes).
    mesh: Mesh for shard_map (default: the context mesh; none = plain vmap).
    interpret: Pallas interpret mode (default: ``spec.interpret``, else auto = not TPU).
  Returns:
    [B, S, Hq, D] in q.dtype.
  """
  batch, seq_len, num_heads, head_dim = q.shape
  num_kv = k.shape[2]
  if num_heads % num_kv:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv})")
  if types.shape != (batch, seq_len):
    raise ValueError(f"types must be [B, S] = {(batch, seq_len)}, found {types.shape}")
  mesh = context_mesh() if mesh is None else mesh
  if interpret is None:
    interpret = spec.interpret if spec.interpret is not None else _platform(mesh) != "tpu"
  length = padded_length(seq_len, spec)
  kernel = make_kernel(spec, length, bool(interpret))

  def to_kernel(x):  # [B, S, H, D] -> [B, H, length, D]
    return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, length - seq_len), (0, 0)))

  q = q * jnp.asarray(head_dim ** -0.5, q.dtype)  # splash does not scale the logits
  seg = segment_ids(types, length)
  if mesh is None:
    out = _local_attention(kernel, to_kernel(q), to_kernel(k), to_kernel(v), seg)
  else:
    batch_axes, head_axis = _mesh_axes(mesh, batch, num_heads)
    if head_axis and num_kv % mesh.shape[head_axis]:  # kv heads cannot split: share them
      k, v = (jnp.repeat(x, num_heads // num_kv, axis=2) for x in (k, v))
    heads, rows = P(batch_axes, head_axis, None, None), P(batch_axes, None)
    args = [_placed(mesh, x, part) for x, part in
            ((to_kernel(q), heads), (to_kernel(k), heads), (to_kernel(v), heads), (seg, rows))]
    sharded = jax.shard_map(functools.partial(_local_attention, kernel), mesh=mesh,
                            in_specs=(heads, heads, heads, rows), out_specs=heads,
                            check_vma=False)
    out = sharded(*args)
  return out[:, :, :seq_len].transpose(0, 2, 1, 3).astype(q.dtype)
