"""The parameter checkpoint the trainer starts from, and the one export-torch reads.

Layout of ``directory``:
  params/             Orbax save (StandardCheckpointHandler) of the plain, unboxed params tree
  model_config.json   ModelConfig.to_dict()
The directory is written as a temporary sibling and renamed at the end, so a crash never
leaves a half-written checkpoint under the final name.

``load_params`` also reads the trainer's checkpoints (train/checkpoint.py): a step
directory ``<workdir>/checkpoints/<step>/`` (its ``state`` item's ``params`` subtree) or a
whole workdir (its latest finished step); the ModelConfig is the workdir's
``model_config.json``. Reading goes through etils.epath, so gs:// paths work.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import uuid
from typing import Mapping

import numpy as np

from mashvlm_jax.convert.param_map import ConversionError, leaves

PARAMS_DIR = "params"
CONFIG_FILE = "model_config.json"


def check_destination(directory, overwrite: bool = False) -> pathlib.Path:
  """Absolute path of an output directory; refuses an existing one unless ``overwrite``."""
  final = pathlib.Path(directory).absolute()
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
  if final.exists() and not final.is_dir():
    raise FileExistsError(f"{final} exists and is not a directory")
  return final


@contextlib.contextmanager
def atomic_directory(directory, overwrite: bool = False):
  """Yields an empty temporary sibling of ``directory`` that replaces it on success.

  On an exception the temporary directory is removed and ``directory`` is untouched.
  """
  final = check_destination(directory, overwrite)
  final.parent.mkdir(parents=True, exist_ok=True)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = final.parent / f".{final.name}.partial-{tag}"
  tmp.mkdir()
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if final.exists():
    old = final.parent / f".{final.name}.old-{tag}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, final)


BUDGET_FLOOR = 2 ** 28  # bytes


def _budget_gb(leaf_bytes) -> float:
  """Orbax's in-flight byte budget: the largest leaf (at least BUDGET_FLOOR) plus 1 MiB
  (Orbax refuses a request equal to its budget). Orbax holds a host copy of what is in
  flight, so this keeps a save's or restore's extra memory near one leaf instead of the
  whole model."""
  return (max(max(leaf_bytes, default=0), BUDGET_FLOOR) + 2 ** 20) / 1e9


def save_params(directory, params: Mapping, model_cfg, *, overwrite: bool = False) -> pathlib.Path:
  """Saves the params tree (boxed or plain; numpy or jax leaves) and its ModelConfig."""
  import flax.linen as nn
  import jax
  import orbax.checkpoint as ocp
  params = nn.unbox(params)
  with atomic_directory(directory, overwrite) as tmp:
    budget = _budget_gb([getattr(x, "nbytes", 0) for x in jax.tree.leaves(params)])
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=budget)
    checkpointer = ocp.Checkpointer(handler)  # synchronous
    try:
      checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.StandardSave(params))
    finally:
      checkpointer.close()  # no background write may outlive a failed save's cleanup
    (tmp / CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict(), indent=2, sort_keys=True)
                                   + "\n")
  return pathlib.Path(directory).absolute()


def _epath(directory):
  from etils import epath
  return epath.Path(directory)


def finished_steps(checkpoints) -> list[int]:
  """Sorted steps of a trainer's ``checkpoints/`` directory whose ``state`` item is on
  disk ([] when the directory is missing)."""
  checkpoints = _epath(checkpoints)
  if not checkpoints.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoints.iterdir()
                if p.name.isdigit() and (p / "state").is_dir())


def resolve_checkpoint(directory):
  """(Orbax item path, subtree key or None, directory holding model_config.json).

  Accepts an import-hf/params directory, a trainer step directory or a trainer workdir.
  """
  root = _epath(directory)
  if (root / PARAMS_DIR).is_dir():
    return root / PARAMS_DIR, None, root
  if (root / "state").is_dir():  # <workdir>/checkpoints/<step>
    return root / "state", "params", root.parent.parent
  if (root / "checkpoints").is_dir():  # a trainer workdir: its latest finished step
    steps = finished_steps(root / "checkpoints")
    if not steps:
      raise ConversionError(f"{root / 'checkpoints'} holds no finished checkpoint")
    return root / "checkpoints" / str(steps[-1]) / "state", "params", root
  raise ConversionError(f"{directory} is not a params checkpoint: expected {PARAMS_DIR}/ "
                        f"and {CONFIG_FILE} (import-hf), a trainer step directory with "
                        f"state/, or a trainer workdir with checkpoints/")


def load_model_config(directory):
  """The ModelConfig stored beside the params (validated)."""
  from mashvlm_jax.model.config import ModelConfig
  path = _epath(directory) / CONFIG_FILE
  if not path.is_file():
    raise ConversionError(f"{path} is missing: {directory} is not a mashvlm params "
                          f"checkpoint (expected {PARAMS_DIR}/ and {CONFIG_FILE})")
  return ModelConfig.from_dict(json.loads(path.read_text()))


# Keys that change what a checkpoint computes (ablation presets share parameter shapes,
# so a wrong --config would load silently and evaluate another model).
# "lora": its adapters are parameters of the checkpoint (its dropout is not compared: it
# changes training, not what the weights compute).
MODEL_KEYS = ("rope_mode", "mask", "num_frames", "projector", "vision", "llm", "lora")
# Fields of MODEL_KEYS entries that are not compared.
UNCOMPARED = {"lora": ("dropout",)}


def check_model_config(config, path, *, ignore: tuple[str, ...] = ()) -> None:
  """Raises ValueError naming each field (e.g. ``model.llm.num_layers``) where
  ``config.model`` differs from the model config the trainer stored beside its
  checkpoints (no-op when there is none). ``ignore``: MODEL_KEYS not compared (init_from
  skips "lora": a LoRA run may start from a checkpoint without adapters)."""
  path = _epath(path)
  if not path.exists():
    return
  from mashvlm_jax.model.config import ModelConfig
  stored = json.loads(path.read_text())
  given = ModelConfig.from_dict(config.model).to_dict()
  drop = lambda k, d: {f: v for f, v in d.items() if f not in UNCOMPARED[k]} if (
      k in UNCOMPARED and isinstance(d, dict)) else d
  diff = [f"{name}: config {a!r} vs checkpoint {b!r}" for k in MODEL_KEYS
          if k in stored and k not in ignore
          for name, a, b in _differences(f"model.{k}", drop(k, given[k]), drop(k, stored[k]))]
  if diff:
    raise ValueError(f"--config does not describe the model trained in {path.parent} "
                     f"(e.g. another ablation preset); {path} differs: " + "; ".join(diff))


def _differences(name: str, given, stored) -> list[tuple]:
  """(dotted field name, given, stored) for each leaf where two config values differ."""
  if isinstance(given, dict) and isinstance(stored, dict):
    return [d for key in sorted(set(given) | set(stored))
            for d in _differences(f"{name}.{key}", given.get(key), stored.get(key))]
  return [] if given == stored else [(name, given, stored)]


def load_params(directory, *, check: bool = True):
  """(params, ModelConfig) from ``save_params``' directory; leaves are numpy arrays.

  With ``check`` the tree's structure, shapes and dtypes must equal the model's
  (``mashvlm.abstract_params``); a difference is a ConversionError naming the leaf.
  """
  import jax
  import orbax.checkpoint as ocp
  path, subtree, config_dir = resolve_checkpoint(directory)
  cfg = load_model_config(config_dir)
  tree = ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree
  if subtree is not None:
    tree = {subtree: tree[subtree]}
  budget = _budget_gb([np.dtype(m.dtype).itemsize * math.prod(m.shape)
                       for m in jax.tree.leaves(tree)])
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=budget))
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  params = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=subtree is not None))
  if subtree is not None:
    params = params[subtree]
  if check:
    check_params(params, cfg, str(directory))
  return params, cfg


def expected_shapes(cfg) -> dict:
  """{path: (shape, dtype)} of every params leaf of the model ``cfg`` describes."""
  import flax.linen as nn
  from mashvlm_jax.model import mashvlm
  abstract = nn.unbox(mashvlm.abstract_params(cfg))
  return {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves(abstract).items()}


def check_params(params: Mapping, cfg, where: str = "params") -> None:
  """Raises ConversionError listing missing, unexpected or mis-shaped leaves."""
  want = expected_shapes(cfg)
  have = {p: (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves(params).items()}
  problems = [f"missing {'/'.join(p)} {want[p][1]}{list(want[p][0])}"
              for p in want if p not in have]
  problems += [f"unexpected {'/'.join(p)}" for p in have if p not in want]
  problems += [f"{'/'.join(p)}: expected {want[p][1]}{list(want[p][0])}, found "
               f"{have[p][1]}{list(have[p][0])}" for p in want if p in have and have[p] != want[p]]
  if problems:
    more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
    raise ConversionError(f"{where}: parameters do not match the model config:\n  "
                          + "\n  ".join(problems[:30]) + more)
