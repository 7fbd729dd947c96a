"""Import HuggingFace CLIP + LLaMA checkpoints into a params checkpoint the trainer starts from.

``mashvlm import-hf --llm=DIR --vision=DIR --config=configs/NAME.py --out=DIR
[--projector=FILE] [--adopt_hf_config] [--allow_pickle]`` reads both config.json files and
the safetensors weights (single file or sharded with an index), checks every tensor against
the config, and writes an Orbax params checkpoint plus model_config.json (see
convert/params_io.py). The projector is freshly initialised unless --projector is given.
Nothing is written when any check fails.
"""
from __future__ import annotations

import json
import pathlib
import time

from absl import flags
from ml_collections import config_flags

from mashvlm_jax import paths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mashvlm_7b.py",
                                lock_config=True)
_LLM = paths.DEFINE_path("llm", None, "HF LlamaForCausalLM directory (config.json + weights).")
_VISION = paths.DEFINE_path("vision", None, "HF CLIPVisionModel or CLIPModel directory.")
_OUT = paths.DEFINE_path("out", None, "Output params checkpoint directory.")
_PROJECTOR = paths.DEFINE_path("projector", None,
                               "Projector weights (.safetensors, e.g. an export's "
                               "projector.safetensors); default: freshly initialised.")
_MODEL_CONFIG = paths.DEFINE_path("model_config", None,
                                  "Instead of --config: a model_config.json or an export's "
                                  "mash_config.json to take the model config from.")
_SEED = flags.DEFINE_integer("seed", None, "Projector init seed (default: config.seed or 0).")
_ADOPT = flags.DEFINE_bool("adopt_hf_config", False,
                           "Take the LLM and vision architecture from the HF config.json files "
                           "instead of requiring the config to agree with them.")
_NONFINITE = flags.DEFINE_bool("allow_nonfinite", False,
                               "Import weights that hold NaN or inf (refused by default).")
_PICKLE = flags.DEFINE_bool("allow_pickle", False,
                            "Accept pytorch_model.bin / .pt pickles (loaded with "
                            "torch.load(weights_only=True)).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def _model_config():
  from mashvlm_jax.model.config import ModelConfig
  if _MODEL_CONFIG.value:
    data = json.loads(pathlib.Path(_MODEL_CONFIG.value).read_text())
    return ModelConfig.from_dict(data.get("model", data) if "format" in data else data), 0
  config = flags.FLAGS.config
  if config is None:
    raise SystemExit("mashvlm import-hf: --config (or --model_config) is required, e.g. "
                     "--config=configs/mashvlm_7b.py")
  return ModelConfig.from_dict(config.model), int(config.get("seed", 0))


def main(argv):
  del argv
  from mashvlm_jax.convert import hf_import, params_io
  from mashvlm_jax.convert.param_map import ConversionError
  from mashvlm_jax.model import mashvlm
  for name, flag in (("--llm", _LLM), ("--vision", _VISION), ("--out", _OUT)):
    if not flag.value:
      raise SystemExit(f"mashvlm import-hf: {name} is required")
  try:
    cfg, seed = _model_config()
    out = params_io.check_destination(_OUT.value, _OVERWRITE.value)
    t0 = time.perf_counter()
    params, cfg = hf_import.import_hf(
        _LLM.value, _VISION.value, cfg, projector_file=_PROJECTOR.value,
        seed=seed if _SEED.value is None else _SEED.value, allow_pickle=_PICKLE.value,
        adopt_hf_config=_ADOPT.value, as_jax=True, allow_nonfinite=_NONFINITE.value)
    t1 = time.perf_counter()
    params_io.save_params(out, params, cfg, overwrite=_OVERWRITE.value)
  except (ConversionError, FileExistsError, ValueError) as e:
    raise SystemExit(f"mashvlm import-hf: {e}") from None
  t2 = time.perf_counter()
  for tower in ("vision_tower", "projector", "language_model"):
    source = {"vision_tower": _VISION.value, "language_model": _LLM.value,
              "projector": _PROJECTOR.value or "fresh init"}[tower]
    print(f"  {tower:<15} {mashvlm.count_params(params[tower]):>15,} params  <- {source}")
  print(f"wrote {out} (convert {t1 - t0:.1f}s, save {t2 - t1:.1f}s)")
