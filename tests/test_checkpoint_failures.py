"""A checkpoint save that fails stops the run at once: non-zero exit, the step and the
cause named, and the last good checkpoint intact and restorable. The failures are real,
made after a first run has saved: the checkpoint directory made read-only (the save fails
in the training thread; as root, which ignores permissions, the run is started without
CAP_DAC_OVERRIDE), or a file-size limit smaller than the parameters (the write fails in
Orbax's background thread, as a full disk would). A save slower than
``checkpoint_timeout_s`` fails the same way and names the setting."""
import concurrent.futures
import ctypes
import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import threading

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mashvlm_jax.train import checkpoint as ckpt_lib

from test_train_run import (ROOT, cli_args, data_dir, env_for,  # noqa: F401  (data_dir)
                            restore_params, run_cli, train_args)

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def without_permission_override():
  """preexec_fn: as root, drop the capabilities that bypass file permissions, so that a
  read-only directory is read-only for the child too (a no-op for other users)."""
  if os.geteuid() != 0:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
    if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed: cannot make a "
                                        "directory read-only for a root test process")


def small_file_limit():
  """preexec_fn: files may not grow past 1 MiB (EFBIG instead of SIGXFSZ); the metrics
  stay far below it, a checkpoint's parameter file does not."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def train_failing(workdir, data_dir, steps, every, how):
  """Resumes ``workdir`` under a failure ``how`` ("read_only" or "file_limit")."""
  checkpoints = workdir / "checkpoints"
  if how == "read_only":
    checkpoints.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
  try:
    return subprocess.run(cli_args("train", *train_args(workdir, steps, every)), cwd=ROOT,
                          env=env_for(data_dir), capture_output=True, text=True, timeout=600,
                          preexec_fn=dict(read_only=without_permission_override,
                                          file_limit=small_file_limit)[how])
  finally:
    checkpoints.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)


def logged_steps(workdir):
  return [json.loads(line)["step"] for line in
          (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def tree_digest(directory) -> str:
  """sha256 over every file's relative path and bytes below ``directory``."""
  h = hashlib.sha256()
  for path in sorted(p for p in directory.rglob("*") if p.is_file()):
    h.update(str(path.relative_to(directory)).encode())
    h.update(path.read_bytes())
  return h.hexdigest()


def test_failed_save_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / "run"
  out = run_cli("train", *train_args(workdir, 4, 2), data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2, 4]
  before = tree_digest(workdir / "checkpoints" / "4")

  # A periodic save failing in the background (due at 6 and 8; the one at 6 fails), then
  # a final save (step 5) failing in the training thread.
  for steps, every, failing, how in ((8, 2, 6, "file_limit"), (5, 100, 5, "read_only")):
    out = train_failing(workdir, data_dir, steps, every, how)
    assert out.returncode != 0, f"{how}: the run went on although nothing was saved"
    assert (f"step {failing} in {workdir / 'checkpoints'} failed" in out.stderr
            and "last good checkpoint is step 4" in out.stderr), out.stderr[-3000:]
    # stopped at once: at the latest one step after the failed save. Each run resumed from
    # step 4 (dropping the lines a failed run logged after it), so its own lines are those
    # after step 4.
    logged = logged_steps(workdir)
    this_run = [step for step in logged if step > 4]
    assert logged[:4] == [1, 2, 3, 4] and this_run == list(range(5, 5 + len(this_run)))
    assert this_run and max(this_run) <= failing + 1, (how, this_run)
    assert checkpoint_steps(workdir) == [2, 4]
    assert tree_digest(workdir / "checkpoints" / "4") == before

  restore_params(workdir, 4)  # restorable by a fresh process


def slow_commits(monkeypatch, seconds: float):
  """Every later Orbax array save commits ``seconds`` after it starts: one more commit
  future, completed by a timer thread, as a slow file system would delay the write."""
  original = ocp.StandardCheckpointHandler.async_save

  async def async_save(self, *args, **kwargs):
    futures = list(await original(self, *args, **kwargs) or [])
    late = concurrent.futures.Future()
    threading.Timer(seconds, late.set_result, (None,)).start()
    return futures + [late]
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)


def test_a_save_slower_than_the_timeout_fails_naming_the_setting(tmp_path, monkeypatch):
  state = {"w": jnp.arange(4.0)}
  short = ckpt_lib.Checkpointer(tmp_path / "short", timeout_s=1)
  short.save(1, state, {"visits": 1})
  short.check()
  slow_commits(monkeypatch, 3.0)
  short.save(2, state, {"visits": 2})
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"(?s)step 2 .*TimeoutError.*checkpoint_timeout_s=1 s.*"
                           r"last good checkpoint is step 1"):
    short.check()
  restored, data, _ = short.restore(1, {"w": jnp.zeros(4)})
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  assert data == {"visits": 1} and short.all_steps() == [1]

  # The same slow commit within a longer timeout is saved.
  long = ckpt_lib.Checkpointer(tmp_path / "long", timeout_s=30)
  long.save(2, state, {"visits": 2})
  long.wait()
  assert long.all_steps() == [2]
  with pytest.raises(ValueError, match="checkpoint_timeout_s must be a positive"):
    ckpt_lib.Checkpointer(tmp_path / "bad", timeout_s=0)
