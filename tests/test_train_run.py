"""End-to-end training runs in subprocesses: exact resume after SIGKILL, clean exit on
SIGTERM, an 8-device fsdp x tensor mesh, and 2 processes on 127.0.0.1 against 1 process."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from mashvlm_jax import provenance

SMALL = ["--config.total_steps={steps}", "--config.checkpoint_every={every}",
         "--config.log_every=1", "--config.data.batch_size=4", "--config.data.text_len=24",
         "--config.log_batch_fingerprints=True", "--config.data.builder_config=tiny"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One tiny synthetic build shared by every run in this module."""
  path = tmp_path_factory.mktemp("data")
  out = run_cli("make-data", "--config=configs/tiny_synthetic.py",
                "--config.data.builder_config=tiny", data_dir=path)
  assert out.returncode == 0, out.stderr[-3000:]
  return path


def env_for(data_dir, devices=1, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MASHVLM_DATA_DIR=str(data_dir),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  env.pop("PYTEST_CURRENT_TEST", None)
  return env


def cli_args(command, *args):
  return [sys.executable, "-m", "mashvlm_jax.cli", command, *args]


def run_cli(command, *args, data_dir, devices=1, timeout=600):
  return subprocess.run(cli_args(command, *args), cwd=ROOT, env=env_for(data_dir, devices),
                        capture_output=True, text=True, timeout=timeout)


def train_args(workdir, steps, every, *extra):
  return ["--config=configs/tiny_synthetic.py", f"--workdir={workdir}",
          *[a.format(steps=steps, every=every) for a in SMALL], *extra]


def fingerprints(workdir):
  rows = [json.loads(l) for l in (workdir / "batches.jsonl").read_text().splitlines()]
  return rows


def restore_params(workdir, step, devices=1):
  """Parameters of checkpoint ``step``, restored by a fresh single process."""
  code = f"""
import sys, numpy as np, jax
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import load_config
from mashvlm_jax.train import trainer, checkpoint
config = load_config("tiny_synthetic")
config.data.batch_size = 4
setup = trainer.build(config)
ck = checkpoint.Checkpointer({str(workdir / 'checkpoints')!r}, use_async=False)
state, _, _ = ck.restore(
    {step}, trainer.with_shardings(setup.abstract_state, setup.state_shardings), with_data=False)
flat = {{jax.tree_util.keystr(k): np.asarray(v) for k, v in
        jax.tree_util.tree_leaves_with_path(state.params)}}
np.savez({str(workdir / f'params_{step}.npz')!r}, **flat)
print(int(state.step))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env_for(workdir, devices), timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert int(out.stdout.strip().splitlines()[-1]) == step
  return dict(np.load(workdir / f"params_{step}.npz"))


def test_sigkill_resume_is_bitwise_identical(tmp_path, data_dir):
  steps, every = 40, 8
  straight = tmp_path / "straight"
  out = run_cli("train", *train_args(straight, steps, every), data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "loss curve:" in out.stdout and (straight / "loss_curve.png").exists()

  killed = tmp_path / "killed"
  proc = subprocess.Popen(cli_args("train", *train_args(killed, steps, every)), cwd=ROOT,
                          env=env_for(data_dir), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / str(every)).exists() and time.time() < deadline:
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()]
  assert str(steps) not in done, "the run finished before SIGKILL; the test proves nothing"

  out = run_cli("train", *train_args(killed, steps, every), data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr
  resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", out.stderr).group(1))

  # segments.jsonl: one line per start, each naming the step it started from and the code
  segments = [json.loads(l) for l in (killed / "segments.jsonl").read_text().splitlines()]
  assert [s["start_step"] for s in segments] == [0, resumed_at] and resumed_at > 0
  code = provenance.code_version()
  assert all(s["code"]["git_commit"] == code["git_commit"] and s["total_steps"] == steps
             for s in segments)
  assert len((straight / "segments.jsonl").read_text().splitlines()) == 1

  # metrics.jsonl: each step once, in order (lines the killed run logged after its last
  # checkpoint were dropped on resume, not duplicated)
  logged = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, steps + 1))

  want = {r["step"]: r["batch"] for r in fingerprints(straight)}
  assert sorted(want) == list(range(1, steps + 1))
  seen = fingerprints(killed)
  assert {r["step"] for r in seen} == set(want)
  for row in seen:  # steps replayed after the kill must see the same batches again
    assert row["batch"] == want[row["step"]], row
  a, b = restore_params(straight, steps), restore_params(killed, steps)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  # export-torch reads the trainer's workdir directly (its latest step)
  out = run_cli("export-torch", f"--checkpoint={killed}", f"--out={tmp_path / 'export'}",
                data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  from safetensors.numpy import load_file
  exported = load_file(tmp_path / "export" / "projector.safetensors")
  np.testing.assert_array_equal(exported["linear_1.weight"],
                                b["['projector']['linear_1']['kernel']"].T)


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(cli_args("train", *train_args(workdir, 400, 5)), cwd=ROOT,
                          env=env_for(data_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "5").exists() and time.time() < deadline:
    assert proc.poll() is None
    time.sleep(0.02)
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "preempted" in stdout
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
  assert 5 <= steps[-1] < 400, steps
  assert steps[-1] == last  # saved exactly at the step where it stopped (log_every=1)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def losses(workdir):
  return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process(tmp_path, data_dir):
  steps = 3
  single = tmp_path / "single"
  out = run_cli("train", *train_args(single, steps, steps), data_dir=data_dir, devices=4)
  assert out.returncode == 0, out.stderr[-3000:]

  multi = tmp_path / "multi"
  port = free_port()
  procs = [subprocess.Popen(
      cli_args("train", *train_args(multi, steps, steps), "--distributed=explicit",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"),
      cwd=ROOT, env=env_for(data_dir, devices=2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  np.testing.assert_allclose(losses(multi), losses(single), atol=1e-5, rtol=0)
  a = restore_params(single, steps, devices=1)
  b = restore_params(multi, steps, devices=1)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)


def test_eight_device_fsdp_tensor_mesh_shards_parameters(tmp_path, data_dir):
  workdir = tmp_path / "mesh"
  code = f"""
import sys, json, jax
sys.path.insert(0, {str(ROOT)!r})
from tests.conftest import load_config
from mashvlm_jax.train import trainer
config = load_config("tiny_synthetic")
config.mesh.fsdp, config.mesh.tensor, config.mesh.data = 4, 2, -1
config.total_steps, config.checkpoint_every, config.log_every = 2, 2, 1
config.data.batch_size, config.data.builder_config = 8, "tiny"
out = trainer.train(config, {str(workdir)!r})
p = out["state"].params["language_model"]
report = dict(
  q=list(p["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec),
  up=list(p["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec),
  embed=list(p["embed_tokens"]["embedding"].sharding.spec),
  q_shard=list(p["layers"]["self_attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape),
  q_full=list(p["layers"]["self_attn"]["q_proj"]["kernel"].shape),
  devices=len(p["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set),
  loss=out["metrics"]["loss"])
print("REPORT" + json.dumps(report))
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env_for(data_dir, devices=8), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.split("REPORT")[-1])
  # q_proj [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor
  assert report["q"] == [None, "fsdp", "tensor", None], report
  assert report["up"] == [None, "fsdp", "tensor"], report
  assert report["embed"] == ["tensor", "fsdp"], report
  full, shard = report["q_full"], report["q_shard"]
  assert shard == [full[0], full[1] // 4, full[2] // 2, full[3]]
  assert report["devices"] == 8 and np.isfinite(report["loss"])


def test_metrics_lines_after_the_resumed_step_are_dropped(tmp_path):
  """Hand-written metrics file: steps 1-3, step 4 logged twice before a kill, and a line
  torn by the kill; resuming from step 3 keeps exactly steps 1-3."""
  from etils import epath
  from mashvlm_jax.train import trainer
  path = epath.Path(tmp_path) / "metrics.jsonl"
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4, 4)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
  trainer.drop_lines_after(path, 3)
  assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:3]
  before = path.read_text()
  trainer.drop_lines_after(path, 3)  # nothing after step 3: the file is left as it is
  assert path.read_text() == before
  assert not (epath.Path(tmp_path) / "metrics.jsonl.tmp").exists()
