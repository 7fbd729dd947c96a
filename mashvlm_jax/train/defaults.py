"""Default values for the training keys of a config (optimizer, mesh, schedule, batch).

``training_defaults(config)`` returns a copy of ``config`` in which every missing
top-level training key is filled, so a model-only config (e.g. one written for
``mashvlm info``) can still be built by the trainer or compiled by ``mashvlm compile``.
Keys the config sets are never changed; inside an existing ``optim`` section the missing
optimizer fields are filled too, and an existing ``data`` section gains ``batch_size``,
``text_len`` and ``text_buckets`` when it lacks them. ``mesh`` is taken whole or not at all (a partial mesh
means "the other axes are 1", see train/sharding.py).
"""
from __future__ import annotations

import copy

import ml_collections

# AdamW as in LLaVA/VideoChat2-style instruction tuning of a 7B decoder (train/optim.py).
OPTIM = dict(lr=2e-5, warmup_steps=100, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.0, clip_norm=1.0, freeze=[], lr_multipliers={},
             no_decay=r"(norm|bias)")
MESH = dict(data=1, fsdp=-1, tensor=1)  # -1: all remaining devices
SCALARS = dict(total_steps=1000, checkpoint_every=500, log_every=10, seed=0,
               grad_accum_steps=1, nan_policy="stop")
BATCH_SIZE = 16  # global rows per optimizer step
TEXT_LEN = 512  # padded chat-text tokens per row, when the config sets no text_len
TEXT_BUCKETS = ()  # no text-length buckets: every batch padded to text_len (data/buckets.py)


def training_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the missing training keys filled (see module docstring)."""
  out = copy.deepcopy(config)
  out.unlock()
  for key, value in SCALARS.items():
    if key not in out:
      out[key] = value
  if "mesh" not in out:
    out.mesh = ml_collections.ConfigDict(MESH)
  if "optim" not in out:
    out.optim = ml_collections.ConfigDict(OPTIM)
  else:
    for key, value in OPTIM.items():
      if key not in out.optim:
        out.optim[key] = value
  if "data" not in out:
    out.data = ml_collections.ConfigDict()
  if "batch_size" not in out.data:
    out.data.batch_size = BATCH_SIZE
  if "text_len" not in out.data:
    out.data.text_len = out.get_ref("text_len") if "text_len" in out else TEXT_LEN
  if "text_buckets" not in out.data:
    out.data.text_buckets = TEXT_BUCKETS
  return out
