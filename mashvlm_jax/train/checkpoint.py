"""Training checkpoints: Orbax CheckpointManager over the train state and the data
iterator state, saved together under ``<workdir>/checkpoints/<step>/``.

- ``state``: params, optimizer state, step, RNG (Orbax StandardSave; sharded arrays are
  written by every process, asynchronously).
- ``data``: each process's Grain iterator state as ``process_<i>-of-<n>.json``, captured
  at the step boundary when ``save`` is called (so later iteration cannot leak into it).
Orbax writes into a temporary directory and renames it only when every item is complete,
so a crash during a save leaves nothing that ``latest_step`` would pick up.

A save that fails, in the caller or in Orbax's background threads, raises
``CheckpointSaveError`` from the next ``check()`` (the trainer calls it every step, so on
the step after the save at the latest), from the next ``save`` or from ``wait``. Orbax itself
only logs some background failures and would let training run on with nothing saved.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from mashvlm_jax import paths


class DataStateHandler(ocp.CheckpointHandler):
  """Per-process JSON file holding a data iterator state."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(args.state)

  def restore(self, directory: epath.Path, args: "DataStateRestore" = None) -> str:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f"{path} not found: the data state was saved by a different number of processes "
          f"({found}); resume with the same process count, or restore only the state")
    return path.read_text()

  def metadata(self, directory):
    return None

  def structure(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: str


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def encode_data_state(state: Any, counters: dict | None = None) -> str:
  """Grain iterator state (dict or bytes), and this process's data counters (such as
  ``read_failures``: ints that must survive a resume), -> JSON text."""
  obj = {"bytes": state.decode()} if isinstance(state, bytes) else {"dict": state}
  if counters:
    obj["counters"] = {k: int(v) for k, v in counters.items()}
  return json.dumps(obj)


def decode_data_state(text: str) -> Any:
  """JSON text -> the Grain iterator state."""
  obj = json.loads(text)
  return obj["bytes"].encode() if "bytes" in obj else obj["dict"]


def decode_data_counters(text: str) -> dict:
  """JSON text -> the data counters ({} in checkpoints written before they were saved)."""
  return dict(json.loads(text).get("counters", {}))


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; earlier finished checkpoints are untouched."""


# Orbax's own default: an asynchronous save not committed within this many seconds fails.
DEFAULT_TIMEOUT_S = 1200


class Checkpointer:
  """Keeps the last ``keep`` checkpoints; saves asynchronously when ``use_async``.

  ``directory`` may be relative (it is made absolute here: Orbax refuses relative paths)
  or a URL such as gs://bucket/run/checkpoints. ``timeout_s``: wall seconds an
  asynchronous save may take from its start to its commit on every process; a slower save
  fails (config ``checkpoint_timeout_s``). The clock runs while the process is stopped.
  """

  def __init__(self, directory, *, keep: int = 3, use_async: bool = True,
               timeout_s: int = DEFAULT_TIMEOUT_S):
    self.directory = epath.Path(paths.local_path(str(directory)))
    if int(timeout_s) <= 0:
      raise ValueError(f"checkpoint_timeout_s must be a positive number of seconds, "
                       f"found {timeout_s}")
    self.timeout_s = int(timeout_s)
    # Step directories are created in the caller: created in Orbax's background thread, a
    # failure to create one surfaced only as a 5-minute signal timeout.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=use_async,
        cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(timeout_secs=self.timeout_s,
                                       create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))
    self._pending: int | None = None  # step whose save has started and not been checked

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any, counters: dict | None = None) -> None:
    """Starts saving ``state``, the (already captured) iterator state and this process's
    data counters at ``step``.

    Waits for the previous save first and raises ``CheckpointSaveError`` if it failed."""
    self._settle()
    try:
      data = DataStateSave(encode_data_state(data_state, counters))
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=data), force=True)
    except Exception as e:  # noqa: BLE001 (re-raised with the step and directory)
      raise CheckpointSaveError(self._failure(step, e)) from e
    self._pending = step
    if not self.manager.is_saving_in_progress():
      self._settle()

  def check(self) -> None:
    """Call it every step: the first call after a save waits for that save to finish (the
    write overlaps one step's compute) and raises ``CheckpointSaveError`` if it failed, so
    a failure stops the run on the step after the save at the latest; otherwise free."""
    if self._pending is not None:
      self._settle()

  def _settle(self) -> None:
    """Waits for the pending save, then checks that its step is on disk."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 (re-raised with the step and directory)
      raise CheckpointSaveError(self._failure(step, e)) from e
    self.manager.reload()  # what is on disk, not what the manager meant to write
    if step not in self.manager.all_steps():
      raise CheckpointSaveError(self._failure(step, "the step directory was not finalised "
                                                    "(Orbax logged the cause above)"))

  def _failure(self, step: int, cause) -> str:
    try:
      self.manager.reload()
      good = self.manager.latest_step()
    except Exception:  # noqa: BLE001 (the report must not hide the original cause)
      good = "unknown"
    hint = ""
    if isinstance(cause, TimeoutError):
      hint = (f" The save did not commit within checkpoint_timeout_s={self.timeout_s} s: a "
              f"slow or stalled file system, or a stopped process; raise it with "
              f"--config.checkpoint_timeout_s if saves of this size need longer.")
    cause = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
    return (f"saving the checkpoint of step {step} in {self.directory} failed: "
            f"{cause.rstrip('.')}.{hint} "
            f"The last good checkpoint is step {good}; earlier checkpoints are intact.")

  def restore(self, step: int, abstract_state, *, with_data: bool = True):
    """(state, data_state or None, this process's data counters: {} without data or when
    the checkpoint has none); ``abstract_state`` carries target shapes/shardings."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = DataStateRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    if not with_data:
      return out["state"], None, {}
    return out["state"], decode_data_state(out["data"]), decode_data_counters(out["data"])

  def reached_preemption(self, step: int) -> bool:
    return bool(self.manager.reached_preemption(step))

  def wait(self) -> None:
    """Waits for the last save; raises ``CheckpointSaveError`` if it failed."""
    self._settle()
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
