"""provenance.py: a run's code version, checked against git's own files on disk."""
import importlib.metadata
import pathlib
import subprocess

import jax
import pytest

from mashvlm_jax import provenance

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "init.defaultBranch=main"]


def git(repo, *args):
  subprocess.run([*GIT, "-C", str(repo), *args], check=True, capture_output=True)


def head_from_disk(repo: pathlib.Path) -> str:
  """HEAD's commit read from .git's files, not from git: the independent reference."""
  head = (repo / ".git" / "HEAD").read_text().strip()
  if not head.startswith("ref: "):
    return head
  ref = head[len("ref: "):]
  loose = repo / ".git" / ref
  if loose.exists():
    return loose.read_text().strip()
  for line in (repo / ".git" / "packed-refs").read_text().splitlines():
    if line.endswith(" " + ref):
      return line.split()[0]
  raise AssertionError(f"{ref} not found")


@pytest.fixture
def checkout(tmp_path):
  """A git checkout holding a package ``pkg`` with one committed module."""
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  (repo / "pkg" / "mod.py").write_text("x = 1\n")
  git(repo, "init", "-q")
  git(repo, "add", ".")
  git(repo, "commit", "-q", "-m", "one")
  return repo


def test_a_clean_checkout_reports_its_head_commit(checkout):
  state = provenance.git_state(checkout / "pkg")
  assert state == {"git_commit": head_from_disk(checkout), "git_dirty": False}
  (checkout / "pkg" / "mod.py").write_text("x = 2\n")
  git(checkout, "commit", "-q", "-am", "two")
  second = provenance.git_state(checkout / "pkg")
  assert second["git_commit"] == head_from_disk(checkout) != state["git_commit"]


def test_edits_and_new_files_make_it_dirty(checkout):
  (checkout / "pkg" / "mod.py").write_text("x = 3\n")
  assert provenance.git_state(checkout / "pkg")["git_dirty"] is True
  git(checkout, "checkout", "-q", "--", "pkg/mod.py")
  assert provenance.git_state(checkout / "pkg")["git_dirty"] is False
  (checkout / "pkg" / "new.py").write_text("y = 1\n")
  assert provenance.git_state(checkout / "pkg")["git_dirty"] is True


def test_unknown_outside_the_packages_own_checkout(tmp_path, checkout):
  unknown = {"git_commit": None, "git_dirty": None}
  plain = tmp_path / "plain" / "pkg"
  plain.mkdir(parents=True)
  assert provenance.git_state(plain) == unknown
  # a package that sits deeper inside some other repository (an installed copy in a
  # project's tree) is not that repository's code
  nested = checkout / "site" / "pkg"
  nested.mkdir(parents=True)
  assert provenance.git_state(nested) == unknown


def test_library_versions_are_the_installed_ones():
  versions = provenance.code_version()
  assert versions["jax"] == jax.__version__
  assert versions["flax"] == importlib.metadata.version("flax")
  assert set(provenance.LIBRARIES) <= set(versions)
