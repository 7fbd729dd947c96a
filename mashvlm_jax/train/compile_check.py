"""Ahead-of-time compile of the full train step for a Cloud TPU slice, on any machine.

``mashvlm compile`` (commands/compile.py) is a thin wrapper around ``run``. ``check`` builds
the trainer's step (frozen vision forward, LLM forward and backward, optimizer update) with
abstract inputs only (``jax.ShapeDtypeStruct`` with shardings: no parameter is ever
allocated), lowers and compiles it for TPU devices described by libtpu
(``jax.experimental.topologies.get_topology_desc``), and compares the per-chip memory that
XLA reports with the chip's HBM.

Slice names (``parse_topology``), as Cloud TPU accelerator types:
  v4-N, v5p-N          N = TensorCores = 2 x chips (v5p-64 = 32 chips); 3D torus
  v5e-N (v5litepod-N), v6e-N
                       N = chips; 2D torus
or an explicit torus shape in chips: ``v5p:2x4x4``, ``v5e:16x16``. The shape of
``<gen>-N`` follows the Cloud tables: start from 2x2x1 (3D) or 1x1 (2D) and double the
last of the smallest dimensions until the chip count is reached (v5p-64 -> 2x4x4,
v4-32 -> 2x2x4, v5e-256 -> 16x16, v6e-64 -> 8x8). libtpu names the generations ``v4``,
``v5p``, ``v5e``, ``v6e``; v4 and v5p run one JAX device per chip with the "megacore" chip
config, v5e and v6e have one TensorCore per chip ("default").
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping

import ml_collections

from mashvlm_jax.train import defaults

GIB = 2 ** 30


class TopologyError(RuntimeError):
  """libtpu cannot describe the requested slice (or is not installed)."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation as libtpu and the Cloud accelerator types name it."""
  name: str  # libtpu topology prefix
  dims: int  # torus dimensions
  cores_per_chip: int  # what the N of "<gen>-N" counts per chip
  chip_config: str  # get_topology_desc chip_config_name
  hbm_gib: float  # HBM per chip usable by programs, GiB
  max_chips: int  # largest "<gen>-N" slice accepted (explicit shapes may go beyond)
  aliases: tuple[str, ...] = ()


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32, 4096),
    "v5p": Generation("v5p", 3, 2, "megacore", 95, 4096),
    "v5e": Generation("v5e", 2, 1, "default", 16, 256, aliases=("v5litepod",)),
    "v6e": Generation("v6e", 2, 1, "default", 32, 256),
}
ACCEPTED_FORMS = ("v4-N / v5p-N (N = TensorCores = 2 x chips: v4-8 .. v4-8192, v5p-8 .. "
                  "v5p-8192)", "v5e-N / v5litepod-N / v6e-N (N = chips: 1, 4, 8, .., 256)",
                  "<gen>:AxBxC (v4, v5p) or <gen>:AxB (v5e, v6e), a torus shape in chips")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: generation and torus shape in chips."""
  generation: Generation
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def accelerator_type(self) -> str:
    """Cloud name, e.g. v5p-64."""
    return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

  @property
  def topology_name(self) -> str:
    """libtpu topology string, e.g. v5p:2x4x4."""
    return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips per host VM: 2x2x1 trays (v4/v5p, multi-host v5e/v6e); up to 8 chips on one
    host for the small v5e/v6e slices."""
    shape = tuple(self.shape) + (1,) * (3 - len(self.shape))
    if self.generation.dims == 2 and self.chips <= 8:
      return shape
    return (min(shape[0], 2), min(shape[1], 2), 1)

  @property
  def hbm_bytes(self) -> int:
    return int(self.generation.hbm_gib * GIB)


def _generation(name: str) -> Generation:
  for gen in GENERATIONS.values():
    if name == gen.name or name in gen.aliases:
      return gen
  raise ValueError(f"unknown TPU generation {name!r}")


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU slice shape for ``chips``: from 2x2x1 (3D) or 1x1 (2D), double the last of
  the smallest dimensions until the product is ``chips`` (a power of two)."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


def _bad_name(name: str, why: str) -> ValueError:
  forms = "\n  ".join(ACCEPTED_FORMS)
  return ValueError(f"topology {name!r}: {why}. Accepted forms:\n  {forms}")


def parse_topology(name: str) -> TpuSlice:
  """'v5p-64' | 'v5e-256' | 'v6e-64' | 'v4-32' | 'v5p:2x4x4' -> TpuSlice (see module doc)."""
  text = name.strip().lower()
  explicit = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  typed = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not (explicit or typed):
    raise _bad_name(name, "not of the form <generation>-<N> or <generation>:<shape>")
  try:
    gen = _generation((explicit or typed).group(1))
  except ValueError as e:
    raise _bad_name(name, f"{e} (known: {', '.join(GENERATIONS)}, v5litepod)") from None
  if explicit:
    shape = tuple(int(s) for s in explicit.group(2).split("x"))
    if len(shape) != gen.dims or min(shape) < 1:
      raise _bad_name(name, f"{gen.name} slices are {gen.dims}D tori: give {gen.dims} "
                            f"positive sizes")
    return TpuSlice(gen, shape)
  count = int(typed.group(2))
  if count % gen.cores_per_chip:
    raise _bad_name(name, f"{gen.name}-N counts TensorCores, {gen.cores_per_chip} per chip, "
                          f"so N must be even")
  chips = count // gen.cores_per_chip
  smallest = 4 if gen.dims == 3 else 1
  power = chips > 0 and chips & (chips - 1) == 0
  if not power or chips < smallest or chips > gen.max_chips or (gen.dims == 2 and chips == 2):
    raise _bad_name(name, f"{chips} chips is not a standard {gen.name} slice; use an "
                          f"explicit shape for others")
  return TpuSlice(gen, torus_shape(chips, gen.dims))


def libtpu_installed() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _libtpu_env_without_chips(tpu: TpuSlice) -> None:
  """On a machine without TPU chips, lets several processes load libtpu at once (its
  lockfile guards real chips only) and names a worker and accelerator type so that libtpu
  does not log metadata-server errors. Variables already set are kept."""
  try:
    from jax._src import hardware_utils  # private: guarded
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # pylint: disable=broad-except
    return
  if chips:
    return
  cloud = "v5litepod" if tpu.generation.name == "v5e" else tpu.generation.name
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{cloud}-{tpu.accelerator_type.split('-')[1]}")


def topology_devices(tpu: TpuSlice) -> list:
  """Compile-only TPU devices of the slice (needs libtpu; no TPU attached)."""
  from jax.experimental import topologies
  _libtpu_env_without_chips(tpu)
  try:
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.topology_name,
        chip_config_name=tpu.generation.chip_config,
        chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=1)
  except Exception as e:  # libtpu missing or the shape unknown to it
    hint = ("libtpu rejects this shape; use a standard slice name" if libtpu_installed() else
            "AOT compilation needs libtpu: pip install -e '.[tpu]' (jax[tpu] of the "
            "installed jax version)")
    raise TopologyError(f"cannot describe TPU topology {tpu.topology_name} "
                        f"({tpu.accelerator_type}): {e}. {hint}") from e
  devices = list(topo.devices)
  if len(devices) != tpu.chips:
    raise TopologyError(f"libtpu describes {tpu.topology_name} with {len(devices)} devices, "
                        f"expected one per chip ({tpu.chips})")
  return devices


def parse_mesh(text: str) -> dict[str, int]:
  """'fsdp=-1,tensor=4' -> {'fsdp': -1, 'tensor': 4} (axes not named are 1)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"-?\d+", value.strip()):
      raise ValueError(f"--mesh item {item!r} is not axis=size, e.g. "
                       f"--mesh=data=1,fsdp=-1,tensor=1")
    out[key.strip()] = int(value)
  return out


def make_slice_mesh(spec: Mapping[str, int], tpu: TpuSlice, devices=None):
  """The training mesh over the slice's chips; a clear error when the sizes disagree."""
  from mashvlm_jax.train import sharding
  try:
    sharding.mesh_shape(spec, tpu.chips)
  except ValueError as e:
    raise ValueError(f"mesh {dict(spec)} does not fit {tpu.accelerator_type} "
                     f"({tpu.topology_name}, {tpu.chips} chips): {e}") from None
  return sharding.make_mesh(spec, topology_devices(tpu) if devices is None else devices)


# ---------------------------------------------------------------- memory and FLOPs


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-chip bytes of a compiled program (from ``compiled.memory_analysis()``)."""
  arguments: int
  outputs: int
  aliased: int  # outputs that reuse donated argument buffers
  temporaries: int
  generated_code: int
  hbm: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.total <= self.hbm

  @classmethod
  def from_stats(cls, stats, hbm: int) -> "Memory":
    return cls(arguments=int(stats.argument_size_in_bytes),
               outputs=int(stats.output_size_in_bytes),
               aliased=int(stats.alias_size_in_bytes),
               temporaries=int(stats.temp_size_in_bytes),
               generated_code=int(stats.generated_code_size_in_bytes), hbm=hbm)


@dataclasses.dataclass
class Report:
  """What ``mashvlm compile`` prints. ``memory`` is None when XLA refused the program for
  running out of HBM (``error`` then holds its message)."""
  tpu: TpuSlice
  mesh: dict[str, int]
  batch_size: int
  text_len: int
  seq_len: int
  attention_backend: str
  params: int
  flops_per_step: float  # analytic model FLOPs (train/flops.py), whole slice
  peak_flops_per_chip: float
  memory: Memory | None = None
  error: str | None = None
  tpu_kernels: int = 0  # Mosaic custom calls in the lowered step (splash call sites)
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.fits

  def step_seconds(self, mfu: float) -> float:
    """Step time if the slice runs at ``mfu`` of its bf16 peak."""
    return self.flops_per_step / (self.tpu.chips * self.peak_flops_per_chip * mfu)


def exit_code(report: Report) -> int:
  """0 when the step fits the chip's HBM, 1 otherwise."""
  return 0 if report.fits else 1


def _gib(n: float) -> str:
  return f"{n / GIB:8.2f} GiB"


def format_report(report: Report, mfu: float = 0.4) -> str:
  tpu, mem = report.tpu, report.memory
  rows = report.batch_size // max(1, math.prod(
      v for k, v in report.mesh.items() if k in ("data", "fsdp")))
  lines = [
      f"slice:   {tpu.accelerator_type} = {tpu.topology_name}, {tpu.chips} chips "
      f"({tpu.generation.chip_config} chip config), {tpu.generation.hbm_gib:g} GiB HBM/chip",
      f"mesh:    {report.mesh}",
      f"step:    global batch {report.batch_size} ({rows} rows per data-parallel shard), "
      f"sequence {report.seq_len} = video {report.seq_len - report.text_len} + text "
      f"{report.text_len}, attention {report.attention_backend}, "
      f"{report.params / 1e9:.3g}B params",
      f"kernels: {report.tpu_kernels} Mosaic TPU custom calls in the lowered step (splash "
      f"call sites; 0 with the dense backend)",
      "memory per chip (compiled.memory_analysis()):"]
  if mem is not None:
    lines += [f"  arguments      {_gib(mem.arguments)}",
              f"  outputs        {_gib(mem.outputs)}  ({_gib(mem.aliased).strip()} aliased "
              f"to donated arguments)",
              f"  temporaries    {_gib(mem.temporaries)}",
              f"  generated code {_gib(mem.generated_code)}",
              f"  total          {_gib(mem.total)}  of {_gib(mem.hbm).strip()} HBM "
              f"({100 * mem.total / mem.hbm:.1f}%)"]
  else:
    lines.append(f"  XLA: {report.error}")
  tflops = report.flops_per_step / 1e12
  lines += [
      f"fits:    {'yes' if report.fits else 'NO'}",
      f"flops:   {tflops:,.4g} TFLOP per step (analytic, train/flops.py), "
      f"{tflops / tpu.chips:,.4g} per chip",
      f"time:    {report.step_seconds(mfu):.4g} s per step at {100 * mfu:g}% MFU "
      f"(peak {report.peak_flops_per_chip / 1e12:g} TFLOP/s per chip)"]
  if report.seconds:
    lines.append("compile: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()))
  return "\n".join(lines)


def is_out_of_memory(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text


# ---------------------------------------------------------------- the compile


def prepare_config(config: ml_collections.ConfigDict, attention_backend: str | None = "splash",
                   mesh: Mapping[str, int] | None = None) -> ml_collections.ConfigDict:
  """Training defaults filled, the attention backend (None: keep the config's) and mesh
  (None: keep the config's) set."""
  config = defaults.training_defaults(config)
  if attention_backend is not None:
    config.model.attention_backend = attention_backend
  if mesh is not None:
    config.mesh = ml_collections.ConfigDict(dict(mesh))
  return config


def abstract_batch(model_cfg, batch_size: int, text_len: int, shardings: dict) -> dict:
  """ShapeDtypeStructs of one global batch (data/pipeline.py batch contract)."""
  import jax
  import jax.numpy as jnp
  size = model_cfg.vision.image_size
  shapes = dict(frames=((batch_size, model_cfg.num_frames, size, size, 3), jnp.uint8),
                text_ids=((batch_size, text_len), jnp.int32),
                text_mask=((batch_size, text_len), jnp.bool_),
                labels=((batch_size, text_len), jnp.int32),
                label_mask=((batch_size, text_len), jnp.float32))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def check(config: ml_collections.ConfigDict, topology: str, *,
          attention_backend: str | None = "splash", mesh: Mapping[str, int] | None = None,
          devices=None) -> Report:
  """Lowers and compiles the train step of ``config`` for ``topology``; see module doc.

  ``devices`` replaces the libtpu topology's devices (tests); everything else is built
  from the config exactly as ``trainer.train`` builds it.
  """
  import flax.linen as nn
  import jax
  from mashvlm_jax.model import mashvlm
  from mashvlm_jax.train import flops as flops_lib
  from mashvlm_jax.train import sharding, trainer

  tpu = parse_topology(topology)
  config = prepare_config(config, attention_backend, mesh)
  seconds = {}
  t0 = time.perf_counter()
  slice_mesh = make_slice_mesh(config.mesh, tpu, devices)
  setup = trainer.build(config, mesh=slice_mesh)
  batch_size, text_len = int(config.data.batch_size), int(config.data.text_len)
  m, n = setup.model_cfg.video_token_counts
  peak, _ = flops_lib.peak_flops_per_device(f"TPU {tpu.generation.name}", "tpu")
  report = Report(
      tpu=tpu, mesh=dict(zip(slice_mesh.axis_names, map(int, slice_mesh.devices.shape))),
      batch_size=batch_size, text_len=text_len, seq_len=m + n + text_len,
      attention_backend=setup.model_cfg.attention_backend,
      params=mashvlm.count_params(setup.abstract_state.params),
      flops_per_step=batch_size * flops_lib.train_flops_per_row(setup.model_cfg, text_len),
      peak_flops_per_chip=peak, seconds=seconds)
  step = jax.jit(
      trainer.make_train_step(setup.model, setup.tx, setup.schedule,
                              accum=int(config.grad_accum_steps), trainable=setup.trainable),
      in_shardings=(setup.state_shardings, setup.batch_shardings),
      out_shardings=(setup.state_shardings, sharding.replicated(slice_mesh)),
      donate_argnums=(0,))
  state = trainer.with_shardings(setup.abstract_state, setup.state_shardings)
  batch = abstract_batch(setup.model_cfg, batch_size, text_len, setup.batch_shardings)
  with jax.set_mesh(slice_mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    lowered = step.lower(state, batch)
  seconds["lower"] = time.perf_counter() - t0
  report.tpu_kernels = lowered.as_text().count("tpu_custom_call")
  t1 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA refuses programs that exceed HBM
    if not is_out_of_memory(e):
      raise
    report.error = str(e).strip().splitlines()[0][:2000]
    seconds["compile"] = time.perf_counter() - t1
    return report
  seconds["compile"] = time.perf_counter() - t1
  report.memory = Memory.from_stats(compiled.memory_analysis(), tpu.hbm_bytes)
  return report


def run(config: ml_collections.ConfigDict, topology: str, *, mesh_text: str | None = None,
        attention_backend: str | None = "splash", mfu: float = 0.4,
        json_path: str | None = None, echo=print, echo_error=None) -> int:
  """``mashvlm compile``: check, print the report, optionally write JSON; the exit status
  (0 fits, 1 does not fit, 2 bad arguments such as an unknown topology or a mesh that
  does not cover the slice; those go to ``echo_error``, default stderr)."""
  echo_error = echo_error or (lambda line: print(line, file=sys.stderr, flush=True))
  try:
    mesh = parse_mesh(mesh_text) if mesh_text else None
    report = check(config, topology, attention_backend=attention_backend, mesh=mesh)
  except (ValueError, TopologyError) as e:
    echo_error(f"mashvlm compile: {e}")
    return 2
  echo(format_report(report, mfu))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report_json(report, mfu), f, indent=2)
  code = exit_code(report)
  if code:
    echo(f"does not fit: {report.tpu.accelerator_type} has {report.tpu.generation.hbm_gib:g} "
         f"GiB of HBM per chip; use a larger slice, a smaller --config.data.batch_size or "
         f"more --config.grad_accum_steps")
  return code


def report_json(report: Report, mfu: float = 0.4) -> dict[str, Any]:
  """The report as plain JSON values (for docs and scripts)."""
  mem = report.memory
  return dict(
      topology=report.tpu.accelerator_type, topology_name=report.tpu.topology_name,
      chips=report.tpu.chips, chip_config=report.tpu.generation.chip_config,
      mesh=report.mesh, batch_size=report.batch_size, text_len=report.text_len,
      seq_len=report.seq_len, attention_backend=report.attention_backend,
      params=report.params, hbm_bytes=report.tpu.hbm_bytes,
      memory=None if mem is None else dict(dataclasses.asdict(mem), total=mem.total),
      fits=report.fits, error=report.error, tpu_kernels=report.tpu_kernels,
      tflops_per_step=report.flops_per_step / 1e12,
      mfu=mfu, step_seconds=report.step_seconds(mfu), seconds=report.seconds)
