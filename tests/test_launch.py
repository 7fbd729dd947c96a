"""Launchers: slice arithmetic, the checks made before anything is created, the exact gcloud
commands of --dry-run, the preemption relaunch loop (fake gcloud), and XManager experiments
built without launching (xm_mock)."""
import os
import shlex
import sys
import tarfile

import pytest
from absl import flags

from conftest import ROOT, require

sys.path.insert(0, str(ROOT))
from launch import gcloud_tpu as G  # noqa: E402
from launch import topology as T  # noqa: E402
from launch import xm_launch as X  # noqa: E402

CONFIG = '''import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100
  config.checkpoint_every = 50
  config.log_every = 10
  config.model = ml_collections.ConfigDict(dict(rope_mode="harmonic"))
  config.optim = ml_collections.ConfigDict(dict(lr=1e-4, no_decay="(norm|bias)"))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.data = ml_collections.ConfigDict(dict(batch_size=64, data_dir="gs://my-bucket/data"))
  config.init_from = ""
  return config
'''


@pytest.fixture
def config_file(tmp_path):
  path = tmp_path / "small.py"
  path.write_text(CONFIG)
  return path


def settings(config_file, **changes):
  base = dict(name="mash-2h", zone="us-east5-a", project="my-project", topology="v5p-16",
              config=str(config_file), workdir="gs://my-bucket/mash/run1",
              staging_dir=str(config_file.parent / "stage"), poll_seconds=30)
  return G.Settings(**{**base, **changes})


# ------------------------------------------------------------------------------ slices


@pytest.mark.parametrize("name, gcloud, chips, hosts, per_host, grid", [
    ("v5p-16", "v5p-16", 8, 2, 4, "2x2x2"),
    ("v5p-64", "v5p-64", 32, 8, 4, "2x4x4"),
    ("v5p-8", "v5p-8", 4, 1, 4, "2x2x1"),
    ("v4-32", "v4-32", 16, 4, 4, "2x2x4"),
    ("v6e-64", "v6e-64", 64, 16, 4, "8x8"),
    ("v5e-256", "v5litepod-256", 256, 64, 4, "16x16"),
    ("v5litepod-8", "v5litepod-8", 8, 1, 8, "2x4"),
    ("v4:8x8x12", "v4-1536", 768, 192, 4, "8x8x12"),
])
def test_slice_hosts_and_names(name, gcloud, chips, hosts, per_host, grid):
  slc = T.parse_slice(name)
  assert (slc.accelerator_type, slc.chips, slc.hosts, slc.chips_per_host, slc.devices,
          slc.physical_topology) == (gcloud, chips, hosts, per_host, chips, grid)


def test_slice_description_and_bad_names():
  assert T.parse_slice("v5p-64").describe() == (
      "v5p-64 (2x4x4): 32 chips (64 TensorCores), 8 hosts x 4 chips, 32 JAX devices")
  for bad in ("v5p-12", "v9-8", "tpu", "v6e-2"):
    with pytest.raises(T.LaunchError, match="topology"):
      T.parse_slice(bad)


# ------------------------------------------------------------------------------ checks


def test_mesh_and_batch_that_cannot_use_the_slice(config_file):
  fits = T.check_fit(T.load_config(str(config_file)), T.parse_slice("v5p-16"))
  assert (fits.mesh, fits.per_host, fits.data_parallel) == (
      dict(data=1, fsdp=8, tensor=1), 32, 8)
  cases = [
      (["mesh.tensor=3"], "v5p-16", "the fixed axes use 3 devices, which does not divide the 8"),
      (["mesh.fsdp=4"], "v5p-16", "needs 4 devices but 8 are available"),
      (["data.batch_size=24"], "v6e-64", "data.batch_size=24 must be divisible by 16"),
      (["data.batch_size=4"], "v5p-16", "divisible by the data-parallel size data x fsdp = 8"),
      (["total_steps=0"], "v5p-16", "total_steps must be positive"),
  ]
  for overrides, slc, message in cases:
    with pytest.raises(T.LaunchError, match=message.replace("(", r"\(")):
      T.check_fit(T.load_config(str(config_file), overrides), T.parse_slice(slc))


def test_config_load_errors(config_file, tmp_path):
  with pytest.raises(T.LaunchError, match="config file .*nope.py not found"):
    T.load_config(str(tmp_path / "nope.py"))
  with pytest.raises(T.LaunchError, match="the config has no field 'nokey'"):
    T.load_config(str(config_file), ["nokey=1"])
  with pytest.raises(T.LaunchError, match="not of the form KEY=VALUE"):
    T.load_config(str(config_file), ["total_steps"])


@pytest.mark.parametrize("path, message", [
    ("", "--workdir is required"),
    ("/tmp/run", "is not a gs:// bucket path"),
    ("gs://b/run", "'b' is not a bucket name"),
    ("gs://my-bucket", "names a bucket but no folder"),
    ("gs://my-bucket/", "names a bucket but no folder"),
])
def test_workdir_must_be_a_bucket_folder(path, message):
  with pytest.raises(T.LaunchError, match=message):
    T.check_bucket_path(path)
  assert T.check_bucket_path("gs://my-bucket/mash/run1") == "my-bucket"


def test_gcloud_missing_is_reported_unless_dry_run(config_file):
  with pytest.raises(T.LaunchError, match="gcloud is not installed or not on PATH"):
    G.prepare(settings(config_file), which=lambda name: None)
  assert G.prepare(settings(config_file, dry_run=True), which=lambda name: None)


def test_bad_input_stops_before_any_command(config_file, capsys):
  ran = []
  runner = lambda command: ran.append(command) or G.Result(0)  # noqa: E731
  argv = ["--name=mash", "--zone=us-east5-a", f"--config={config_file}"]
  good = ["--topology=v5p-16", "--workdir=gs://my-bucket/run"]
  for extra, message, gcloud in [
      (["--topology=v5p-12", "--workdir=gs://my-bucket/run"], "6 chips is not a standard",
       "/usr/bin/gcloud"),
      (["--topology=v5p-16", "--workdir=/local/run"], "is not a gs:// bucket path",
       "/usr/bin/gcloud"),
      (["--topology=v5p-16", "--workdir=gs://my-bucket"], "names a bucket but no folder",
       "/usr/bin/gcloud"),
      (good + ["--override=mesh.tensor=3"], "the config's mesh cannot use it",
       "/usr/bin/gcloud"),
      (good, "gcloud is not installed or not on PATH", None)]:
    assert G.main(argv + extra, runner=runner, which=lambda name: gcloud) == 2
    assert message in capsys.readouterr().err
  assert ran == []


# ----------------------------------------------------------------------------- dry run


def dry_run(argv, capsys):
  assert G.main(argv + ["--dry-run"]) == 0
  return capsys.readouterr().out.splitlines()


def test_dry_run_two_hosts_queued_resource(config_file, capsys):
  stage = config_file.parent / "stage"
  lines = dry_run(["--name=mash-2h", "--zone=us-east5-a", "--project=my-project",
                   "--topology=v5p-16", f"--config={config_file}",
                   "--workdir=gs://my-bucket/mash/run1", f"--staging_dir={stage}"], capsys)
  location = "--zone=us-east5-a --project=my-project"
  qr = "gcloud compute tpus queued-resources"
  ssh = f"gcloud compute tpus tpu-vm ssh mash-2h --worker=all {location} --quiet"
  assert lines == [
      "# v5p-16 (2x2x2): 8 chips (16 TensorCores), 2 hosts x 4 chips, 8 JAX devices",
      "# mesh (data=1, fsdp=8, tensor=1), global batch 64 = 32 per host, "
      "data-parallel size 8",
      "# check the bucket",
      "gcloud storage buckets describe gs://my-bucket '--format=value(name)'",
      "# package the project",
      f"mkdir -p {stage}",
      f"tar -czf {stage}/mashvlm-src.tar.gz --exclude=__pycache__ -C {ROOT} pyproject.toml "
      f"README.md mashvlm_jax configs -C {config_file.parent} small.py",
      "# create the queued resource, then poll until it is ACTIVE",
      f"{qr} create mash-2h --node-id=mash-2h {location} --accelerator-type=v5p-16 "
      "--runtime-version=v2-alpha-tpuv5",
      f"{qr} describe mash-2h {location} '--format=value(state.state)'",
      "# copy and install the project on every worker",
      f"gcloud compute tpus tpu-vm scp {stage}/mashvlm-src.tar.gz "
      f"mash-2h:mashvlm-src.tar.gz --worker=all {location} --quiet",
      f"{ssh} '--command=(sudo DEBIAN_FRONTEND=noninteractive apt-get -qq "
      "-o DPkg::Lock::Timeout=600 update && sudo DEBIAN_FRONTEND=noninteractive apt-get "
      "-qq -o DPkg::Lock::Timeout=600 install -y python3.11 python3.11-venv) > /dev/null "
      "&& rm -rf $HOME/mashvlm && mkdir -p $HOME/mashvlm && tar -xzf "
      "$HOME/mashvlm-src.tar.gz -C $HOME/mashvlm && python3.11 -m venv $HOME/mashvlm-venv "
      "&& $HOME/mashvlm-venv/bin/pip install -q --upgrade pip && "
      "$HOME/mashvlm-venv/bin/pip install -q \"$HOME/mashvlm[tpu]\"'",
      "# start training on every worker (JAX detects the pod: --distributed=auto)",
      f"{ssh} '--command=(cd $HOME/mashvlm && rm -f $HOME/mashvlm-train.exit && "
      "trap \"\" HUP && $HOME/mashvlm-venv/bin/python -m mashvlm_jax.cli train "
      "--config=small.py --workdir=gs://my-bucket/mash/run1 --distributed=auto > "
      "$HOME/mashvlm-train.log 2>&1; echo $? > $HOME/mashvlm-train.exit) > /dev/null 2>&1 "
      "< /dev/null &'",
      "# every 60s: the queued resource's state, then worker 0's exit status and new log "
      "bytes",
      f"{qr} describe mash-2h {location} '--format=value(state.state)'",
      f"gcloud compute tpus tpu-vm ssh mash-2h --worker=0 {location} --quiet '--command=cat "
      "$HOME/mashvlm-train.exit 2>/dev/null || echo running; tail -c +1 "
      "$HOME/mashvlm-train.log 2>/dev/null || true'",
      "# when it is SUSPENDED/FAILED (at most 5 times): delete, then create, install and "
      "start again; training resumes from gs://my-bucket/mash/run1",
      f"{qr} delete mash-2h {location} --force --quiet",
      "# when training is done: delete",
      f"{qr} delete mash-2h {location} --force --quiet",
  ]


def test_dry_run_sixteen_hosts_spot_vm_explicit_coordinator(config_file, capsys):
  stage = config_file.parent / "stage"
  lines = dry_run(["--name=mash-16h", "--zone=us-east1-d", "--topology=v6e-64",
                   f"--config={config_file}", "--workdir=gs://my-bucket/mash/run2",
                   f"--staging_dir={stage}", "--mode=vm", "--provisioning=spot",
                   "--distributed=metadata", "--pip_extra=jax[tpu]==0.10.2",
                   "--override=optim.no_decay=(norm|bias|embed)", "--override=optim.lr=3e-4",
                   "--override=data.data_dir=/tmp/data",
                   '--worker_setup=mkdir -p /tmp/data && gcloud storage cp -r '
                   '"gs://my-bucket/data/*" /tmp/data/',
                   "--max_relaunches=3", "--poll_seconds=30", "--keep"], capsys)
  vm = "gcloud compute tpus tpu-vm"
  metadata = ("curl -s -H Metadata-Flavor:Google http://metadata.google.internal/"
              "computeMetadata/v1/instance/attributes")
  assert lines[:3] == [
      "# v6e-64 (8x8): 64 chips, 16 hosts x 4 chips, 64 JAX devices",
      "# mesh (data=1, fsdp=64, tensor=1), global batch 64 = 4 per host, "
      "data-parallel size 64",
      "# warning: data.data_dir=/tmp/data is local to each host: every host builds or must "
      "hold the same data there"]
  assert lines[8:] == [
      "# create the TPU VM, then poll until it is READY",
      f"{vm} create mash-16h --zone=us-east1-d --accelerator-type=v6e-64 "
      "--version=v2-alpha-tpuv6e --spot",
      f"{vm} describe mash-16h --zone=us-east1-d '--format=value(state)'",
      "# copy and install the project on every worker",
      f"{vm} scp {stage}/mashvlm-src.tar.gz mash-16h:mashvlm-src.tar.gz --worker=all "
      "--zone=us-east1-d --quiet",
      f"{vm} ssh mash-16h --worker=all --zone=us-east1-d --quiet '--command=(sudo "
      "DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 update && sudo "
      "DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 install -y "
      "python3.11 python3.11-venv) > /dev/null && rm -rf $HOME/mashvlm && mkdir -p "
      "$HOME/mashvlm && tar -xzf $HOME/mashvlm-src.tar.gz -C $HOME/mashvlm && python3.11 -m "
      "venv $HOME/mashvlm-venv && $HOME/mashvlm-venv/bin/pip install -q --upgrade pip && "
      "$HOME/mashvlm-venv/bin/pip install -q \"$HOME/mashvlm[tpu]\" \"jax[tpu]==0.10.2\" && "
      "(mkdir -p /tmp/data && gcloud storage cp -r \"gs://my-bucket/data/*\" /tmp/data/)'",
      "# start training on every worker (coordinator from the TPU metadata: "
      "--distributed=explicit)",
      f"{vm} ssh mash-16h --worker=all --zone=us-east1-d --quiet '--command=(cd $HOME/mashvlm && "
      f"rm -f $HOME/mashvlm-train.exit && export MASHVLM_PROCESS_ID=$({metadata}/"
      "agent-worker-number) MASHVLM_NUM_PROCESSES=16 MASHVLM_COORDINATOR_ADDRESS="
      f"$({metadata}/worker-network-endpoints | cut -d, -f1 | cut -d: -f3):8476 && "
      "trap \"\" HUP && $HOME/mashvlm-venv/bin/python -m mashvlm_jax.cli train "
      "--config=small.py --workdir=gs://my-bucket/mash/run2 --distributed=explicit "
      "'\"'\"'--config.optim.no_decay=(norm|bias|embed)'\"'\"' --config.optim.lr=3e-4 "
      "--config.data.data_dir=/tmp/data > "
      "$HOME/mashvlm-train.log 2>&1; echo $? > $HOME/mashvlm-train.exit) > /dev/null 2>&1 "
      "< /dev/null &'",
      "# every 30s: the TPU VM's state, then worker 0's exit status and new log bytes",
      f"{vm} describe mash-16h --zone=us-east1-d '--format=value(state)'",
      f"{vm} ssh mash-16h --worker=0 --zone=us-east1-d --quiet '--command=cat "
      "$HOME/mashvlm-train.exit 2>/dev/null || echo running; tail -c +1 "
      "$HOME/mashvlm-train.log 2>/dev/null || true'",
      "# when it is PREEMPTED/TERMINATED (at most 3 times): delete, then create, install "
      "and start again; training resumes from gs://my-bucket/mash/run2",
      f"{vm} delete mash-16h --zone=us-east1-d --quiet",
      "# when training is done: keep the slice (--keep)",
  ]
  # The quoting survives two shells: gcloud's argv, then the worker's shell.
  command = shlex.split(lines[15])[-1].removeprefix("--command=")
  train = command[command.index("$HOME/mashvlm-venv/bin/python"):command.index(" > ")]
  assert shlex.split(train)[3:] == [
      "train", "--config=small.py", "--workdir=gs://my-bucket/mash/run2",
      "--distributed=explicit", "--config.optim.no_decay=(norm|bias|embed)",
      "--config.optim.lr=3e-4", "--config.data.data_dir=/tmp/data"]


FAKE_GCLOUD = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
case "$*" in
  *"describe mash-2h"*) echo ACTIVE ;;
  *"--worker=0"*) printf '0\\ndone: step 100\\n' ;;
esac
"""


def test_main_runs_gcloud_and_tar_for_real(config_file, tmp_path, monkeypatch, capsys):
  """A fake `gcloud` on PATH: main() runs every command as a subprocess, tar for real."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_LOG", str(tmp_path / "gcloud.log"))
  stage = tmp_path / "stage"
  assert G.main(["--name=mash-2h", "--zone=us-east5-a", "--topology=v5p-16",
                 f"--config={config_file}", "--workdir=gs://my-bucket/run",
                 f"--staging_dir={stage}", "--poll_seconds=0"]) == 0
  calls = [line.split()[:4] for line in (tmp_path / "gcloud.log").read_text().splitlines()]
  assert [c[3] if c[0] == "compute" else c[1] for c in calls] == [
      "buckets", "create", "describe", "scp", "ssh", "ssh", "describe", "ssh", "delete"]
  assert "done: step 100" in capsys.readouterr().out
  with tarfile.open(stage / "mashvlm-src.tar.gz") as tar:
    names = tar.getnames()
  assert {"pyproject.toml", "README.md", "mashvlm_jax/cli.py", "configs/mashvlm_7b.py",
          "small.py"} <= set(names)
  assert not [n for n in names if "__pycache__" in n]


# ----------------------------------------------------------------------- relaunch loop


def verb(command):
  """A short name for each command the launcher runs."""
  text = " ".join(command)
  if command[0] == "tar":
    return "tar"
  if "buckets" in command:
    return "bucket"
  if command[3] in ("queued-resources", "tpu-vm") and command[4] in (
      "create", "describe", "delete", "scp"):
    return command[4]
  if "--worker=0" in command:
    return "poll"
  return "install" if "pip install" in text else "start"


class FakeGcloud:
  """Records commands; describe answers the scripted states, worker 0 the scripted polls."""

  def __init__(self, states, polls, fail=None):
    self.states, self.polls, self.fail = list(states), list(polls), fail or {}
    self.commands = []

  def __call__(self, command):
    self.commands.append(list(command))
    name = verb(command)
    if name in self.fail:
      return self.fail[name]
    if name == "describe":
      return G.Result(0, self.states.pop(0) + "\n")
    if name == "poll":
      return G.Result(0, self.polls.pop(0))
    return G.Result(0)

  def verbs(self):
    return [verb(c) for c in self.commands]


def launcher(config_file, fake, **changes):
  printed, sleeps = [], []
  run = G.Launcher(G.prepare(settings(config_file, **changes)), fake, sleep=sleeps.append,
                   out=lambda text, end="\n": printed.append(text + end))
  return run, printed, sleeps


def test_relaunch_after_queued_resource_is_suspended(config_file):
  fake = FakeGcloud(
      states=["WAITING_FOR_RESOURCES", "ACTIVE",  # first bring-up
              "ACTIVE", "ACTIVE", "SUSPENDED",  # training, then preempted
              "ACTIVE",  # second bring-up
              "ACTIVE"],  # done
      polls=["running\nstep 1\n", "running\n", "0\ndone: step 100\n"])
  run, printed, sleeps = launcher(config_file, fake)
  assert run.run() == 0
  up = ["create", "describe", "scp", "install", "start"]
  assert fake.verbs() == (["bucket", "tar", "create", "describe"] + up[1:] +
                          ["describe", "poll", "describe", "poll", "describe", "delete"] +
                          up + ["describe", "poll", "delete"])
  creates = [c for c in fake.commands if verb(c) == "create"]
  assert creates == [G.create_command(run.l)] * 2
  polls = [c[-1] for c in fake.commands if verb(c) == "poll"]
  assert [p.split("tail -c ")[1].split()[0] for p in polls] == ["+1", "+8", "+1"]
  assert sleeps == [30] * 5
  assert "# mash-2h: it is SUSPENDED; relaunch 1 of 5, resuming from " \
         "gs://my-bucket/mash/run1\n" in printed
  assert "step 1\n" in printed and "done: step 100\n" in printed


def test_relaunches_are_bounded(config_file):
  fake = FakeGcloud(states=["ACTIVE", "SUSPENDED"] * 3, polls=[])
  run, printed, _ = launcher(config_file, fake, max_relaunches=2)
  with pytest.raises(T.LaunchError, match="lost again .* after 2 relaunches"):
    run.run()
  assert fake.verbs().count("create") == 3 and fake.verbs().count("delete") == 2


def test_vm_preempted_or_gone_while_starting(config_file):
  fake = FakeGcloud(states=["CREATING", "PREEMPTED", "READY", "READY"],
                    polls=["0\ndone\n"], fail={})
  run, printed, _ = launcher(config_file, fake, mode="vm")
  assert run.run() == 0
  assert fake.verbs() == ["bucket", "tar", "create", "describe", "describe", "delete",
                          "create", "describe", "scp", "install", "start", "describe", "poll",
                          "delete"]
  assert G.delete_command(run.l)[4:6] == ["delete", "mash-2h"]
  # three failed describes in a row count as a lost slice
  fake = FakeGcloud(states=[], polls=[], fail={"describe": G.Result(1, "", "NOT_FOUND")})
  run, _, _ = launcher(config_file, fake, mode="vm", max_relaunches=0)
  with pytest.raises(T.LaunchError, match=r"lost again \(it is MISSING while starting\)"):
    run.run()


def test_preemption_notice_on_a_live_vm_restarts_in_place(config_file):
  fake = FakeGcloud(states=["ACTIVE"] * 3, polls=[
      "0\npreempted, resume with the same command: step 40\n", "0\ndone: step 100\n"])
  run, _, _ = launcher(config_file, fake)
  assert run.run() == 0
  assert fake.verbs()[-6:] == ["describe", "poll", "start", "describe", "poll", "delete"]
  assert run.relaunches == 1


def test_training_failure_keeps_the_slice(config_file):
  fake = FakeGcloud(states=["ACTIVE", "ACTIVE"], polls=["1\nTraceback: boom\n"])
  run, _, _ = launcher(config_file, fake)
  with pytest.raises(T.LaunchError, match="exited with code 1 on worker 0; the slice is kept"):
    run.run()
  assert "delete" not in fake.verbs()


def test_failed_commands_report_gcloud_errors(config_file):
  fake = FakeGcloud([], [], fail={"bucket": G.Result(1, "", "ERROR: bucket not found")})
  run, _, _ = launcher(config_file, fake)
  with pytest.raises(T.LaunchError, match="gs://my-bucket .* cannot be read: ERROR: bucket"):
    run.run()
  assert fake.verbs() == ["bucket"]
  fake = FakeGcloud([], [], fail={"create": G.Result(1, "", "ALREADY_EXISTS: mash-2h")})
  run, _, _ = launcher(config_file, fake)
  with pytest.raises(T.LaunchError, match="(?s)command failed .*ALREADY_EXISTS"):
    run.run()


# ---------------------------------------------------------------------------- XManager


def xm_settings(config_file, **changes):
  base = dict(config=str(config_file), workdir="gs://my-bucket/sweep", target="cloud_tpu",
              topology="v5p-64", image_registry="us-docker.pkg.dev/my-project/mashvlm",
              overrides=("optim.no_decay=(norm|bias|embed)",),
              sweep=("optim.lr=1e-4,3e-4", "model.rope_mode=distinct,balanced,harmonic"))
  return X.Settings(**{**base, **changes})


def test_sweep_makes_one_work_unit_per_override_set(config_file):
  units, slc = X.check(xm_settings(config_file))
  assert slc.hosts == 8
  assert [(u.index, u.overrides, u.workdir) for u in units] == [
      (i + 1, ("optim.no_decay=(norm|bias|embed)", f"optim.lr={lr}", f"model.rope_mode={mode}"),
       f"gs://my-bucket/sweep/{i + 1}")
      for i, (lr, mode) in enumerate((lr, mode) for lr in ("1e-4", "3e-4")
                                     for mode in ("distinct", "balanced", "harmonic"))]
  single = X.work_units(xm_settings(config_file, sweep=()))
  assert [(u.index, u.workdir) for u in single] == [(1, "gs://my-bucket/sweep")]
  with pytest.raises(T.LaunchError, match="optim.lr is swept twice"):
    X.work_units(xm_settings(config_file, sweep=("optim.lr=1", "optim.lr=2")))
  with pytest.raises(T.LaunchError, match="no empty value"):
    X.work_units(xm_settings(config_file, sweep=("optim.lr=1,",)))


def test_xm_checks_every_work_unit_before_building(config_file):
  with pytest.raises(T.LaunchError, match=r"work unit 2 \(.* mesh.tensor=3\): v5p-64 .* the "
                     "config's mesh cannot use it"):
    X.check(xm_settings(config_file, sweep=("mesh.tensor=1,3",)))
  with pytest.raises(T.LaunchError, match="needs --topology"):
    X.check(xm_settings(config_file, topology=""))
  with pytest.raises(T.LaunchError, match="needs --image_registry"):
    X.check(xm_settings(config_file, image_registry=""))
  with pytest.raises(T.LaunchError, match="not a gs:// bucket path"):
    X.check(xm_settings(config_file, workdir="/tmp/sweep"))
  with pytest.raises(T.LaunchError, match=r"work unit 1 \(init_from=/ckpt optim.lr=1e-4 .*\): "
                     "init_from=/ckpt is local to each host"):
    X.check(xm_settings(config_file, overrides=("init_from=/ckpt",)))


def test_xm_flags(config_file):
  values = flags.FlagValues()
  X.define_flags(values)
  values(["xm_launch", f"--config={config_file}", "--workdir=/tmp/w", "--sweep=optim.lr=1,2",
          "--override=total_steps=5", "--override=seed=3"])
  assert X.settings_from_flags(values) == X.Settings(
      config=str(config_file), workdir="/tmp/w", sweep=("optim.lr=1,2",),
      overrides=("total_steps=5", "seed=3"))


def test_xm_cloud_tpu_experiment_is_built_without_launching(config_file, tmp_path):
  require("xmanager")  # README test install (.[launch])
  from xmanager import xm, xm_cloud, xm_mock
  s = xm_settings(config_file)
  units, slc = X.check(s)
  source = X.stage_source(s, tmp_path / "staging")
  assert sorted(p.name for p in source.iterdir()) == [
      "README.md", "configs", "mashvlm_jax", "pyproject.toml", "small.py"]
  assert not list(source.rglob("__pycache__"))
  package = X.packageable(s, source)
  spec = package.executable_spec
  assert isinstance(spec, xm.PythonContainer)
  assert (spec.path, spec.entrypoint, spec.base_image) == (
      str(source), xm.ModuleName("mashvlm_jax.cli"), "python:3.11-slim")
  assert spec.docker_instructions == [
      "RUN python -m pip install --no-cache-dir --upgrade pip",
      "COPY mashvlm/ /workdir/mashvlm/",
      "WORKDIR /workdir/mashvlm",
      'RUN python -m pip install --no-cache-dir ".[tpu]"']
  assert package.executor_spec == xm_cloud.KubernetesJobExecutorSpec(
      container_registry="us-docker.pkg.dev/my-project/mashvlm", image_name="mashvlm-jax")

  with xm_mock.MockExperiment() as experiment:
    X.add_work_units(experiment, s, units, slc, source)
  assert experiment.work_unit_count == 6
  jobs = experiment.launched_jobs
  assert [job.args.to_list(str) for job in jobs] == [
      ["train", "--config=small.py", f"--workdir=gs://my-bucket/sweep/{u.index}",
       "--distributed=auto", "--config.optim.no_decay=(norm|bias|embed)",
       f"--config.{u.overrides[1]}", f"--config.{u.overrides[2]}"] for u in units]
  requirements = jobs[0].executor.requirements
  assert isinstance(jobs[0].executor, xm_cloud.KubernetesJobExecutor)
  assert (requirements.accelerator, requirements.topology, requirements.replicas) == (
      xm.ResourceType.TPU_V5P, xm.Topology("2x4x4"), 8)


def test_xm_local_experiment_runs_this_python(config_file):
  require("xmanager")  # README test install (.[launch])
  from xmanager import xm, xm_local, xm_mock
  s = xm_settings(config_file, target="local", workdir="/tmp/mash", sweep=("total_steps=5,10",),
                  overrides=(), python="/usr/bin/python3")
  units, slc = X.check(s)
  package = X.packageable(s)
  assert package.executable_spec == xm.Binary(path="/usr/bin/python3")
  assert package.args.to_list(str) == ["-m", "mashvlm_jax.cli"]
  assert isinstance(package.executor_spec, xm_local.LocalSpec)
  with xm_mock.MockExperiment() as experiment:
    X.add_work_units(experiment, s, units, slc)
  assert [(type(j.executor), j.args.to_list(str)) for j in experiment.launched_jobs] == [
      (xm_local.Local, ["train", f"--config={config_file}", f"--workdir=/tmp/mash/{i}",
                        f"--config.total_steps={steps}"])
      for i, steps in ((1, "5"), (2, "10"))]
