"""mashvlm params -> directories that PyTorch / HuggingFace transformers load.

  OUT/language_model/      config.json + safetensors: transformers.LlamaForCausalLM
  OUT/vision_tower/        config.json + safetensors: transformers.CLIPVisionModel
  OUT/projector.safetensors  linear_1.{weight,bias} [, linear_2.*] in torch [out, in] layout
  OUT/action_token.safetensors  with model.action_token.enabled: embedding [D] and
                           {verb,noun,action}_head.weight [classes, D] (bias-free)
  OUT/mash_config.json     token split, RoPE mode, mask switches, feature layer, model config
  OUT/language_model_adapter/  (LoRA checkpoints, ``lora="adapter"``) a PEFT adapter:
                           adapter_config.json + adapter_model.safetensors, which
                           ``peft.PeftModel.from_pretrained(llama, dir)`` loads

A LoRA checkpoint (model.lora.rank > 0) is exported ``lora="merge"`` (default: each
adapted projection written as W + (alpha / rank) B A, the adapter folded away, one layer at
a time) or ``lora="adapter"`` (language_model/ holds the base weights W, the adapter
directory holds A and B with PEFT's names).

Weights are streamed tensor by tensor (``param_map`` transforms, then a cast), so peak
memory stays near one copy of the params. Above ``max_shard_bytes`` a tower is written as
HuggingFace shards with ``model.safetensors.index.json``. ``torch_reference.py`` runs the
whole MASH-VLM forward from such a directory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil

import ml_dtypes
import numpy as np

from mashvlm_jax import layout
from mashvlm_jax.convert import param_map, safetensors_io
from mashvlm_jax.convert.param_map import ConversionError

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
LLM_DIR, VISION_DIR = "language_model", "vision_tower"
PROJECTOR_FILE, MASH_CONFIG = "projector.safetensors", "mash_config.json"
ACTION_TOKEN_FILE = "action_token.safetensors"
FORMAT = "mashvlm-torch-export"
DEFAULT_SHARD_BYTES = 5 * 10 ** 9
ADAPTER_DIR = "language_model_adapter"
LORA_FORMS = ("merge", "adapter")


def llama_hf_config(llm, dtype: str) -> dict:
  """LlamaForCausalLM config.json; legacy rope keys, read by transformers 4.45+ and 5."""
  scaling = llm.rope_scaling_dict
  max_positions = 4096
  if scaling and "original_max_position_embeddings" in scaling:
    max_positions = int(scaling["original_max_position_embeddings"] * scaling["factor"])
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
      "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
      "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
      "head_dim": llm.dim_per_head, "hidden_act": "silu",
      "max_position_embeddings": max_positions, "rms_norm_eps": llm.rms_norm_eps,
      "rope_theta": llm.rope_theta, "rope_scaling": scaling,
      "tie_word_embeddings": llm.tie_word_embeddings, "attention_bias": llm.attention_bias,
      "mlp_bias": llm.mlp_bias, "attention_dropout": 0.0, "use_cache": True,
      "torch_dtype": dtype,
  }


def clip_hf_config(vision, dtype: str) -> dict:
  """CLIPVisionModel config.json."""
  return {
      "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model",
      "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
      "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
      "num_channels": 3, "image_size": vision.image_size, "patch_size": vision.patch_size,
      "hidden_act": vision.hidden_act, "layer_norm_eps": vision.layer_norm_eps,
      "attention_dropout": 0.0, "torch_dtype": dtype,
  }


def mash_config(cfg, dtype: str) -> dict:
  """Everything beyond the two HF towers that the MASH-VLM forward needs."""
  from mashvlm_jax.model.vision import CLIP_MEAN, CLIP_STD
  m, n = cfg.video_token_counts
  action = cfg.action_token.enabled
  files = {"language_model": LLM_DIR, "vision_tower": VISION_DIR, "projector": PROJECTOR_FILE}
  if action:
    files["action_token"] = ACTION_TOKEN_FILE
  return {
      "format": FORMAT, "version": 1, "dtype": dtype,
      "files": files,
      "token_split": {
          "num_frames": cfg.num_frames, "num_temporal": m, "num_spatial": n,
          "grid": cfg.vision.grid, "num_segments": layout.NUM_SEGMENTS,
          "segments": "numpy.array_split of the frames", "spatial_pool": 2,
          "temporal_order": ["cls", "frame_mean", "frame_difference"],
          "sequence": ("[temporal M][spatial N][action 1][text L], the action token typed "
                       "as text" if action else "[temporal M][spatial N][text L]")},
      "rope": {"mode": cfg.rope_mode, "theta": cfg.llm.rope_theta,
               "scaling": cfg.llm.rope_scaling_dict,
               "rule": "rotary pair k = dims (k, k + d/2) takes ids row k % 2; harmonic: "
                       "row 0 balanced, row 1 distinct"},
      "mask": cfg.mask.as_kwargs(),
      "vision": {"feature_layer": cfg.vision.feature_layer, "features": "cls+patches",
                 "pixel_mean": list(CLIP_MEAN), "pixel_std": list(CLIP_STD)},
      "projector": {"kind": cfg.projector},
      "model": cfg.to_dict(),
  }


def lora_record(cfg, lora_form: str) -> dict:
  """mash_config's "lora" entry: the adapter as trained and how the export holds it
  ("merge": folded into language_model/; "adapter": in ADAPTER_DIR)."""
  return {"lora": {"form": lora_form, "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
                   "scale": cfg.lora.scale, "target_modules": list(cfg.lora.targeted())}}


class MergedKernel:
  """A layer-stacked kernel W [L, *in, *out] seen as W + scale * A B, with A [L, *in, r]
  and B [L, r, *out]; indexing one layer computes that layer only (in float64, cast back
  to W's dtype), so merging costs one layer of memory at a time."""

  def __init__(self, kernel, lora_a, lora_b, scale: float):
    self.kernel, self.lora_a, self.lora_b, self.scale = kernel, lora_a, lora_b, scale

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.kernel.shape)

  @property
  def dtype(self):
    return np.dtype(self.kernel.dtype)

  def __getitem__(self, layer: int) -> np.ndarray:
    f64 = lambda x: np.asarray(x[layer], np.float64)
    delta = np.tensordot(f64(self.lora_a), f64(self.lora_b), axes=1)
    return (f64(self.kernel) + self.scale * delta).astype(self.dtype)

  def __array__(self, dtype=None, copy=None):
    out = np.stack([self[i] for i in range(self.shape[0])])
    return out if dtype is None else out.astype(dtype)


def merge_lora(base, adapters, lora) -> dict:
  """The decoder tree ``base`` with every kernel ``adapters`` adapts replaced by its
  ``MergedKernel`` (``param_map.split_lora`` gives both trees)."""
  merged = {path: leaf for path, leaf in param_map.leaves(base).items()}
  for path, leaf in param_map.leaves(adapters).items():
    if path[-1] != "lora_a":
      continue
    module = path[:-2] + (path[-2][:-len(param_map.LORA_SUFFIX)],)
    kernel = module + ("kernel",)
    merged[kernel] = MergedKernel(merged[kernel], leaf,
                                  param_map.get_path(adapters, path[:-1] + ("lora_b",)),
                                  lora.scale)
  out = {}
  for path, leaf in merged.items():
    param_map.set_path(out, path, leaf)
  return out


def peft_adapter_config(lora) -> dict:
  """adapter_config.json of a PEFT LoRA adapter of LlamaForCausalLM (plain LoRA: scaling
  alpha / r, no rsLoRA or DoRA, no bias, nothing else trained)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
      "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
      "target_modules": list(lora.targeted()), "bias": "none", "fan_in_fan_out": False,
      "use_rslora": False, "use_dora": False, "init_lora_weights": True,
      "modules_to_save": None, "layers_to_transform": None, "inference_mode": True,
      "base_model_name_or_path": None,
  }


def _produce(params, t: param_map.Tensor, dtype) -> np.ndarray:
  leaf = param_map.get_path(params, t.path)
  value = np.asarray(leaf if t.layer is None else leaf[t.layer])  # one layer leaves a device
  return np.ascontiguousarray(t.to_hf(value), dtype=dtype)


def tower_specs(tower, params, dtype) -> list[safetensors_io.TensorSpec]:
  """One TensorSpec per HF tensor of ``tower`` (a TOWERS name or a param_map.Tower); data
  is produced when written."""
  prefix = (tower if isinstance(tower, param_map.Tower) else param_map.TOWERS[tower]).prefix
  return [safetensors_io.TensorSpec(prefix + t.hf, t.hf_shape, dtype,
                                    functools.partial(_produce, params, t, dtype))
          for t in param_map.plan(tower, params)]


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# HF tokenizer files a LLaMA directory may carry (copied by ``export_torch(tokenizer=)``);
# a tokenizer is usable only with one of the vocabulary files.
TOKENIZER_VOCAB_FILES = ("tokenizer.model", "tokenizer.json")
TOKENIZER_FILES = TOKENIZER_VOCAB_FILES + (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json")


def tokenizer_files(source) -> list[pathlib.Path]:
  """The tokenizer files to copy from ``source``: a directory (the HF LLaMA/Vicuna one,
  any of TOKENIZER_FILES it holds) or a single tokenizer.model / tokenizer.json file."""
  src = pathlib.Path(source)
  if src.is_file():
    if src.name not in TOKENIZER_VOCAB_FILES:
      raise ConversionError(f"tokenizer file {src} is neither tokenizer.model nor "
                            f"tokenizer.json")
    return [src]
  if not src.is_dir():
    raise ConversionError(f"tokenizer source {src} does not exist")
  found = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
  if not any(f.name in TOKENIZER_VOCAB_FILES for f in found):
    raise ConversionError(f"tokenizer directory {src} has neither tokenizer.model nor "
                          f"tokenizer.json")
  return found


def export_torch(params, cfg, out, *, dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 tokenizer=None, lora: str = "merge"):
  """Writes ``out`` (atomically: a temporary sibling renamed at the end); returns its path.

  ``params`` must match ``cfg`` (checked first, before anything is written).
  ``tokenizer``: optional directory or file (``tokenizer_files``) copied into
  language_model/, so ``AutoTokenizer.from_pretrained`` works on it too.
  ``lora``: with model.lora on, "merge" folds the adapters into language_model/,
  "adapter" writes them as a PEFT adapter in ADAPTER_DIR (module docstring).
  """
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.model.config import LoraConfig
  if dtype not in EXPORT_DTYPES:
    raise ConversionError(f"export dtype must be one of {tuple(EXPORT_DTYPES)}, found {dtype!r}")
  if max_shard_bytes < 1:
    raise ConversionError(f"shard size must be positive, found {max_shard_bytes}")
  if lora not in LORA_FORMS:
    raise ConversionError(f"--lora must be one of {LORA_FORMS}, found {lora!r}")
  params_io.check_params(params, cfg, "checkpoint")
  lora_form = lora if cfg.lora.enabled else None
  if lora == "adapter" and lora_form is None:
    raise ConversionError("--lora=adapter: the checkpoint has no LoRA adapters "
                          "(model.lora.rank is 0); export it without --lora")
  copies = tokenizer_files(tokenizer) if tokenizer else []
  np_dtype = EXPORT_DTYPES[dtype]
  llm, adapters = param_map.split_lora(params["language_model"])
  if lora_form == "merge":
    llm = merge_lora(llm, adapters, cfg.lora)
  params = dict(params, language_model=llm)
  specs = {tower: tower_specs(tower, params[tower], np_dtype)
           for tower in param_map.present_towers(params)}
  adapter_specs = (tower_specs(param_map.LORA_TOWER, adapters, np_dtype)
                   if lora_form == "adapter" else [])
  # merged: the weights are a model without adapters, and its record says so
  recorded = dataclasses.replace(cfg, lora=LoraConfig()) if lora_form == "merge" else cfg
  with params_io.atomic_directory(out, overwrite) as tmp:
    for tower, sub, hf_config in (
        ("language_model", LLM_DIR, llama_hf_config(cfg.llm, dtype)),
        ("vision_tower", VISION_DIR, clip_hf_config(cfg.vision, dtype))):
      (tmp / sub).mkdir()
      _write_json(tmp / sub / "config.json", hf_config)
      safetensors_io.write_checkpoint(tmp / sub, specs[tower], max_shard_bytes)
    safetensors_io.write_file(tmp / PROJECTOR_FILE, specs["projector"],
                              {"format": "pt", "projector": cfg.projector})
    if "action_token" in specs:
      safetensors_io.write_file(tmp / ACTION_TOKEN_FILE, specs["action_token"],
                                {"format": "pt"})
    if adapter_specs:
      (tmp / ADAPTER_DIR).mkdir()
      _write_json(tmp / ADAPTER_DIR / "adapter_config.json", peft_adapter_config(cfg.lora))
      safetensors_io.write_file(tmp / ADAPTER_DIR / "adapter_model.safetensors",
                                adapter_specs, {"format": "pt"})
    config = mash_config(recorded, dtype)
    if lora_form:
      config.update(lora_record(cfg, lora_form))
    if adapter_specs:
      config["files"]["language_model_adapter"] = ADAPTER_DIR
    _write_json(tmp / MASH_CONFIG, config)
    for f in copies:
      shutil.copyfile(f, tmp / LLM_DIR / f.name)
  return pathlib.Path(out).absolute()

