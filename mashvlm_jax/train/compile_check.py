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
  hbm_bandwidth: float  # HBM bandwidth per chip, bytes/s
  max_chips: int  # largest "<gen>-N" slice accepted (explicit shapes may go beyond)
  aliases: tuple[str, ...] = ()


# HBM bandwidth per chip: the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e, "HBM bandwidth"): v4 1200 GBps,
# v5p 2765 GBps, v5e 819 GBps, v6e 1640 GBps (GB = 1e9 bytes).
GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32, 1200e9, 4096),
    "v5p": Generation("v5p", 3, 2, "megacore", 95, 2765e9, 4096),
    "v5e": Generation("v5e", 2, 1, "default", 16, 819e9, 256, aliases=("v5litepod",)),
    "v6e": Generation("v6e", 2, 1, "default", 32, 1640e9, 256),
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

  @property
  def hbm_bandwidth(self) -> float:
    """HBM bytes/s per chip."""
    return self.generation.hbm_bandwidth


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


@dataclasses.dataclass(frozen=True)
class Cost:
  """XLA's cost analysis of the compiled step (``compiled.cost_analysis()``). The compiled
  program is the SPMD-partitioned one that each chip runs, so both numbers are per chip
  per step, rematerialised recomputation included."""
  flops: float
  bytes_accessed: float  # HBM traffic XLA estimates for the program

  @classmethod
  def from_analysis(cls, analysis) -> "Cost":
    """From ``compiled.cost_analysis()`` (a dict; older jax: a list of one dict)."""
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return cls(flops=float(analysis.get("flops", 0.0)),
               bytes_accessed=float(analysis.get("bytes accessed", 0.0)))


# Compiler options of the compiles whose cost is read. XLA's cost analysis counts a while
# loop's body once, and on larger meshes the SPMD partitioner turns all-gather + dot and
# dot + reduce-scatter into windowed-einsum loops (one partial matmul per step of a
# collective-permute ring): a 1-decoder-layer probe of the 7B step on v5p-64 read 1.85
# TFLOP per chip with them and 6.44 without (32 loops to none). Without them the chip does
# the same arithmetic after plain collectives; the memory figures come from the compile
# without these options.
COST_COMPILER_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                         "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def while_loops(hlo_text: str) -> int:
  """The number of while loops in a compiled module's text."""
  return len(re.findall(r"\swhile\(", hlo_text))


def step_cost(compiled, relower, seconds: dict | None = None,
              compiler_options: dict | None = None) -> tuple[Cost | None, str]:
  """(XLA's cost of the step, "") from a program without while loops. When ``compiled``
  (the step as it runs) has loops and ``relower`` is given, the program it returns (the
  same step lowered with its microbatch scan unrolled) is compiled with
  ``compiler_options`` (``COST_COMPILER_OPTIONS`` on TPU: no windowed-einsum loops),
  timed as seconds["cost compile"]. (None, why) when loops remain: XLA would count them
  once."""
  loops = while_loops(compiled.as_text())
  if loops and relower is not None:
    t0 = time.perf_counter()
    compiled = relower().compile(compiler_options=compiler_options)
    if seconds is not None:
      seconds["cost compile"] = time.perf_counter() - t0
    loops = while_loops(compiled.as_text())
  if loops:
    return None, (f"no cost: the compiled step keeps {loops} while loops, whose bodies "
                  f"XLA's cost analysis counts once")
  return Cost.from_analysis(compiled.cost_analysis()), ""


def roofline_seconds(cost: Cost, peak_flops: float, hbm_bandwidth: float) -> float:
  """Per-chip step time bound: max(flops / peak FLOP/s, bytes accessed / HBM bytes/s)."""
  return max(cost.flops / peak_flops, cost.bytes_accessed / hbm_bandwidth)


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
  # XLA's cost analysis per chip; None when XLA refused the program, the layers are
  # scanned (XLA counts a loop body once: ``depth_probe_cost``) or other loops remain
  # (``cost_note`` says which)
  cost: Cost | None = None
  cost_note: str = ""

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.memory.fits

  def step_seconds(self, mfu: float) -> float:
    """Step time if the slice runs at ``mfu`` of its bf16 peak."""
    return self.flops_per_step / (self.tpu.chips * self.peak_flops_per_chip * mfu)

  @property
  def compute_flops(self) -> float | None:
    """Per-chip FLOPs of the roofline: XLA's count, but never below the analytic model
    FLOPs per chip. XLA cannot see inside Mosaic kernels: with splash attention its count
    lacks the attention scores (4.1 TFLOP per chip of the 7B step on v5p-64, where it
    read 138.8 against 142.9 analytic without remat)."""
    if self.cost is None:
      return None
    return max(self.cost.flops, self.flops_per_step / self.tpu.chips)

  @property
  def roofline_seconds(self) -> float | None:
    """Roofline step time from XLA's per-chip cost (``roofline_seconds``), or None."""
    if self.cost is None:
      return None
    return roofline_seconds(dataclasses.replace(self.cost, flops=self.compute_flops),
                            self.peak_flops_per_chip, self.tpu.hbm_bandwidth)

  @property
  def roofline_mfu(self) -> float | None:
    """Analytic model FLOPs per step over what the slice's peak does in the roofline
    step time: the MFU that time implies."""
    seconds = self.roofline_seconds
    if not seconds:
      return None
    return self.flops_per_step / (self.tpu.chips * self.peak_flops_per_chip * seconds)


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
  if model_cfg.action_token.enabled:  # (verb, noun, action) ids, model/action_token.py
    shapes.update(class_labels=((batch_size, 3), jnp.int32))
  return {k: jax.ShapeDtypeStruct(s, d, sharding=shardings[k]) for k, (s, d) in shapes.items()}


def check(config: ml_collections.ConfigDict, topology: str, *,
          attention_backend: str | None = "splash", mesh: Mapping[str, int] | None = None,
          devices=None, for_cost: bool = False) -> Report:
  """Lowers and compiles the train step of ``config`` for ``topology``; see module doc.

  ``devices`` replaces the libtpu topology's devices (tests); everything else is built
  from the config exactly as ``trainer.train`` builds it. ``for_cost``: a compile read for
  its cost only (``depth_probe_cost``): the microbatch scan unrolled, and
  ``COST_COMPILER_OPTIONS`` on TPU.
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
  peak, _ = flops_lib.peak_flops_per_device(f"TPU {tpu.generation.name}", "tpu")
  report = Report(
      tpu=tpu, mesh=dict(zip(slice_mesh.axis_names, map(int, slice_mesh.devices.shape))),
      batch_size=batch_size, text_len=text_len,
      seq_len=setup.model_cfg.prefix_len + text_len,
      attention_backend=setup.model_cfg.attention_backend,
      params=mashvlm.count_params(setup.abstract_state.params),
      flops_per_step=batch_size * flops_lib.train_flops_per_row(setup.model_cfg, text_len),
      peak_flops_per_chip=peak, seconds=seconds)
  accum = int(config.grad_accum_steps)
  state = trainer.with_shardings(setup.abstract_state, setup.state_shardings)
  batch = abstract_batch(setup.model_cfg, batch_size, text_len, setup.batch_shardings)

  def lower(unroll_accum: bool):
    step = jax.jit(
        trainer.make_train_step(setup.model, setup.tx, setup.schedule, accum=accum,
                                trainable=setup.trainable, unroll_accum=unroll_accum),
        in_shardings=(setup.state_shardings, setup.batch_shardings),
        out_shardings=(setup.state_shardings, sharding.replicated(slice_mesh)),
        donate_argnums=(0,))
    with jax.set_mesh(slice_mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
      return step.lower(state, batch)

  # the step as it runs; a cost compile unrolls the microbatch scan (XLA counts a loop once)
  lowered = lower(unroll_accum=for_cost)
  seconds["lower"] = time.perf_counter() - t0
  report.tpu_kernels = lowered.as_text().count("tpu_custom_call")
  t1 = time.perf_counter()
  on_tpu = slice_mesh.devices.flat[0].platform == "tpu"
  cost_options = COST_COMPILER_OPTIONS if on_tpu else None
  try:
    compiled = lowered.compile(compiler_options=cost_options if for_cost else None)
  except Exception as e:  # XLA refuses programs that exceed HBM
    if not is_out_of_memory(e):
      raise
    report.error = str(e).strip().splitlines()[0][:2000]
    seconds["compile"] = time.perf_counter() - t1
    return report
  seconds["compile"] = time.perf_counter() - t1
  report.memory = Memory.from_stats(compiled.memory_analysis(), tpu.hbm_bytes)
  if not setup.model_cfg.scan_layers:  # a scanned stack's loop body is counted once
    relower = None  # a cost compile was already lowered and compiled for its cost
    if not for_cost and accum > 1:
      relower = lambda: lower(unroll_accum=True)  # noqa: E731
    elif not for_cost and on_tpu:  # windowed-einsum loops, if any: the same program
      relower = lambda: lowered  # noqa: E731
    report.cost, report.cost_note = step_cost(compiled, relower, seconds, cost_options)
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
      mfu=mfu, step_seconds=report.step_seconds(mfu), seconds=report.seconds,
      xla_cost_per_chip=None if report.cost is None else dataclasses.asdict(report.cost),
      cost_note=report.cost_note,
      hbm_bandwidth=report.tpu.hbm_bandwidth, roofline_seconds=report.roofline_seconds,
      roofline_mfu=report.roofline_mfu)


# ---------------------------------------------------------------- sweep


def parse_value(text: str, like=None):
  """A sweep value as a config override reads it: the type of the field's current value
  ``like`` (bool: true/false, int, float, str); for a field holding None, true/false,
  none, an int, a float, else the string."""
  text = text.strip()
  if isinstance(like, bool) or (like is None and text.lower() in ("true", "false")):
    if text.lower() not in ("true", "false"):
      raise ValueError(f"{text!r} is not true or false")
    return text.lower() == "true"
  if isinstance(like, str):
    return text
  if like is None and text.lower() in ("none", "null"):
    return None
  kinds = (int,) if isinstance(like, int) else (float,) if isinstance(like, float) else (
      int, float)
  for kind in kinds:
    try:
      return kind(text)
    except ValueError:
      pass
  if like is None:
    return text
  raise ValueError(f"{text!r} is not {'an int' if kinds == (int,) else 'a number'}")


def parse_sweep(text: str) -> tuple[str, list[str]]:
  """'model.remat_policy=none,dots,full' -> ('model.remat_policy', ['none', 'dots', 'full'])
  (values as written; ``with_value`` types them)."""
  key, sep, values = text.partition("=")
  items = [v.strip() for v in values.split(",") if v.strip()]
  if not sep or not re.fullmatch(r"[A-Za-z_][\w.]*", key.strip()) or not items:
    raise ValueError(f"--sweep {text!r} is not KEY=V1,V2,..., e.g. "
                     f"--sweep=model.remat_policy=none,dots,full")
  return key.strip(), items


def with_value(config: ml_collections.ConfigDict, key: str,
               text: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the dotted ``key`` set to ``text`` parsed as its current
  type (``parse_value``; references such as data.text_len -> text_len kept); a ValueError
  names the key when the config lacks it or the value does not parse."""
  import copy
  config = copy.deepcopy(config)
  node, parts = config, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "the config"
      known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) \
          else "(not a section)"
      raise ValueError(f"--sweep key {key!r}: {where} has no {part!r} (keys: {known})")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise ValueError(f"--sweep key {key!r} is a section, not a value")
  try:
    setattr(node, parts[-1], parse_value(text, current))
  except (TypeError, ValueError) as e:
    raise ValueError(f"--sweep {key}={text}: {e} (current value {current!r})") from None
  return config


def variant_label(setting: Mapping[str, Any]) -> str:
  return " ".join(f"{k}={v}" for k, v in setting.items())


def sweep_variants(config: ml_collections.ConfigDict, sweeps: list[tuple[str, list]]
                   ) -> list[tuple[dict, ml_collections.ConfigDict]]:
  """Every combination of the sweep values (one key: its values in order), each as
  (setting, config with the training defaults filled and the setting applied). The model
  section of each is validated here, so a bad value fails before anything compiles."""
  import itertools
  from mashvlm_jax.model.config import ModelConfig
  base = defaults.training_defaults(config)
  keys = [k for k, _ in sweeps]
  if len(set(keys)) != len(keys):
    raise ValueError(f"--sweep names a key twice: {keys}")
  out = []
  for values in itertools.product(*(v for _, v in sweeps)):
    setting = dict(zip(keys, values))
    variant = base
    for key, value in setting.items():
      variant = with_value(variant, key, value)
    try:
      ModelConfig.from_dict(variant.model).validate()
    except (TypeError, ValueError) as e:
      raise ValueError(f"--sweep variant {variant_label(setting)}: {e}") from None
    out.append((setting, variant))
  return out


def probe_config(config: ml_collections.ConfigDict, llm_layers: int,
                 vision_layers: int | None) -> ml_collections.ConfigDict:
  """``config`` unrolled (scan_layers False) at ``llm_layers`` decoder layers and, unless
  None, a vision tower that runs ``vision_layers`` layers (feature_layer = num_layers)."""
  import copy
  config = copy.deepcopy(config)
  config.model.scan_layers = False
  config.model.llm.num_layers = llm_layers
  if vision_layers is not None:
    config.model.vision.num_layers = vision_layers
    config.model.vision.feature_layer = vision_layers
  return config


def extrapolate_cost(base: Cost, deeper_llm: Cost, deeper_vision: Cost | None,
                     llm_layers: int, vision_layers: int) -> Cost:
  """Cost at full depth, linear in depth: base is (1, 1) layers (or (1, 0) without
  vision layers), deeper_llm one more decoder layer, deeper_vision one more vision layer."""
  def at_depth(field):
    value = getattr(base, field) + (llm_layers - 1) * (
        getattr(deeper_llm, field) - getattr(base, field))
    if deeper_vision is not None:
      value += (vision_layers - 1) * (getattr(deeper_vision, field) - getattr(base, field))
    return value
  return Cost(flops=at_depth("flops"), bytes_accessed=at_depth("bytes_accessed"))


def depth_probe_cost(config: ml_collections.ConfigDict, topology: str, *,
                     attention_backend: str | None, mesh: Mapping[str, int] | None,
                     devices=None) -> Cost:
  """XLA's cost of ``config``'s step as if its layers were unrolled. XLA's cost analysis
  counts a while loop's body once, so a scanned layer stack (scan_layers True) reports one
  layer; this compiles the step unrolled at 1 and 2 decoder layers (and 1 and 2 vision
  layers when the tower runs any) and extrapolates linearly to the config's depth."""
  from mashvlm_jax.model.config import ModelConfig
  cfg = ModelConfig.from_dict(config.model)
  vision_layers = cfg.vision.layers_to_run
  probes = [(1, 1 if vision_layers else None), (2, 1 if vision_layers else None)]
  if vision_layers > 1:
    probes.append((1, 2))
  costs = []
  for llm_layers, vis in probes:
    report = check(probe_config(config, llm_layers, vis), topology,
                   attention_backend=attention_backend, mesh=mesh, devices=devices,
                   for_cost=True)
    if report.cost is None:
      why = report.cost_note or f"refused by XLA: {report.error}"
      raise RuntimeError(f"depth probe ({llm_layers} decoder, {vis} vision layers): {why}")
    costs.append(report.cost)
  deeper_vision = costs[2] if len(costs) > 2 else None
  return extrapolate_cost(costs[0], costs[1], deeper_vision, cfg.llm.num_layers,
                          vision_layers)


@dataclasses.dataclass
class SweepRow:
  """One variant of a sweep: its setting and report, or the error that stopped it."""
  setting: dict[str, Any]
  report: Report | None = None
  error: str | None = None
  cost_source: str = "compiled step"
  fastest: bool = False

  @property
  def label(self) -> str:
    return variant_label(self.setting)


def mark_fastest(rows: list[SweepRow]) -> SweepRow | None:
  """Sets ``fastest`` on the fitting row with the smallest roofline step time."""
  fitting = [r for r in rows if r.report is not None and r.report.fits
             and r.report.roofline_seconds is not None]
  for row in rows:
    row.fastest = False
  if not fitting:
    return None
  best = min(fitting, key=lambda r: r.report.roofline_seconds)
  best.fastest = True
  return best


def run_variants(variants, topology: str, *, attention_backend: str | None,
                 mesh: Mapping[str, int] | None, echo_error, devices=None) -> list[SweepRow]:
  """Compiles every (setting, config) with ``check``; a variant that fails to build or
  compile becomes a row with its error (named by the variant), never the end of the
  sweep. A missing libtpu (TopologyError) stops it."""
  rows = []
  for setting, variant in variants:
    row = SweepRow(setting)
    backend = None if "model.attention_backend" in setting else attention_backend
    try:
      row.report = check(variant, topology, attention_backend=backend, mesh=mesh,
                         devices=devices)
      if row.report.memory is not None and variant.model.get("scan_layers", True):
        row.report.cost = depth_probe_cost(variant, topology, attention_backend=backend,
                                           mesh=mesh, devices=devices)
        row.cost_source = "unrolled 1-2 layer probes, linear in depth"
    except TopologyError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"
      echo_error(f"mashvlm compile --sweep: variant {row.label}: {row.error}")
    rows.append(row)
  mark_fastest(rows)
  return rows


def format_sweep(rows: list[SweepRow]) -> str:
  """The sweep as a markdown table: per-chip memory, XLA's per-chip cost, the roofline
  step time and the MFU it implies."""
  head = ("| variant | fits | total GiB | args GiB | temps GiB | HBM GiB | XLA TFLOP/chip | "
          "XLA GB accessed/chip | compute s | HBM s | roofline s/step | MFU | |")
  lines = [head, "|" + "---|" * head.count(" |")]
  for row in rows:
    r = row.report
    if r is None:
      lines.append(f"| {row.label} | error | {row.error} |" + " |" * 10)
      continue
    hbm = f"{r.tpu.generation.hbm_gib:g}"
    if r.memory is None:
      mem = "- | - | - (XLA: out of memory)"
    else:
      m = r.memory
      mem = f"{m.total / GIB:.2f} | {m.arguments / GIB:.2f} | {m.temporaries / GIB:.2f}"
    if r.cost is None:
      cost = f"- | - | - | - | - | - {r.cost_note}".rstrip()
    else:
      c = r.cost
      cost = (f"{c.flops / 1e12:.4g} | {c.bytes_accessed / 1e9:.4g} | "
              f"{r.compute_flops / r.peak_flops_per_chip:.4g} | "
              f"{c.bytes_accessed / r.tpu.hbm_bandwidth:.4g} | {r.roofline_seconds:.4g} | "
              f"{100 * r.roofline_mfu:.1f}%")
    mark = "**fastest that fits**" if row.fastest else ""
    lines.append(f"| {row.label} | {'yes' if r.fits else 'NO'} | {mem} | {hbm} | {cost} | "
                 f"{mark} |")
  first = next((row.report for row in rows if row.report is not None), None)
  if first is not None:
    t = first.tpu
    lines.append("")
    lines.append(
        f"{t.accelerator_type} ({t.chips} chips): peak {first.peak_flops_per_chip / 1e12:g} "
        f"TFLOP/s and HBM {t.hbm_bandwidth / 1e9:g} GB/s per chip. XLA's cost analysis is "
        f"per chip per step (remat recomputation included, Mosaic kernels such as splash "
        f"not); compute s = max(XLA FLOPs, analytic FLOPs per chip) / peak; roofline = "
        f"max(compute s, bytes / HBM bandwidth); MFU = analytic model FLOPs (train/flops.py, "
        f"{first.flops_per_step / 1e12:,.4g} TFLOP/step for the first variant) / (chips x "
        f"peak x roofline).")
    sources = sorted({row.cost_source for row in rows if row.report is not None})
    lines.append("Cost from: " + "; ".join(sources) + ".")
  return "\n".join(lines)


def sweep_json(rows: list[SweepRow], mfu: float = 0.4) -> dict[str, Any]:
  out = []
  for row in rows:
    item = dict(variant=row.label, setting=row.setting, error=row.error,
                fastest=row.fastest, cost_source=row.cost_source)
    r = row.report
    if r is not None:
      item.update(report_json(r, mfu))
    out.append(item)
  return dict(rows=out)


def sweep_exit_code(rows: list[SweepRow]) -> int:
  """2 when a variant failed to build or compile, else 0 when one fits, 1 otherwise."""
  if any(row.error for row in rows):
    return 2
  return 0 if any(row.report.fits for row in rows) else 1


def run_sweep(config: ml_collections.ConfigDict, topology: str, sweep_texts: list[str], *,
              mesh_text: str | None = None, attention_backend: str | None = "splash",
              mfu: float = 0.4, json_path: str | None = None, echo=print,
              echo_error=None, devices=None) -> int:
  """``mashvlm compile --sweep=KEY=V1,V2,..`` (repeat for a grid): compiles every variant
  for ``topology``, prints the markdown table (``format_sweep``), optionally the JSON;
  exit status ``sweep_exit_code``, or 2 for bad arguments (before any compile)."""
  echo_error = echo_error or (lambda line: print(line, file=sys.stderr, flush=True))
  try:
    mesh = parse_mesh(mesh_text) if mesh_text else None
    parse_topology(topology)
    variants = sweep_variants(config, [parse_sweep(t) for t in sweep_texts])
    rows = run_variants(variants, topology, attention_backend=attention_backend, mesh=mesh,
                        echo_error=echo_error, devices=devices)
  except (ValueError, TopologyError) as e:
    echo_error(f"mashvlm compile: {e}")
    return 2
  echo(format_sweep(rows))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(sweep_json(rows, mfu), f, indent=2)
  return sweep_exit_code(rows)
