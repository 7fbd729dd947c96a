"""The README's main command and its eval command, run as a newcomer types them: from the
root of a copy of the repository, with the README's relative paths, through the installed
``mashvlm`` console script. Only the run length is shortened, by appending flags.

When the README's commands change, this test follows them: it reads them from README.md.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SHORTEN_TRAIN = ["--config.total_steps=4", "--config.checkpoint_every=2",
                 "--config.log_every=2"]
SHORTEN_EVAL = ["--max_items=4"]


def readme_command(program: str) -> list[str]:
  """argv of the ``mashvlm <program>`` command in a README bash block (the last command
  of its ``&&`` chain, after the set-up steps)."""
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
  found = [part.strip() for block in blocks for part in block.split("&&")
           if part.strip().startswith(f"mashvlm {program} ")]
  assert len(found) == 1, f"README.md should hold one `mashvlm {program}` command: {found}"
  return shlex.split(found[0])


def repository_copy(dest):
  """The tracked files of the repository (what a fresh clone holds), copied to ``dest``."""
  files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode().split("\0")
  for name in filter(None, files):
    if (ROOT / name).is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dest / name)
  return dest


def newcomer_env():
  """This environment's console scripts on PATH, and none of the test suite's redirections
  (the data goes where the README's command puts it)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  for key in ("MASHVLM_DATA_DIR", "PYTEST_CURRENT_TEST", "XLA_FLAGS"):
    env.pop(key, None)
  return env


def test_readme_main_command_then_eval_as_typed(tmp_path):
  if shutil.which("mashvlm", path=newcomer_env()["PATH"]) is None:
    pytest.fail("the `mashvlm` console script is not installed (pip install -e .)")
  clone = repository_copy(tmp_path / "clone")
  train = readme_command("train")
  workdir = next(a.split("=", 1)[1] for a in train if a.startswith("--workdir="))
  assert not os.path.isabs(workdir), "the README's workdir is meant to be relative"

  out = subprocess.run(train + SHORTEN_TRAIN, cwd=clone, env=newcomer_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  checkpoints = clone / workdir / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2", "4"]
  assert not [p.name for p in checkpoints.iterdir() if "tmp" in p.name]
  assert (clone / "data_cache").is_dir(), "the data set was not built where the README says"
  assert "Downloading and preparing" not in out.stdout + out.stderr

  evaluate = readme_command("eval")
  out = subprocess.run(evaluate + SHORTEN_EVAL, cwd=clone, env=newcomer_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  written = clone / workdir / "eval" / "step4" / "synthetic" / "result.json"
  assert f"results: {written}" in out.stdout
  result = json.loads(written.read_text())
  assert result["binary"]["counts"] and result["labels"]["counts"]
