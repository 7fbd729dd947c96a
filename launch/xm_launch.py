"""Launch ``mashvlm train`` with XManager, locally or on Cloud TPU; sweeps are work units.

  xmanager launch launch/xm_launch.py -- --config=configs/tiny_synthetic.py \\
      --workdir=/tmp/mash --target=local --sweep=optim.lr=1e-4,3e-4
  xmanager launch launch/xm_launch.py -- --config=configs/mashvlm_7b.py --target=cloud_tpu \\
      --topology=v5p-64 --workdir=gs://my-bucket/mash7b \\
      --image_registry=us-docker.pkg.dev/my-project/mashvlm

(``python -m launch.xm_launch ...`` from the repository root does the same.)

Targets:
  local         xm_local's Local executor runs this Python with the installed package.
  local_docker  xm_local's Local executor runs a container built from the project
                (pyproject.toml, mashvlm_jax/, configs/) and its requirements.
  cloud_tpu     XManager on Cloud's KubernetesJobExecutor: a GKE TPU slice of --topology,
                one pod per host, jax.distributed detecting the slice (--distributed=auto).
                This is XManager's executor for current Cloud TPUs (v4, v5e, v5p, v6e);
                its Vertex AI executor maps only TPU v2/v3 and nothing in XManager creates
                TPU VMs: for those use launch/gcloud_tpu.py.

Each set of config overrides is one work unit with its own workdir (WORKDIR/1, WORKDIR/2,
... when there is more than one), so every unit resumes from its own checkpoints. Every set
is checked before anything is built: the config loads with it and, on cloud_tpu, its mesh
and batch fit the slice.
"""
from __future__ import annotations

import dataclasses
import itertools
import pathlib
import shutil
import sys
import tempfile
from typing import Sequence

from absl import app
from absl import flags

if __package__ in (None, ""):  # run as a file (`xmanager launch`): make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import topology  # noqa: E402
from launch.gcloud_tpu import SHIPPED, config_in_source  # noqa: E402
from launch.topology import LaunchError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ("local", "local_docker", "cloud_tpu")
SOURCE = "mashvlm"  # the staged source folder, and /workdir/mashvlm in the image


@dataclasses.dataclass(frozen=True)
class Settings:
  config: str
  workdir: str
  target: str = "local"
  overrides: tuple[str, ...] = ()  # KEY=VALUE for every work unit
  sweep: tuple[str, ...] = ()  # KEY=V1,V2,... : the cartesian product makes the work units
  topology: str = ""  # cloud_tpu: e.g. v5p-64
  title: str = ""
  image_registry: str = ""  # cloud_tpu: where the image is pushed, GKE pulls from
  image_name: str = "mashvlm-jax"
  base_image: str = "python:3.11-slim"
  pip_extra: tuple[str, ...] = ()
  python: str = sys.executable  # local: the interpreter that runs mashvlm_jax.cli
  repo: pathlib.Path = REPO


@dataclasses.dataclass(frozen=True)
class Unit:
  """One work unit: its overrides and its workdir."""
  index: int  # 1-based, the order XManager numbers work units in
  overrides: tuple[str, ...]
  workdir: str


# ----------------------------------------------------------------------- pure planning


def parse_sweep(items: Sequence[str]) -> list[tuple[str, list[str]]]:
  """``["optim.lr=1e-4,3e-4"]`` -> ``[("optim.lr", ["1e-4", "3e-4"])]``."""
  axes, seen = [], set()
  for item in items:
    key, _, values = topology.normalize_override(item).partition("=")
    options = [v.strip() for v in values.split(",")]
    if not all(options):
      raise LaunchError(f"--sweep={item}: give KEY=V1,V2,... with no empty value")
    if key in seen:
      raise LaunchError(f"--sweep: {key} is swept twice; list all its values in one --sweep")
    seen.add(key)
    axes.append((key, options))
  return axes


def work_units(s: Settings) -> list[Unit]:
  """One Unit per element of the product of the sweeps (one Unit without a sweep)."""
  base = tuple(topology.normalize_override(o) for o in s.overrides)
  axes = parse_sweep(s.sweep)
  combos = list(itertools.product(*[[f"{k}={v}" for v in values] for k, values in axes]))
  workdir = s.workdir.rstrip("/")
  return [Unit(i, base + combo, f"{workdir}/{i}" if len(combos) > 1 else workdir)
          for i, combo in enumerate(combos, start=1)]


def check(s: Settings) -> tuple[list[Unit], topology.Slice | None]:
  """Every check, before anything is built; LaunchError says what to fix."""
  if s.target not in TARGETS:
    raise LaunchError(f"--target={s.target!r}: choose one of {', '.join(TARGETS)}")
  units = work_units(s)
  slc = None
  if s.target == "cloud_tpu":
    if not s.topology:
      raise LaunchError("--target=cloud_tpu needs --topology, e.g. v5p-64")
    if not s.image_registry:
      raise LaunchError("--target=cloud_tpu needs --image_registry, the registry GKE pulls "
                        "from, e.g. us-docker.pkg.dev/my-project/mashvlm")
    slc = topology.parse_slice(s.topology)
    topology.check_bucket_path(s.workdir)
  elif not s.workdir:
    raise LaunchError("--workdir is required")
  for unit in units:
    try:
      _check_unit(s, unit, slc)
    except LaunchError as e:
      raise LaunchError(f"work unit {unit.index} ({' '.join(unit.overrides) or 'no overrides'})"
                        f": {e}") from None
  return units, slc


def _check_unit(s: Settings, unit: Unit, slc: topology.Slice | None) -> None:
  """The config loads with the unit's overrides and, on a slice, fits it."""
  config = topology.load_config(s.config, unit.overrides)
  if slc is not None:
    topology.check_fit(config, slc)
    errors, _ = topology.shared_path_problems(config, local_copies=False)
    if errors:
      raise LaunchError("; ".join(errors))


def config_arg(s: Settings) -> str:
  """--config= as the job sees it: absolute locally, relative to the staged source in images."""
  if s.target == "local":
    path, sep, arg = s.config.partition(":")
    return str(pathlib.Path(path).resolve()) + sep + arg
  return config_in_source(s.config, s.repo)[1]


def train_args(s: Settings, unit: Unit) -> dict:
  """Flags of `mashvlm train` for one work unit (after the `train` command word)."""
  args = {"config": config_arg(s), "workdir": unit.workdir}
  if s.target == "cloud_tpu":
    args["distributed"] = "auto"
  for override in unit.overrides:
    key, _, value = override.partition("=")
    args[f"config.{key}"] = value
  return args


def docker_instructions(s: Settings) -> list[str]:
  """Image steps: the staged source, installed with its requirements (pyproject)."""
  extras = "[tpu]" if s.target == "cloud_tpu" else ""
  pip = " ".join([f'".{extras}"', *(f'"{p}"' for p in s.pip_extra)])
  return ["RUN python -m pip install --no-cache-dir --upgrade pip",
          f"COPY {SOURCE}/ /workdir/{SOURCE}/",
          f"WORKDIR /workdir/{SOURCE}",
          f"RUN python -m pip install --no-cache-dir {pip}"]


def stage_source(s: Settings, into: pathlib.Path) -> pathlib.Path:
  """Copies what the image needs (and an out-of-repo config) into INTO/mashvlm."""
  dest = into / SOURCE
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in SHIPPED:
    src = s.repo / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=ignore)
    else:
      dest.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / name)
  outside, ref = config_in_source(s.config, s.repo)
  if outside is not None:
    shutil.copy2(outside / ref.partition(":")[0], dest / ref.partition(":")[0])
  return dest


# ------------------------------------------------------------------------ XManager side


def packageable(s: Settings, source: pathlib.Path | None = None):
  """The xm.Packageable of the job: this Python (local) or an image of the project."""
  from xmanager import xm
  from xmanager import xm_local
  if s.target == "local":
    return xm.binary(path=s.python, args=["-m", "mashvlm_jax.cli"],
                     executor_spec=xm_local.LocalSpec())
  if s.target == "local_docker":
    spec = xm_local.LocalSpec()
  else:
    from xmanager import xm_cloud
    spec = xm_cloud.KubernetesJobExecutorSpec(container_registry=s.image_registry,
                                              image_name=s.image_name)
  return xm.python_container(
      executor_spec=spec, entrypoint=xm.ModuleName("mashvlm_jax.cli"),
      path=str(source or s.repo), base_image=s.base_image,
      docker_instructions=docker_instructions(s))


def executor(s: Settings, slc: topology.Slice | None):
  """Local, or a GKE TPU slice with one replica (pod) per host."""
  from xmanager import xm
  from xmanager import xm_local
  if s.target != "cloud_tpu":
    return xm_local.Local()
  from xmanager import xm_cloud
  requirements = xm.JobRequirements({slc.xm_resource: slc.physical_topology},
                                    replicas=slc.hosts)
  return xm_cloud.KubernetesJobExecutor(requirements=requirements)


def add_work_units(experiment, s: Settings, units: Sequence[Unit], slc, source=None) -> None:
  """Packages the job once and adds one work unit per Unit (nothing runs until launch)."""
  from xmanager import xm
  [executable] = experiment.package([packageable(s, source)])
  run_on = executor(s, slc)
  for unit in units:
    args = xm.merge_args(["train"], train_args(s, unit))
    experiment.add(xm.Job(executable, executor=run_on, args=args, name="train"))


def create_experiment(s: Settings):
  title = s.title or f"mashvlm {pathlib.Path(s.config.partition(':')[0]).stem}"
  if s.target == "cloud_tpu":
    from xmanager import xm_cloud
    return xm_cloud.create_experiment(experiment_title=title)
  from xmanager import xm_local
  return xm_local.create_experiment(experiment_title=title)


def run(s: Settings) -> None:
  """Checks, prints the work units, then creates the experiment and adds them."""
  units, slc = check(s)
  if slc is not None:
    print(slc.describe())
  for unit in units:
    print(f"work unit {unit.index}: {' '.join(unit.overrides) or '(no overrides)'} -> "
          f"{unit.workdir}")
  with tempfile.TemporaryDirectory(prefix="mashvlm-xm-") as staging:
    source = stage_source(s, pathlib.Path(staging)) if s.target != "local" else None
    with create_experiment(s) as experiment:
      add_work_units(experiment, s, units, slc, source)


# -------------------------------------------------------------------------------- main


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """This script's flags; defined only when it runs as the launch script (see the end)."""
  flags.DEFINE_string("config", None, "configs/NAME.py[:ARGS]", flag_values=values)
  flags.DEFINE_string("workdir", "", "Workdir; with a sweep, units use WORKDIR/1, /2, ...",
                      flag_values=values)
  flags.DEFINE_enum("target", "local", TARGETS, "Where the work units run.",
                    flag_values=values)
  flags.DEFINE_multi_string("override", [], "KEY=VALUE config override (every unit).",
                            flag_values=values)
  flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: one work unit per combination.",
                            flag_values=values)
  flags.DEFINE_string("topology", "", "cloud_tpu slice, e.g. v5p-64 or v4:8x8x12.",
                      flag_values=values)
  flags.DEFINE_string("title", "", "Experiment title.", flag_values=values)
  flags.DEFINE_string("image_registry", "", "cloud_tpu: the registry GKE pulls from.",
                      flag_values=values)
  flags.DEFINE_string("image_name", "mashvlm-jax", "Image name.", flag_values=values)
  flags.DEFINE_string("base_image", "python:3.11-slim", "Base image.", flag_values=values)
  flags.DEFINE_multi_string("pip_extra", [], "Extra pip requirement for the image.",
                            flag_values=values)


def settings_from_flags(values: flags.FlagValues = flags.FLAGS) -> Settings:
  if not values.config:
    raise LaunchError("--config is required, e.g. --config=configs/tiny_synthetic.py")
  return Settings(config=values.config, workdir=values.workdir, target=values.target,
                  overrides=tuple(values.override), sweep=tuple(values.sweep),
                  topology=values.topology, title=values.title,
                  image_registry=values.image_registry, image_name=values.image_name,
                  base_image=values.base_image, pip_extra=tuple(values.pip_extra))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f"xm_launch: unexpected arguments {list(argv[1:])}")
  try:
    import xmanager  # noqa: F401
  except ImportError:
    raise SystemExit("xm_launch: xmanager is not installed: pip install -e '.[launch]'") from None
  try:
    run(settings_from_flags())
  except LaunchError as e:
    raise SystemExit(f"xm_launch: error: {e}") from None


# Flags exist only for the launch script: `python -m launch.xm_launch` (__main__) or
# `xmanager launch launch/xm_launch.py`, which imports this file as `xm_launch`. Imported
# as the library `launch.xm_launch` it defines none, so it never collides with mashvlm's.
if __name__ in ("__main__", "xm_launch"):
  define_flags()
  try:  # XManager's own flags (--xm_launch_script, --xm_*), parsed with ours
    from xmanager import xm as _xm  # noqa: F401
    from xmanager import xm_flags as _xm_flags  # noqa: F401
  except ImportError:
    pass

if __name__ == "__main__":
  app.run(main)
