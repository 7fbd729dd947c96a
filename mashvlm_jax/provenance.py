"""Which code a run was trained or scored with, recorded beside its results.

A run that is resumed, or scored later, may meet other code than the one that started it;
its workdir says which (``segments.jsonl``, written by the trainer; ``result.json`` of
``benchmarks/methods.py``). Nothing here reads the network or fails a run: a field that
cannot be known is None.
"""
from __future__ import annotations

import importlib.metadata
import pathlib
import platform
import subprocess

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


def git_state(package_dir: pathlib.Path = PACKAGE_DIR) -> dict:
  """{"git_commit": 40-hex sha, "git_dirty": bool (uncommitted changes or untracked files)}
  when ``package_dir`` is the package of a git checkout (its top level holds ``package_dir`` itself), else both None: an installed
  wheel, a checkout without git, or a package sitting inside some other repository."""
  unknown = {"git_commit": None, "git_dirty": None}

  def git(*args) -> str | None:
    try:
      out = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  top = git("rev-parse", "--show-toplevel")
  if not top or pathlib.Path(top).resolve() / package_dir.name != package_dir.resolve():
    return unknown
  commit = git("rev-parse", "HEAD")
  status = git("status", "--porcelain")  # untracked files count: a new module is code too
  if commit is None or status is None:
    return unknown
  return {"git_commit": commit, "git_dirty": bool(status)}


def library_versions() -> dict:
  """Installed versions of the libraries whose behaviour a run depends on (None: absent)."""
  versions = {"python": platform.python_version()}
  for name in ("mashvlm_jax", *LIBRARIES):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def code_version(package_dir: pathlib.Path = PACKAGE_DIR) -> dict:
  """The code's git commit and dirty flag, and the library versions, as one JSON object."""
  return {**git_state(package_dir), **library_versions()}
