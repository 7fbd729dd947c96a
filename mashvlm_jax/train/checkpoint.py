"""Training checkpoints: Orbax CheckpointManager over the train state and the data
iterator state, saved together under ``<workdir>/checkpoints/<step>/``.

- ``state``: params, optimizer state, step, RNG (Orbax StandardSave; sharded arrays are
  written by every process, asynchronously).
- ``data``: each process's Grain iterator state as ``process_<i>-of-<n>.json``, captured
  at the step boundary when ``save`` is called (so later iteration cannot leak into it).
Orbax writes into a temporary directory and renames it only when every item is complete,
so a crash during a save leaves nothing that ``latest_step`` would pick up.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


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


def encode_data_state(state: Any) -> str:
  """Grain iterator state (dict or bytes) -> JSON text."""
  if isinstance(state, bytes):
    return json.dumps({"bytes": state.decode()})
  return json.dumps({"dict": state})


def decode_data_state(text: str) -> Any:
  obj = json.loads(text)
  return obj["bytes"].encode() if "bytes" in obj else obj["dict"]


class Checkpointer:
  """Keeps the last ``keep`` checkpoints; saves asynchronously when ``use_async``."""

  def __init__(self, directory, *, keep: int = 3, use_async: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: Any) -> None:
    """Starts saving ``state`` and the (already captured) iterator state at ``step``."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(encode_data_state(data_state))),
        force=True)

  def restore(self, step: int, abstract_state, *, with_data: bool = True):
    """(state, data_state or None); ``abstract_state`` carries target shapes/shardings."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = DataStateRestore()
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    data = decode_data_state(out["data"]) if with_data else None
    return out["state"], data

  def reached_preemption(self, step: int) -> bool:
    return bool(self.manager.reached_preemption(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
