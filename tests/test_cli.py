"""The console script as a user types it."""
import os
import subprocess
import sys

from conftest import ROOT


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
