import importlib
import importlib.util
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# How each optional dependency of the tests is installed (pyproject.toml extras).
INSTALL = {
    "torch": 'pip install -e ".[torch]" -c constraints.txt',
    "transformers": 'pip install -e ".[torch]" -c constraints.txt',
    "safetensors": 'pip install -e ".[torch]" -c constraints.txt',
    "peft": 'pip install -e ".[torch]" -c constraints.txt',
    "libtpu": 'pip install -e ".[tpu]" -c constraints.txt',
    "xmanager": 'pip install -e ".[launch]" -c constraints.txt',
}


def in_ci() -> bool:
  """True when the CI environment variable is set (CI=true, as CI services set it)."""
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str):
  """Imports ``module`` for the tests that need it. Under CI a missing module fails the
  run (ImportError); elsewhere the test (or module, at import time) skips and the reason
  says how to install it."""
  if in_ci():
    return importlib.import_module(module)
  top = module.split(".")[0]
  how = INSTALL.get(top, f"pip install {top}")
  return pytest.importorskip(module, reason=f"{module} is not installed: {how}")


def run_cli(*args, cwd, timeout: int = 600):
  """``python -m mashvlm_jax.cli *args`` run from ``cwd`` with the arguments as a user
  types them (relative paths), on CPU, without $MASHVLM_DATA_DIR; asserts it exits 0 and
  returns the CompletedProcess (stdout, stderr)."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  env.pop("PYTEST_CURRENT_TEST", None)
  env.pop("MASHVLM_DATA_DIR", None)
  out = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def load_config(name: str, arg: str | None = None):
  """configs/<name>.py get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f"configs.{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def user_config_file(body: str) -> str:
  """The text of a user's config file: ``body`` (its ``get_config``) built on
  configs/tiny_synthetic.py, which it loads by absolute path as ``tiny``."""
  return (f"import importlib.util\n"
          f"spec = importlib.util.spec_from_file_location("
          f"\"tiny\", {str(ROOT / 'configs' / 'tiny_synthetic.py')!r})\n"
          f"tiny = importlib.util.module_from_spec(spec)\n"
          f"spec.loader.exec_module(tiny)\n\n" + body)


@pytest.fixture
def tiny_config():
  return load_config("tiny_synthetic")
