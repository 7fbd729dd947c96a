"""Run ``mashvlm train`` on a Cloud TPU VM slice with gcloud; relaunch after preemption.

  python -m launch.gcloud_tpu --name=mash7b --zone=us-east5-a --project=my-project \\
      --topology=v5p-64 --config=configs/mashvlm_7b.py --workdir=gs://my-bucket/mash7b \\
      [--override=optim.lr=2e-5 ...] [--mode=queued|vm] [--provisioning=spot] [--dry-run]

Steps: check the bucket, package the project (tar), create the queued resource (or TPU VM)
and wait until it is up, copy and install the project on every worker, start the same
``mashvlm train`` on every worker (``--worker=all``), then poll: the slice's state, worker
0's new log bytes and exit status. When the slice is preempted (VM PREEMPTED/TERMINATED,
queued resource SUSPENDED/FAILED) it is deleted and the steps run again; the trainer
resumes from the newest checkpoint in the gs:// workdir. ``--dry-run`` prints every
command instead. Everything is checked (topology vs the config's mesh and batch, bucket
path, gcloud on PATH) before anything is created.
"""
from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a file: make `launch` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import topology  # noqa: E402
from launch.topology import LaunchError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "mashvlm_jax", "configs")
TARBALL = "mashvlm-src.tar.gz"
REMOTE_SRC = "$HOME/mashvlm"
REMOTE_VENV = "$HOME/mashvlm-venv"
REMOTE_LOG = "$HOME/mashvlm-train.log"
REMOTE_EXIT = "$HOME/mashvlm-train.exit"
METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes"
UP = {"queued": "ACTIVE", "vm": "READY"}
LOST = {"queued": ("SUSPENDED", "FAILED"), "vm": ("PREEMPTED", "TERMINATED")}
MISSES_BEFORE_LOST = 3  # describe failures in a row before the slice counts as gone
PROVISIONING = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The command line, unresolved."""
  name: str
  zone: str
  topology: str
  config: str
  workdir: str
  project: str = ""
  overrides: tuple[str, ...] = ()
  mode: str = "queued"  # queued resource | plain TPU VM
  provisioning: str = "on-demand"
  runtime_version: str = ""  # default: the generation's
  distributed: str = "auto"  # auto: JAX detects the pod | metadata: explicit MASHVLM_* env
  coordinator_port: int = 8476
  python: str = "python3.11"
  apt_packages: str = "python3.11 python3.11-venv"
  pip_extra: tuple[str, ...] = ()
  worker_setup: str = ""  # shell command run on every worker after installing
  staging_dir: str = ""
  poll_seconds: float = 60.0
  max_relaunches: int = 5
  keep: bool = False
  attach: bool = False
  dry_run: bool = False
  repo: pathlib.Path = REPO


@dataclasses.dataclass(frozen=True)
class Launch:
  """Settings after every check: what the commands are built from."""
  settings: Settings
  slice: topology.Slice
  fit: topology.Fit
  warnings: tuple[str, ...]
  config_dir: pathlib.Path | None  # set when the config file is outside the repo
  config_ref: str  # --config= on the workers
  staging: str
  bucket: str


@dataclasses.dataclass(frozen=True)
class Result:
  returncode: int
  stdout: str = ""
  stderr: str = ""


Runner = Callable[[Sequence[str]], Result]


class _Lost(Exception):
  """The slice went away (preempted, failed, deleted) while bringing it up."""

  def __init__(self, state: str):
    super().__init__(state)
    self.state = state


# ----------------------------------------------------------------------------- checks


def _check_settings(s: Settings, which: Callable[[str], str | None]) -> None:
  if not s.dry_run and which("gcloud") is None:
    raise LaunchError("gcloud is not installed or not on PATH: install the Google Cloud "
                      "SDK (https://cloud.google.com/sdk/docs/install) and run `gcloud auth "
                      "login`, or add --dry-run to print the commands")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?", s.name or ""):
    raise LaunchError(f"--name={s.name!r}: use lowercase letters, digits and dashes, starting "
                      f"with a letter (it names the TPU VM and the queued resource)")
  if not s.zone:
    raise LaunchError("--zone is required, e.g. us-east5-a (TPU types exist in few zones)")
  for value, allowed, flag in ((s.mode, UP, "--mode"), (s.provisioning, PROVISIONING,
                                                          "--provisioning"),
                               (s.distributed, ("auto", "metadata"), "--distributed")):
    if value not in allowed:
      raise LaunchError(f"{flag}={value!r}: choose one of {', '.join(allowed)}")


def prepare(s: Settings, which: Callable[[str], str | None] = shutil.which) -> Launch:
  """Checks everything that can be checked locally; LaunchError says what to fix."""
  _check_settings(s, which)
  slc = topology.parse_slice(s.topology)
  bucket = topology.check_bucket_path(s.workdir)
  config = topology.load_config(s.config, s.overrides)
  fit = topology.check_fit(config, slc)
  _, warnings = topology.shared_path_problems(config, local_copies=True)  # --worker_setup
  config_dir, config_ref = config_in_source(s.config, s.repo)
  staging = s.staging_dir or f"{tempfile.gettempdir()}/mashvlm-launch-{s.name}"
  return Launch(s, slc, fit, tuple(warnings), config_dir, config_ref, staging, bucket)


def config_in_source(spec: str, repo: pathlib.Path) -> tuple[pathlib.Path | None, str]:
  """(folder to ship it from if outside the repo, --config= in the shipped source)."""
  path, sep, arg = spec.partition(":")
  file = pathlib.Path(path).resolve()
  repo = repo.resolve()
  if file.is_relative_to(repo):
    return None, file.relative_to(repo).as_posix() + sep + arg
  return file.parent, file.name + sep + arg


# ---------------------------------------------------------------------------- commands


def _gcloud(kind: str, *words: str) -> list[str]:
  """gcloud compute tpus queued-resources|tpu-vm WORDS."""
  return ["gcloud", "compute", "tpus", "queued-resources" if kind == "qr" else "tpu-vm", *words]


def _location(l: Launch) -> list[str]:
  project = [f"--project={l.settings.project}"] if l.settings.project else []
  return [f"--zone={l.settings.zone}", *project]


def bucket_command(l: Launch) -> list[str]:
  return ["gcloud", "storage", "buckets", "describe", f"gs://{l.bucket}",
          "--format=value(name)"]


def package_command(l: Launch) -> list[str]:
  extra = ["-C", str(l.config_dir), l.config_ref.partition(":")[0]] if l.config_dir else []
  return ["tar", "-czf", f"{l.staging}/{TARBALL}", "--exclude=__pycache__", "-C",
          str(l.settings.repo), *SHIPPED, *extra]


def create_command(l: Launch) -> list[str]:
  s = l.settings
  version = s.runtime_version or l.slice.runtime_version
  provisioning = PROVISIONING[s.provisioning]
  if s.mode == "queued":
    return [*_gcloud("qr", "create", s.name), f"--node-id={s.name}", *_location(l),
            f"--accelerator-type={l.slice.accelerator_type}", f"--runtime-version={version}",
            *provisioning]
  return [*_gcloud("vm", "create", s.name), *_location(l),
          f"--accelerator-type={l.slice.accelerator_type}", f"--version={version}",
          *provisioning]


def state_command(l: Launch) -> list[str]:
  if l.settings.mode == "queued":
    return [*_gcloud("qr", "describe", l.settings.name), *_location(l),
            "--format=value(state.state)"]
  return [*_gcloud("vm", "describe", l.settings.name), *_location(l),
          "--format=value(state)"]


def delete_command(l: Launch) -> list[str]:
  if l.settings.mode == "queued":
    return [*_gcloud("qr", "delete", l.settings.name), *_location(l), "--force", "--quiet"]
  return [*_gcloud("vm", "delete", l.settings.name), *_location(l), "--quiet"]


def scp_command(l: Launch) -> list[str]:
  return [*_gcloud("vm", "scp", f"{l.staging}/{TARBALL}", f"{l.settings.name}:{TARBALL}"),
          "--worker=all", *_location(l), "--quiet"]


def ssh_command(l: Launch, worker: str, script: str) -> list[str]:
  """--quiet: gcloud makes its ssh key without asking (nobody sees a prompt here)."""
  return [*_gcloud("vm", "ssh", l.settings.name), f"--worker={worker}", *_location(l),
          "--quiet", f"--command={script}"]


def _dquote(text: str) -> str:
  """Double-quoted for a POSIX shell (worker scripts keep single quotes out)."""
  return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def install_script(l: Launch) -> str:
  s = l.settings
  steps = []
  if s.apt_packages.strip():
    apt = "sudo DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600"
    steps.append(f"({apt} update && {apt} install -y {s.apt_packages.strip()}) > /dev/null")
  pip = f"{REMOTE_VENV}/bin/pip install -q"
  extra = "".join(" " + _dquote(p) for p in s.pip_extra)
  steps += [f"rm -rf {REMOTE_SRC}", f"mkdir -p {REMOTE_SRC}",
            f"tar -xzf $HOME/{TARBALL} -C {REMOTE_SRC}", f"{s.python} -m venv {REMOTE_VENV}",
            f"{pip} --upgrade pip", f'{pip} "{REMOTE_SRC}[tpu]"{extra}']
  if s.worker_setup.strip():
    steps.append(f"({s.worker_setup.strip()})")
  return " && ".join(steps)


def train_argv(l: Launch) -> list[str]:
  """The arguments of `mashvlm train` on every worker."""
  mode = "auto" if l.settings.distributed == "auto" else "explicit"
  return ["train", f"--config={l.config_ref}", f"--workdir={l.settings.workdir}",
          f"--distributed={mode}"] + [
              f"--config.{topology.normalize_override(o)}" for o in l.settings.overrides]


def coordinator_env(l: Launch) -> str:
  """Explicit jax.distributed settings read from the TPU VM metadata on each worker."""
  get = f"curl -s -H Metadata-Flavor:Google {METADATA}"
  return (f"export MASHVLM_PROCESS_ID=$({get}/agent-worker-number) "
          f"MASHVLM_NUM_PROCESSES={l.slice.hosts} "
          f"MASHVLM_COORDINATOR_ADDRESS=$({get}/worker-network-endpoints"
          f" | cut -d, -f1 | cut -d: -f3):{l.settings.coordinator_port}")


def start_script(l: Launch) -> str:
  """Starts training in the background, detached from ssh; writes the exit code."""
  train = " ".join([f"{REMOTE_VENV}/bin/python", "-m", "mashvlm_jax.cli",
                    *map(shlex.quote, train_argv(l))])
  env = [coordinator_env(l)] if l.settings.distributed == "metadata" else []
  steps = " && ".join([f"cd {REMOTE_SRC}", f"rm -f {REMOTE_EXIT}", *env, 'trap "" HUP',
                       f"{train} > {REMOTE_LOG} 2>&1"])
  # One subshell, all its output redirected, in the background: ssh returns at once.
  return f"({steps}; echo $? > {REMOTE_EXIT}) > /dev/null 2>&1 < /dev/null &"


def poll_script(offset: int) -> str:
  """Worker 0: first line `running` or the exit code, then the log from byte ``offset``."""
  return (f"cat {REMOTE_EXIT} 2>/dev/null || echo running; "
          f"tail -c +{offset + 1} {REMOTE_LOG} 2>/dev/null || true")


# ----------------------------------------------------------------------------- dry run


def dry_run_lines(l: Launch) -> list[str]:
  """Every command of a launch, in order, with `#` notes: what --dry-run prints."""
  s = l.settings
  kind = "queued resource" if s.mode == "queued" else "TPU VM"
  j = shlex.join
  coordinator = ("JAX detects the pod: --distributed=auto" if s.distributed == "auto" else
                 "coordinator from the TPU metadata: --distributed=explicit")
  lines = [f"# {l.slice.describe()}", f"# {l.fit.describe()}"]
  lines += [f"# warning: {w}" for w in l.warnings]
  lines += ["# check the bucket", j(bucket_command(l)),
            "# package the project", f"mkdir -p {shlex.quote(l.staging)}", j(package_command(l)),
            f"# create the {kind}, then poll until it is {UP[s.mode]}", j(create_command(l)),
            j(state_command(l)),
            "# copy and install the project on every worker", j(scp_command(l)),
            j(ssh_command(l, "all", install_script(l))),
            f"# start training on every worker ({coordinator})",
            j(ssh_command(l, "all", start_script(l))),
            f"# every {s.poll_seconds:g}s: the {kind}'s state, then worker 0's exit status "
            f"and new log bytes", j(state_command(l)), j(ssh_command(l, "0", poll_script(0))),
            f"# when it is {'/'.join(LOST[s.mode])} (at most {s.max_relaunches} times): "
            f"delete, then create, install and start again; training resumes from "
            f"{s.workdir}", j(delete_command(l))]
  lines += (["# when training is done: keep the slice (--keep)"] if s.keep else
            ["# when training is done: delete", j(delete_command(l))])
  return lines


# ------------------------------------------------------------------------------ launch


def subprocess_runner(command: Sequence[str]) -> Result:
  done = subprocess.run(list(command), capture_output=True, text=True, errors="replace",
                        stdin=subprocess.DEVNULL)
  return Result(done.returncode, done.stdout, done.stderr)


class Launcher:
  """Runs a checked Launch through ``runner``; ``sleep`` and ``out`` are injectable."""

  def __init__(self, launch: Launch, runner: Runner, sleep=time.sleep, out=print):
    self.l, self.runner, self.sleep, self.out = launch, runner, sleep, out
    self.relaunches, self.misses = 0, 0
    self.offset, self.tail = 0, ""
    self.up = False  # the slice is up and training was started

  def call(self, command: Sequence[str], quiet: bool = False, check: bool = True) -> Result:
    if not quiet:
      self.out(f"$ {shlex.join(command)}")
    result = self.runner(command)
    if check and result.returncode != 0:
      detail = (result.stderr or result.stdout).strip()[-2000:]
      raise LaunchError(f"command failed (exit {result.returncode}): {shlex.join(command)}"
                        f"\n{detail}")
    return result

  def state(self) -> str:
    result = self.call(state_command(self.l), quiet=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""

  def bring_up(self) -> None:
    """Create, wait until up, install, start. Raises _Lost if the slice fails meanwhile."""
    s = self.l.settings
    self.call(create_command(self.l))
    misses, last = 0, None
    while (state := self.state()) != UP[s.mode]:
      misses = misses + 1 if not state else 0
      if state in LOST[s.mode] or misses >= MISSES_BEFORE_LOST:
        raise _Lost(state or "MISSING")
      if state != last:
        self.out(f"# {s.name}: {state or 'describe failed'}")
        last = state
      self.sleep(s.poll_seconds)
    self.call(scp_command(self.l))
    self.call(ssh_command(self.l, "all", install_script(self.l)))
    self.start()

  def start(self) -> None:
    self.call(ssh_command(self.l, "all", start_script(self.l)))
    self.offset, self.tail = 0, ""

  def count_relaunch(self, why: str) -> None:
    s = self.l.settings
    if self.relaunches >= s.max_relaunches:
      raise LaunchError(f"{s.name} was lost again ({why}) after {self.relaunches} relaunches "
                        f"(--max_relaunches={s.max_relaunches}); run the same command later: "
                        f"training resumes from the newest checkpoint in {s.workdir}")
    self.relaunches += 1
    self.out(f"# {s.name}: {why}; relaunch {self.relaunches} of {s.max_relaunches}, "
             f"resuming from {s.workdir}")

  def poll_worker0(self) -> str | None:
    """Prints new log bytes; returns `running`, the exit code, or None if ssh failed."""
    result = self.call(ssh_command(self.l, "0", poll_script(self.offset)), quiet=True,
                       check=False)
    if result.returncode != 0:
      return None
    status, _, text = result.stdout.partition("\n")
    if text:
      self.out(text, end="")
      self.offset += len(text.encode())
      self.tail = (self.tail + text)[-4096:]
    return status.strip()

  def check_bucket(self) -> None:
    result = self.call(bucket_command(self.l), check=False)
    if result.returncode != 0:
      raise LaunchError(f"bucket gs://{self.l.bucket} (from --workdir) cannot be read: "
                        f"{result.stderr.strip()[-500:]}")

  def package(self) -> None:
    pathlib.Path(self.l.staging).mkdir(parents=True, exist_ok=True)
    self.call(package_command(self.l))

  def lost(self, why: str) -> None:
    """Counts a relaunch and deletes what is left; the next loop brings the slice up."""
    self.count_relaunch(why)
    self.call(delete_command(self.l), check=False)
    self.up, self.misses = False, 0

  def watch(self) -> int | None:
    """One poll: relaunch if the slice is lost, 0 when training is done, else None."""
    s = self.l.settings
    state = self.state()
    self.misses = self.misses + 1 if not state else 0
    if state in LOST[s.mode] or self.misses >= MISSES_BEFORE_LOST:
      self.lost(f"it is {state or 'gone'}")
      return None
    status = self.poll_worker0() if state == UP[s.mode] else None
    if status in (None, "running"):
      return None
    if status == "0" and re.search(r"^preempted", self.tail, re.MULTILINE):
      self.count_relaunch("training stopped on a preemption notice, the VM lives")
      self.start()
      return None
    if status == "0":
      self.out(f"# {s.name}: training done; checkpoints in {s.workdir}")
      if not s.keep:
        self.call(delete_command(self.l))
      return 0
    log = shlex.join(ssh_command(self.l, "0", f"tail -n 200 {REMOTE_LOG}"))
    raise LaunchError(f"training exited with code {status} on worker 0; the slice is kept "
                      f"for debugging.\n  log:    {log}\n  delete: "
                      f"{shlex.join(delete_command(self.l))}")

  def run(self) -> int:
    """The whole launch; returns 0 when training is done (LaunchError otherwise)."""
    self.check_bucket()
    if not self.l.settings.attach:
      self.package()
    self.up = self.l.settings.attach
    while True:
      if not self.up:
        try:
          self.bring_up()
          self.up = True
        except _Lost as e:
          self.lost(f"it is {e.state} while starting")
        continue
      self.sleep(self.l.settings.poll_seconds)
      if (done := self.watch()) is not None:
        return done


# -------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> Settings:
  p = argparse.ArgumentParser(prog="python -m launch.gcloud_tpu", description=__doc__.split(
      "\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  p.add_argument("--zone", required=True)
  p.add_argument("--project", default="", help="default: gcloud's configured project")
  p.add_argument("--topology", required=True, help="slice, e.g. v5p-64, v6e-64, v5e-256")
  p.add_argument("--config", required=True, help="configs/NAME.py[:ARGS]")
  p.add_argument("--workdir", default="", help="gs://BUCKET/FOLDER (checkpoints, resume)")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, passed as --config.KEY=VALUE (repeatable)")
  p.add_argument("--mode", choices=sorted(UP), default="queued",
                 help="queued resource, or a plain TPU VM")
  p.add_argument("--provisioning", choices=list(PROVISIONING), default="on-demand")
  p.add_argument("--runtime_version", default="", help="default: the generation's")
  p.add_argument("--distributed", choices=("auto", "metadata"), default="auto",
                 help="auto: jax.distributed detects the pod; metadata: explicit "
                      "MASHVLM_* coordinator env read from the TPU metadata")
  p.add_argument("--coordinator_port", type=int, default=8476)
  p.add_argument("--python", default="python3.11", help="interpreter for the worker venv")
  p.add_argument("--apt_packages", default="python3.11 python3.11-venv",
                 help="apt packages installed first on every worker ('' to skip)")
  p.add_argument("--pip_extra", action="append", default=[],
                 help="extra pip requirement, e.g. 'jax[tpu]==0.10.2' (repeatable)")
  p.add_argument("--worker_setup", default="",
                 help="shell command run on every worker after installing, e.g. copying "
                      "data or init params from gs:// to the worker's disk")
  p.add_argument("--staging_dir", default="", help="local folder for the source tarball")
  p.add_argument("--poll_seconds", type=float, default=60.0)
  p.add_argument("--max_relaunches", type=int, default=5)
  p.add_argument("--keep", action="store_true", help="keep the slice when training is done")
  p.add_argument("--attach", action="store_true",
                 help="follow a job this launcher started before (no create/install/start)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print every command instead of running it")
  a = p.parse_args(list(argv))
  return Settings(name=a.name, zone=a.zone, project=a.project, topology=a.topology,
                  config=a.config, workdir=a.workdir, overrides=tuple(a.override),
                  mode=a.mode, provisioning=a.provisioning,
                  runtime_version=a.runtime_version, distributed=a.distributed,
                  coordinator_port=a.coordinator_port, python=a.python,
                  apt_packages=a.apt_packages, pip_extra=tuple(a.pip_extra),
                  worker_setup=a.worker_setup,
                  staging_dir=a.staging_dir, poll_seconds=a.poll_seconds,
                  max_relaunches=a.max_relaunches, keep=a.keep, attach=a.attach,
                  dry_run=a.dry_run)


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner,
         which: Callable[[str], str | None] = shutil.which) -> int:
  settings = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    launch = prepare(settings, which)
    if settings.dry_run:
      print("\n".join(dry_run_lines(launch)))
      return 0
    return Launcher(launch, runner).run()
  except LaunchError as e:
    print(f"gcloud_tpu: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ngcloud_tpu: stopped following {settings.name}; training goes on. Follow it "
          f"again with the same command and --attach.", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
