"""Score attention heads for RVE: ARS per layer and head on verb-swapped training pairs.

``mashvlm rve-heads --config=configs/NAME.py[:ARGS] --checkpoint=DIR [--pairs=32]
[--out=rve_heads.json] [--k=K] [--layers=middle|auto|0,1,...] [--visual=all|spatial|
temporal]``. DIR is a trainer workdir, one of its checkpoints or an ``import-hf`` output.
Writes the heads file (ARS table, K, the chosen heads per layer, the enhanced layers, the
pairs used, the model config hash) and an ARS heatmap PNG beside it (same name, .png);
``mashvlm eval --rve=FILE`` applies it. Pairs are the first clips with an action of the
training split (analysis/rve_heads.py).
"""
from __future__ import annotations

import numpy as np
from absl import flags
from ml_collections import config_flags

from mashvlm_jax import paths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_CHECKPOINT = paths.DEFINE_path("checkpoint", None, "Checkpoint directory (see above).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PAIRS = flags.DEFINE_integer("pairs", 32, "Verb-swapped pairs (training clips) to average.")
_OUT = paths.DEFINE_path("out", "rve_heads.json", "The heads file (JSON); the heatmap goes "
                         "beside it as .png.")
_K = flags.DEFINE_integer("k", None, "Heads per set (default min(5, heads // 4), >= 1).")
_LAYERS = flags.DEFINE_string("layers", "middle", "Enhanced layers: middle ([L/4, 3L/4)), "
                              "auto (the ceil(L/2) highest mean ARS) or 0-based indices.")
_VISUAL = flags.DEFINE_enum("visual", "all", ["all", "spatial", "temporal"],
                            "Visual keys: all video tokens or one block.")
_SPLIT = flags.DEFINE_string("split", None, "Training split to draw clips from (default: "
                             "config.data.train_split).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per batch.")


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _CHECKPOINT.value:
    raise SystemExit("mashvlm rve-heads: --config and --checkpoint are required, e.g. "
                     "--config=configs/tiny_synthetic.py --checkpoint=workdir/tiny")
  from mashvlm_jax.analysis import rve, rve_heads
  from mashvlm_jax.eval import common
  from mashvlm_jax.model.config import ModelConfig
  if not _OUT.value.endswith(".json"):
    raise SystemExit(f"mashvlm rve-heads: --out must name a .json file, found {_OUT.value}")
  if _K.value is not None:  # before loading the checkpoint
    rve.check_k(_K.value, ModelConfig.from_dict(config.model).llm.num_heads)
  params = common.load_params(config, _CHECKPOINT.value, _STEP.value)
  try:
    record = rve_heads.write_heads_file(
        config, params, _OUT.value, pairs=_PAIRS.value, k=_K.value, layers=_LAYERS.value,
        visual=_VISUAL.value, split=_SPLIT.value, batch_size=_BATCH.value,
        checkpoint=_CHECKPOINT.value,
        step=common.checkpoint_step(_CHECKPOINT.value, _STEP.value))
  except ValueError as e:
    raise SystemExit(f"mashvlm rve-heads: {e}") from None
  means = np.asarray(record["ars"]).mean(axis=1)
  print("layer  mean ARS  sensitive heads  insensitive heads")
  for layer in record["layers_by_mean_ars"]:
    star = "*" if layer in record["layers"] else " "
    print(f"{layer:>4}{star} {means[layer]:9.4f}  {record['sensitive'][layer]!s:<16} "
          f"{record['insensitive'][layer]}")
  print(f"(* enhanced: {record['layers']})\nheads: {_OUT.value}\nheatmap: {record['png']}")
