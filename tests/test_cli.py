"""The console script as a user types it."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, in_ci
from mashvlm_jax import cli


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_info_forward_tiny():
  out = run("info", "--config=configs/tiny_synthetic.py:ablation=t7_balanced", "--forward")
  assert out.returncode == 0, out.stderr
  assert "temporal M=23][spatial N=64]" in out.stdout
  assert "rope_mode=balanced" in out.stdout
  assert "finite True" in out.stdout


def test_unknown_command_and_missing_config():
  out = run("bogus")
  assert out.returncode == 2 and "unknown command 'bogus'" in out.stderr
  out = run("info")
  assert out.returncode != 0 and "--config is required" in out.stderr


def console_script() -> str:
  """The installed ``mashvlm`` console script (pyproject [project.scripts]): the one beside
  this Python, else the first on PATH. Missing: a failure under CI, a skip elsewhere."""
  search = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
  found = shutil.which("mashvlm", path=search)
  if found is None:
    message = "no mashvlm console script on PATH: pip install -e . -c constraints.txt"
    if in_ci():
      pytest.fail(message)
    pytest.skip(message)
  return found


def defined_flags(path) -> set[str]:
  """Names of the absl flags a command module defines (first argument of DEFINE_* calls)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if (isinstance(node, ast.Call) and node.args
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        and getattr(node.func, "attr", getattr(node.func, "id", "")).startswith("DEFINE")):
      names.add(node.args[0].value)
  return names


@pytest.fixture(scope="module")
def helps():
  """{command: ``mashvlm <command> --help`` through the installed script}, every command
  found in mashvlm_jax/commands/ (cli.commands())."""
  script = console_script()
  return {command: subprocess.run([script, command, "--help"], cwd=ROOT,
                                  env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                  capture_output=True, text=True, timeout=300)
          for command in cli.commands()}


def test_every_command_help_shows_its_summary_and_flags(helps):
  assert len(helps) >= 9
  for command, out in helps.items():
    path = cli.commands()[command]
    assert out.stdout.startswith(cli.summary(path)), (command, out.stdout[:500], out.stderr)
    flags = defined_flags(path)
    assert flags, f"{path} defines no flags"
    for name in flags:
      assert f"--{name}:" in out.stdout or f"--[no]{name}:" in out.stdout, (command, name)


def test_multi_host_commands_help_shows_the_shared_distributed_flags(helps):
  """train and tpl adopt mashvlm_jax/distributed.py's flags: their --help lists them."""
  shared = defined_flags(ROOT / "mashvlm_jax" / "distributed.py")
  assert {"distributed", "coordinator_address", "num_processes", "process_id"} <= shared
  for command in ("train", "tpl"):
    for name in shared:
      assert f"--{name}:" in helps[command].stdout, (command, name)
  assert "--distributed:" not in helps["eval"].stdout


def test_every_command_help_exits_0(helps):
  failed = {command: out.returncode for command, out in helps.items() if out.returncode}
  assert not failed, failed


def test_console_script_lists_every_command():
  out = subprocess.run([console_script(), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  for command, path in cli.commands().items():
    assert f"  {command:<16} {cli.summary(path)}" in out.stdout


def test_console_logging_keeps_one_handler_per_process():
  import logging
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["mashvlm"])
  ours = logging.getLogger("mashvlm")
  before = [h for h in ours.handlers if not getattr(h, "mashvlm_console", False)]
  for _ in range(3):  # three commands run in one process (tests, notebooks)
    cli.console_logging()
  tagged = [h for h in ours.handlers if getattr(h, "mashvlm_console", False)]
  assert len(tagged) == 1
  assert [h for h in ours.handlers if h not in tagged] == before
