"""Plot where text attends (paper Fig. 6): mass on spatial vs temporal tokens per layer.

``mashvlm attention-plot --config=configs/NAME.py[:ARGS] --checkpoint=DIR
--question="Is the person skiing?" (--video=FILE | --split=test_unusual --index=0)
[--out=attention.png] [--queries=all|last]``. Several checkpoints (comma-separated, with
--names) are drawn side by side, e.g. a baseline beside MASH-VLM; each is run with the
same --config (its ablation preset must match how that checkpoint was trained: give
--configs with one config file per checkpoint otherwise).
"""
from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from mashvlm_jax import paths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_CHECKPOINTS = paths.DEFINE_path_list("checkpoint", None, "Checkpoint directory (or several).")
_CONFIGS = flags.DEFINE_list("configs", None, "Optional config file[:ARGS] per checkpoint.")
_NAMES = flags.DEFINE_list("names", None, "Panel titles, one per checkpoint.")
_QUESTION = flags.DEFINE_string("question", None, "The question asked about the video.")
_VIDEO = paths.DEFINE_path("video", None, "A video file (decoded at the model's shape).")
_SPLIT = flags.DEFINE_string("split", None, "Or a data split of the config ...")
_INDEX = flags.DEFINE_integer("index", 0, "... and the record index in it.")
_OUT = paths.DEFINE_path("out", "attention.png", "Output PNG (a .json with the numbers "
                         "is written beside it).")
_QUERIES = flags.DEFINE_enum("queries", "all", ["all", "last"],
                             "Text queries averaged: every text token or the last one.")


def load_frames(config):
  """uint8 [T, H, W, 3] from --video or --split/--index, and a description."""
  num_frames, size = int(config.model.num_frames), int(config.model.vision.image_size)
  if _VIDEO.value:
    from mashvlm_jax.data import video
    return video.read_video(_VIDEO.value, num_frames, "middle", size), _VIDEO.value
  if not _SPLIT.value:
    raise SystemExit("mashvlm attention-plot: give --video=FILE or --split=NAME --index=K")
  from mashvlm_jax.data import pipeline
  record = pipeline.make_eval_records(config, _SPLIT.value)[_INDEX.value]
  return record["frames"], (f"{record['id']} ({record['kind']}: "
                            f"{record['action'] or 'no action'}, {record['scene']})")


def load_config_file(spec: str):
  """``path.py[:ARGS]`` -> its get_config(ARGS) (the --config convention)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("attention_plot_config", path)
  if module_spec is None:
    raise SystemExit(f"mashvlm attention-plot: cannot load config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  paths.resolve_config_paths(config)
  return config


def config_for(index: int, default):
  if not _CONFIGS.value:
    return default
  if len(_CONFIGS.value) != len(_CHECKPOINTS.value):
    raise SystemExit("mashvlm attention-plot: give one --configs entry per checkpoint")
  config = load_config_file(_CONFIGS.value[index])
  config.data = default.data  # the video and tokenizer come from --config
  return config


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _CHECKPOINTS.value or not _QUESTION.value:
    raise SystemExit("mashvlm attention-plot: --config, --checkpoint and --question are "
                     "required")
  from mashvlm_jax.eval import common, plots
  from mashvlm_jax.model.config import ModelConfig
  names = _NAMES.value or _CHECKPOINTS.value
  if len(names) != len(_CHECKPOINTS.value):
    raise SystemExit("mashvlm attention-plot: give one --names entry per checkpoint")
  frames, source = load_frames(config)
  masses = {}
  for k, (name, path) in enumerate(zip(names, _CHECKPOINTS.value)):
    cfg_k = config_for(k, config)
    params = common.load_params(cfg_k, path)
    prompt = common.Prompter(cfg_k)(_QUESTION.value)
    probs, types = plots.attention_probs(ModelConfig.from_dict(cfg_k.model), params, frames,
                                         prompt)
    masses[name] = plots.attention_mass(probs, types, _QUERIES.value)
  title = f"{_QUESTION.value}  |  {source}"
  plots.plot_mass(masses, _OUT.value, title)
  numbers = {n: {k: v.tolist() for k, v in m.items()} for n, m in masses.items()}
  with open(_OUT.value.rsplit(".", 1)[0] + ".json", "w") as f:
    json.dump({"question": _QUESTION.value, "video": source, "queries": _QUERIES.value,
               "mass": numbers}, f, indent=2)
  print(f"wrote {_OUT.value}")
