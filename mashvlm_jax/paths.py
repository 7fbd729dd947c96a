"""Local paths as users type them: relative to the current directory, ``~`` expanded.

Every path a command reads from its flags or its config is resolved once, when the flags
are parsed (``DEFINE_path`` for flags, ``resolve_config_paths`` for ``--config``, which
``mashvlm_jax/cli.py`` applies to every command), so nothing downstream sees a relative
path. Orbax, for one, refuses relative checkpoint paths (in a background thread). URLs
(``gs://bucket/x``, ``s3://...``, ``file://...``) are left as they are.
"""
from __future__ import annotations

import os
import pathlib
import re
import sys
import tempfile
from typing import Callable

from absl import flags

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# Config fields that hold one local path (dotted keys; absent keys are skipped).
CONFIG_PATH_KEYS = ("init_from", "data.data_dir", "data.video_root", "data.tokenizer.path",
                    "data.row_filter.path")


def is_url(path: str) -> bool:
  return bool(_URL.match(str(path)))


def local_path(path):
  """``path`` made absolute against the current directory with ``~`` expanded; URLs,
  ``None`` and empty strings are returned unchanged."""
  if path is None or path == "" or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(str(path)))


def write_atomically(path, write: Callable[[str], None]) -> None:
  """Writes the local file ``path`` by ``write(tmp)`` into a temporary file of its own in
  the same directory, then a rename: a reader (another host of a multi-host run) sees the
  old file or the new one, never a part, and processes writing the same path at once each
  rename a whole file. A failed write leaves ``path`` as it was and no temporary file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path, text: str) -> None:
  """``text`` written to the local file ``path`` by ``write_atomically``."""
  write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def _annotation_entry(entry):
  """One ``data.annotations`` entry: a path string or a {"path", "video_root"} mapping."""
  if isinstance(entry, str):
    return local_path(entry)
  entry = dict(entry)
  for key in ("path", "video_root"):
    if entry.get(key):
      entry[key] = local_path(entry[key])
  return entry


def resolve_config_paths(config) -> None:
  """Resolves, in place, every local path field of a training/eval config
  (``CONFIG_PATH_KEYS`` and ``data.annotations``)."""
  if config is None:
    return
  for dotted in CONFIG_PATH_KEYS:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
      node = node.get(key) if hasattr(node, "get") else None
      if node is None:
        break
    if node is not None and hasattr(node, "get") and isinstance(node.get(leaf), str):
      node[leaf] = local_path(node[leaf])
  data = config.get("data") if hasattr(config, "get") else None
  annotations = data.get("annotations") if data is not None else None
  if annotations:
    for split in list(annotations.keys()):
      value = annotations[split]
      annotations[split] = ([_annotation_entry(e) for e in value]
                            if isinstance(value, (list, tuple)) else _annotation_entry(value))


class _PathParser(flags.ArgumentParser):
  """absl parser that resolves a local path when the flag is parsed."""

  def parse(self, argument):
    return local_path(argument)

  def flag_type(self):
    return "string"


def DEFINE_path(name: str, default, help: str, **kwargs):  # noqa: N802 (absl style)
  """A string flag holding a local path (or URL), resolved at parse time; listed in
  ``--help`` under the module that calls this."""
  return flags.DEFINE(_PathParser(), name, default, help,
                      serializer=flags.ArgumentSerializer(),
                      module_name=sys._getframe(1).f_globals["__name__"], **kwargs)


class _PathListParser(flags.ListParser):
  """absl parser of comma-separated local paths, each resolved when parsed."""

  def parse(self, argument):
    return [local_path(p) for p in super().parse(argument)]


def DEFINE_path_list(name: str, default, help: str, **kwargs):  # noqa: N802 (absl style)
  """A comma-separated list of local paths (or URLs), each resolved at parse time."""
  return flags.DEFINE(_PathListParser(), name, default, help,
                      serializer=flags.CsvListSerializer(","),
                      module_name=sys._getframe(1).f_globals["__name__"], **kwargs)
