"""TPU slices as the launchers see them, and the checks made before anything is created.

Slice names are parsed by ``mashvlm_jax.train.compile_check.parse_topology`` (the
``mashvlm compile`` parser, one table for both): ``v5p-64`` (v4/v5p count TensorCores, 2
per chip: 32 chips, torus 2x4x4), ``v5e-256`` / ``v5litepod-256`` and ``v6e-64`` (count
chips), or an explicit torus such as ``v4:8x8x12``. On top of it this module adds what a
launcher needs: hosts (4 chips per host; v5e/v6e slices of up to 8 chips are one host),
gcloud's accelerator type (v5e is ``v5litepod``), the TPU VM software version, and the
``xm.JobRequirements`` resource name. JAX sees one device per chip on all of them.

The checks (``load_config``, ``check_fit``, ``check_bucket_path``) fail with a message
before any resource exists: a config whose mesh or batch cannot use the slice, a
workdir that is not a gs:// folder.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Sequence

from mashvlm_jax.train import compile_check

RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                    "v5e": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
GCLOUD_NAMES = {"v5e": "v5litepod"}  # generations gcloud spells differently


class LaunchError(ValueError):
  """A launch that cannot work, found before anything is created."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice, e.g. ``parse_slice("v5p-64")``."""
  tpu: compile_check.TpuSlice

  @property
  def generation(self) -> str:
    return self.tpu.generation.name

  @property
  def name(self) -> str:
    return self.tpu.accelerator_type

  @property
  def accelerator_type(self) -> str:
    """What gcloud's --accelerator-type expects (v5e-16 -> v5litepod-16)."""
    size = self.name.rsplit("-", 1)[1]
    return f"{GCLOUD_NAMES.get(self.generation, self.generation)}-{size}"

  @property
  def chips(self) -> int:
    return self.tpu.chips

  @property
  def chips_per_host(self) -> int:
    return math.prod(self.tpu.chips_per_host_bounds)

  @property
  def hosts(self) -> int:
    return self.chips // self.chips_per_host

  @property
  def devices(self) -> int:
    """jax.device_count() on the whole slice: one device per chip."""
    return self.chips

  @property
  def physical_topology(self) -> str:
    """The chip torus, e.g. 2x4x4 for v5p-64, 8x8 for v6e-64."""
    return "x".join(map(str, self.tpu.shape))

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def xm_resource(self) -> str:
    """xm.JobRequirements keyword, e.g. tpu_v5p."""
    return f"tpu_{self.generation}"

  def describe(self) -> str:
    cores = self.tpu.generation.cores_per_chip
    cores_text = f" ({self.chips * cores} TensorCores)" if cores > 1 else ""
    return (f"{self.name} ({self.physical_topology}): {self.chips} chips{cores_text}, "
            f"{self.hosts} host{'s' if self.hosts > 1 else ''} x {self.chips_per_host} "
            f"chips, {self.devices} JAX devices")


def parse_slice(name: str) -> Slice:
  """``v5p-64`` / ``v5litepod-16`` / ``v6e-64`` / ``v4:8x8x12`` -> Slice, or LaunchError."""
  try:
    return Slice(compile_check.parse_topology(name))
  except ValueError as e:
    raise LaunchError(str(e)) from None


def normalize_override(item: str) -> str:
  """``KEY=VALUE`` (or ``--config.KEY=VALUE``) -> ``KEY=VALUE``."""
  item = item.strip()
  item = item[len("--config."):] if item.startswith("--config.") else item
  key, sep, _ = item.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
    raise LaunchError(f"config override {item!r} is not of the form KEY=VALUE, "
                      f"e.g. optim.lr=3e-4")
  return item


def load_config(spec: str, overrides: Sequence[str] = ()):
  """The config ``mashvlm train --config=SPEC --config.KEY=VALUE...`` would train."""
  from absl import flags
  from ml_collections import config_flags
  path = spec.split(":", 1)[0]
  if not pathlib.Path(path).is_file():
    raise LaunchError(f"config file {path} not found (from --config={spec})")
  argv = ["launch", f"--config={spec}"] + [f"--config.{normalize_override(o)}"
                                            for o in overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    return values.config
  except Exception as e:  # absl/ml_collections raise many kinds; all mean "fix the input"
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
    if isinstance(e, (KeyError, AttributeError)):
      name = str(e.args[0] if e.args else detail).strip("\"'")
      detail = f"the config has no field '{name}'"
    raise LaunchError(f"cannot load --config={spec} with overrides {list(overrides)}: "
                      f"{detail or type(e).__name__}") from None


@dataclasses.dataclass(frozen=True)
class Fit:
  """How a config uses a slice."""
  mesh: dict
  batch: int
  data_parallel: int
  per_host: int

  def describe(self) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
    return (f"mesh ({mesh}), global batch {self.batch} = {self.per_host} per host, "
            f"data-parallel size {self.data_parallel}")


def check_fit(config, slc: Slice) -> Fit:
  """The trainer's config check, then the mesh resolved on the slice and the batch split
  over hosts and data x fsdp."""
  from mashvlm_jax.train import sharding, trainer
  try:
    trainer.validate_config(config)  # what `mashvlm train` checks first
  except ValueError as e:
    raise LaunchError(str(e)) from None
  if "batch_size" not in config.data:
    raise LaunchError("the config has no data.batch_size (the global batch)")
  try:
    spec = config.mesh.to_dict() if hasattr(config.mesh, "to_dict") else dict(config.mesh)
    sizes = sharding.mesh_shape(spec, slc.devices)
  except ValueError as e:
    raise LaunchError(f"{slc.describe()}; the config's mesh cannot use it: {e}") from None
  mesh = dict(zip(sharding.MESH_AXES, sizes))
  dp = math.prod(mesh[a] for a in sharding.BATCH_AXES)
  batch, accum = int(config.data.batch_size), int(config.get("grad_accum_steps", 1))
  if batch % slc.hosts:
    raise LaunchError(f"{slc.name} has {slc.hosts} hosts: data.batch_size={batch} must be "
                      f"divisible by {slc.hosts} (every host loads batch_size / hosts rows)")
  if batch % accum or (batch // accum) % dp:
    raise LaunchError(f"{slc.name} with mesh {mesh}: data.batch_size={batch} "
                      f"(grad_accum_steps={accum}) must split into microbatches divisible "
                      f"by the data-parallel size data x fsdp = {dp}")
  return Fit(mesh, batch, dp, batch // slc.hosts)


def check_bucket_path(path: str, what: str = "--workdir") -> str:
  """A gs://BUCKET/FOLDER path every host can reach; returns the bucket name."""
  example = "e.g. gs://my-bucket/mashvlm/run1"
  if not path:
    raise LaunchError(f"{what} is required: a gs:// folder that every host reads and writes "
                      f"(checkpoints, resume after preemption), {example}")
  if not path.startswith("gs://"):
    raise LaunchError(f"{what}={path} is not a gs:// bucket path; a multi-host TPU job needs "
                      f"storage every host (and the next VM after a preemption) can reach, "
                      f"{example}")
  bucket, _, folder = path[len("gs://"):].partition("/")
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
    raise LaunchError(f"{what}={path}: {bucket!r} is not a bucket name (3 to 63 lowercase "
                      f"letters, digits, dashes, underscores or dots), {example}")
  if not folder.strip("/"):
    raise LaunchError(f"{what}={path} names a bucket but no folder in it, {example}")
  return bucket


def shared_path_problems(config, local_copies: bool) -> tuple[list[str], list[str]]:
  """(errors, warnings) for config paths every host reads. ``local_copies``: the launcher
  can put a copy on every host (gcloud's --worker_setup), so local paths only warn."""
  problems = []
  init_from = str(config.get("init_from", "") or "")
  if init_from and not init_from.startswith("gs://"):
    problems.append(f"init_from={init_from} is local to each host: every host (and every "
                    f"recreated VM) needs its own copy there")
  data_dir = str(config.data.get("data_dir", "")) if "data" in config else ""
  if data_dir and not data_dir.startswith("gs://"):
    problems.append(f"data.data_dir={data_dir} is local to each host: every host builds or "
                    f"must hold the same data there")
  return ([], problems) if local_copies else (problems, [])
