"""Device mesh and the one table of logical-axis -> mesh-axis rules.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters and
optimizer state sharded), ``tensor`` (heads / MLP / vocab split). Parameters carry logical
axis names from the model (``embed``, ``heads``, ...); ``LOGICAL_AXIS_RULES`` maps them.
A dimension whose size is not divisible by its mesh axes is replicated instead (for
example 2 kv heads on tensor=4), so any mesh that divides the device count works.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters' low-rank dim (a few dozen): replicated
)


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves {"data": -1, "fsdp": 4, "tensor": 2} against the device count.

  At most one axis may be -1 (= all remaining devices). Raises a ValueError that says
  what to change when the product differs from the device count.
  """
  unknown = sorted(set(spec) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
  sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive with at most one -1, found "
                     f"{dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes use {fixed} "
                       f"devices, which does not divide the {num_devices} available; set "
                       f"config.mesh so the product divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {fixed} devices but "
                     f"{num_devices} are available; set one axis of config.mesh to -1 or "
                     f"make the product equal {num_devices}")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh over ``devices`` (default: all) with axes MESH_AXES."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except Exception:  # non-TPU topologies without a physical layout
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide evenly."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    fitted.append(axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None)
  return P(*fitted)


def logical_to_mesh(logical: P, shape: Sequence[int], mesh: Mesh,
                    rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(logical, rules)
  return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def param_shardings(boxed_abstract, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """NamedShardings for a (boxed, possibly abstract) parameter tree; unboxed result.

  Leaves without logical names (e.g. biases) are replicated.
  """
  logical = nn.get_partition_spec(boxed_abstract)
  shapes = nn.unbox(boxed_abstract)
  return jax.tree_util.tree_map(
      lambda spec, x: logical_to_mesh(spec, x.shape, mesh, rules), logical, shapes,
      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax.Arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local.items()}


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)
