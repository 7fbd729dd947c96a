"""HuggingFace CLIP + LLaMA checkpoints -> mashvlm params tree.

Order of work, so that every problem is reported before anything is converted or written:
1. read both ``config.json`` files, refuse architectures and values the table does not
   cover, and compare the architecture with the model config (or adopt it);
2. open the weights (headers only) and check every tensor's presence, shape and dtype
   against the shapes the model config implies (``param_map.plan``);
3. convert tensor by tensor into preallocated leaves (cast to the config's param dtype):
   peak memory is one copy of the model plus one leaf and one tensor.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np

from mashvlm_jax.convert import param_map, safetensors_io
from mashvlm_jax.convert.param_map import ConversionError

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
CLIP_ARCHITECTURES = ("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection")
ROPE_SCALING_KEYS = {"default": (), "linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}
CLIP_ACTS = ("quick_gelu", "gelu")  # HF "gelu" is the exact (erf) GELU


def read_config(directory) -> tuple[dict, str]:
  """(config.json as a dict, its path for messages)."""
  path = pathlib.Path(directory) / "config.json"
  if not pathlib.Path(directory).is_dir():
    raise ConversionError(f"checkpoint directory {directory} does not exist")
  if not path.is_file():
    raise ConversionError(f"{path} is missing: a HuggingFace model directory needs config.json")
  try:
    return json.loads(path.read_text()), str(path)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from None


def _check_architecture(hf: dict, where: str, model_types: tuple, architectures: tuple):
  model_type = hf.get("model_type")
  if model_type not in model_types:
    raise ConversionError(f"{where}: model_type {model_type!r} is not covered by the conversion "
                          f"table; supported: {', '.join(map(repr, model_types))} "
                          f"({', '.join(architectures)})")
  unknown = [a for a in hf.get("architectures") or () if a not in architectures]
  if unknown:
    raise ConversionError(f"{where}: architecture {', '.join(unknown)} is not covered by the "
                          f"conversion table; supported: {', '.join(architectures)}")


def _unsupported(where: str, field: str, value, supported) -> ConversionError:
  return ConversionError(f"{where}: {field}={value!r} is not supported; supported: {supported}")


def llama_rope(hf: dict, where: str) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling as sorted (key, value) pairs or None) from a LLaMA config.

  Reads transformers >= 5 ``rope_parameters`` and the older ``rope_theta``/``rope_scaling``.
  """
  if hf.get("rope_parameters"):
    params = dict(hf["rope_parameters"])
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    field = "rope_parameters"
  else:
    params = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", 10000.0)
    field = "rope_scaling"
  kind = params.pop("rope_type", params.pop("type", "default"))
  if kind not in ROPE_SCALING_KEYS:
    raise _unsupported(where, f"{field}.rope_type", kind, ", ".join(ROPE_SCALING_KEYS))
  missing = [k for k in ROPE_SCALING_KEYS[kind] if k not in params]
  extra = sorted(set(params) - set(ROPE_SCALING_KEYS[kind]))
  if missing or extra:
    raise ConversionError(f"{where}: {field} of type {kind!r} needs exactly "
                          f"{list(ROPE_SCALING_KEYS[kind])}; missing {missing}, "
                          f"unsupported {extra}")
  if kind == "default":
    return float(theta), None
  scaling = {"rope_type": kind, **{k: float(v) for k, v in params.items()}}
  if "original_max_position_embeddings" in scaling:
    scaling["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
  return float(theta), tuple(sorted(scaling.items()))


def llama_fields(hf: dict, where: str) -> dict:
  """LlamaConfig keyword arguments from a LlamaForCausalLM config.json (HF defaults)."""
  _check_architecture(hf, where, ("llama",), LLAMA_ARCHITECTURES)
  if hf.get("hidden_act", "silu") != "silu":
    raise _unsupported(where, "hidden_act", hf["hidden_act"], "'silu'")
  if hf.get("quantization_config"):
    raise _unsupported(where, "quantization_config", hf["quantization_config"], "none")
  heads = int(hf.get("num_attention_heads", 32))
  hidden = int(hf.get("hidden_size", 4096))
  head_dim = int(hf.get("head_dim") or hidden // heads)
  theta, scaling = llama_rope(hf, where)
  return dict(
      vocab_size=int(hf.get("vocab_size", 32000)), hidden_size=hidden,
      intermediate_size=int(hf.get("intermediate_size", 11008)),
      num_layers=int(hf.get("num_hidden_layers", 32)), num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=0 if head_dim * heads == hidden else head_dim,
      rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)))


def clip_fields(hf: dict, where: str) -> dict:
  """VisionConfig keyword arguments (all but feature_layer) from a CLIP config.json."""
  _check_architecture(hf, where, ("clip_vision_model", "clip"), CLIP_ARCHITECTURES)
  if hf["model_type"] == "clip":
    hf, where = hf.get("vision_config") or {}, f"{where} (vision_config)"
  if hf.get("hidden_act", "quick_gelu") not in CLIP_ACTS:
    raise _unsupported(where, "hidden_act", hf["hidden_act"], ", ".join(CLIP_ACTS))
  if hf.get("num_channels", 3) != 3:
    raise _unsupported(where, "num_channels", hf["num_channels"], "3")
  return dict(
      image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 32)),
      hidden_size=int(hf.get("hidden_size", 768)),
      num_layers=int(hf.get("num_hidden_layers", 12)),
      num_heads=int(hf.get("num_attention_heads", 12)),
      intermediate_size=int(hf.get("intermediate_size", 3072)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
      hidden_act=hf.get("hidden_act", "quick_gelu"))


def adopt_hf_fields(cfg, llm: dict, vision: dict):
  """``cfg`` with its LLM and vision architecture taken from the HF configs."""
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **llm),
                             vision=dataclasses.replace(cfg.vision, **vision)).validate()


def config_differences(cfg, llm: dict, vision: dict) -> list[str]:
  """'model.<section>.<field>: config X, config.json Y' for every disagreeing field."""
  out = []
  for section, fields in (("llm", llm), ("vision", vision)):
    ours = getattr(cfg, section)
    for name, theirs in fields.items():
      mine = getattr(ours, name)
      if name == "head_dim":  # 0 means hidden_size // num_heads: compare effective values
        same = ours.dim_per_head == (theirs or fields["hidden_size"] // fields["num_heads"])
      else:
        same = mine == theirs
      if not same:
        out.append(f"model.{section}.{name}: config {mine!r}, config.json {theirs!r}")
  return out


def resolve_prefix(ckpt: safetensors_io.Checkpoint, tower: str,
                   tensors: list[param_map.Tensor]) -> str:
  """The name prefix under which most of the tower's tensors are stored."""
  spec = param_map.TOWERS[tower]
  prefixes = (spec.prefix,) + spec.alt_prefixes
  found = [sum(p + t.hf in ckpt for t in tensors) for p in prefixes]
  return prefixes[int(np.argmax(found))]


def check_tensors(ckpt, tower: str, tensors, prefix: str, ignore=()) -> None:
  """Raises one ConversionError listing every missing, mis-shaped, non-float or unknown tensor."""
  problems = []
  for t in tensors:
    name = prefix + t.hf
    info = ckpt.infos.get(name)
    if info is None:
      problems.append(f"missing tensor {name} (expected shape {list(t.hf_shape)})")
    elif info.shape != t.hf_shape:
      problems.append(f"tensor {name} in {info.file.name}: shape {list(info.shape)} disagrees "
                      f"with the config, which implies {list(t.hf_shape)}")
    elif info.dtype not in safetensors_io.FLOAT_DTYPES:
      problems.append(f"tensor {name} in {info.file.name}: dtype {info.dtype} is not a float")
  patterns = param_map.TOWERS[tower].buffers + tuple(ignore)
  skip = [re.compile(re.escape(prefix) + p) for p in patterns]
  known = {prefix + t.hf for t in tensors}
  extra = [n for n in ckpt.names() if n.startswith(prefix) and n not in known
           and not any(s.fullmatch(n) for s in skip)]
  if extra:
    problems.append(f"{len(extra)} tensor(s) not covered by the conversion table (an "
                    f"architecture it does not support?): {', '.join(sorted(extra)[:8])}"
                    + (" ..." if len(extra) > 8 else ""))
  if problems:
    raise ConversionError(f"{ckpt.where} ({tower}):\n  " + "\n  ".join(problems))


def convert_tensors(ckpt, tensors, prefix: str, shapes, as_jax: bool = False,
                    allow_nonfinite: bool = False) -> dict:
  """A tree shaped like ``shapes`` (leaves with .shape/.dtype), filled one tensor at a time.

  Each leaf is preallocated and filled layer by layer. With ``as_jax`` a finished leaf is
  moved into a jax array at once and its numpy buffer dropped, so the peak is one copy of
  the model plus one leaf (Orbax then saves jax arrays without another copy).
  """
  by_path: dict[tuple, list] = {}
  for t in tensors:
    by_path.setdefault(t.path, []).append(t)
  out = {}
  for path, group in by_path.items():
    shape = param_map.get_path(shapes, path)
    leaf = np.empty(shape.shape, np.dtype(shape.dtype))
    for t in group:
      value = t.to_jax(ckpt.read(prefix + t.hf))
      bad = 0 if allow_nonfinite else int(value.size - np.count_nonzero(np.isfinite(value)))
      if bad:  # a corrupt or diverged checkpoint: never import NaN or inf silently
        raise ConversionError(f"{ckpt.where}: tensor {prefix + t.hf} holds {bad} non-finite "
                              f"value(s) (NaN or inf) of {value.size}; --allow_nonfinite "
                              f"imports it anyway")
      if t.layer is None:
        leaf[...] = value
      else:
        leaf[t.layer] = value
      del value
    if as_jax:
      import jax
      leaf = jax.device_put(leaf)
    param_map.set_path(out, path, leaf)
    del leaf
  return out


def check_tower(tower: str, ckpt: safetensors_io.Checkpoint, shapes, ignore=()):
  """(tensors, name prefix) of ``tower`` after checking ``ckpt`` against ``shapes``."""
  tensors = param_map.plan(tower, shapes)
  prefix = resolve_prefix(ckpt, tower, tensors)
  check_tensors(ckpt, tower, tensors, prefix, ignore)
  return tensors, prefix


def load_tower(tower: str, ckpt: safetensors_io.Checkpoint, shapes, ignore=(),
               as_jax: bool = False) -> dict:
  """Checks, then converts one tower; ``shapes`` is its abstract params (boxed or plain)."""
  import flax.linen as nn
  shapes = nn.unbox(shapes)
  return convert_tensors(ckpt, *check_tower(tower, ckpt, shapes, ignore), shapes, as_jax)


def abstract_towers(cfg) -> dict:
  """Unboxed abstract params of the whole model (shapes and dtypes, no memory)."""
  import flax.linen as nn
  from mashvlm_jax.model import mashvlm
  return nn.unbox(mashvlm.abstract_params(cfg))


def fresh_projector(cfg, seed: int) -> dict:
  """A newly initialised projector (the model's own initializer), numpy leaves."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mashvlm_jax.model.projector import Projector
  model = Projector(cfg.llm.hidden_size, cfg.projector, dtype=cfg.compute_dtype,
                    param_dtype=cfg.weight_dtype)
  x = jnp.zeros((1, cfg.vision.hidden_size), cfg.compute_dtype)
  params = jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"]
  return jax.tree.map(np.asarray, nn.unbox(params))


def import_hf(llm_dir, vision_dir, cfg, *, projector_file=None, seed: int = 0,
              allow_pickle: bool = False, adopt_hf_config: bool = False, as_jax: bool = False,
              allow_nonfinite: bool = False):
  """(params, ModelConfig) from HF LLaMA and CLIP directories and an optional projector.

  ``cfg`` supplies everything HF configs do not (frames, RoPE mode, mask, projector kind,
  feature layer, dtypes). Its LLM and vision architecture must equal the HF configs,
  unless ``adopt_hf_config``, which takes them from the HF configs instead. Leaves are
  numpy arrays, or jax arrays with ``as_jax`` (what ``params_io.save_params`` saves
  without an extra copy).
  """
  if cfg.lora.enabled:  # HF checkpoints hold no mashvlm adapters
    raise ConversionError(
        f"model.lora.rank={cfg.lora.rank}: import-hf writes the base model; import with "
        f"--config.model.lora.rank=0 and train the LoRA config with init_from=<the import>, "
        f"which adds fresh adapters")
  llm_json, llm_where = read_config(llm_dir)
  vision_json, vision_where = read_config(vision_dir)
  llm = llama_fields(llm_json, llm_where)
  vision = clip_fields(vision_json, vision_where)
  if adopt_hf_config:
    cfg = adopt_hf_fields(cfg, llm, vision)
  else:
    diffs = config_differences(cfg, llm, vision)
    if diffs:
      raise ConversionError(
          "the model config disagrees with the HuggingFace config.json files:\n  "
          + "\n  ".join(diffs) + "\nfix the config (--config.model.<section>.<field>=VALUE) "
          "or pass --adopt_hf_config to take the architecture from config.json")
  shapes = abstract_towers(cfg)
  sources = {"language_model": safetensors_io.open_checkpoint(llm_dir, allow_pickle),
             "vision_tower": safetensors_io.open_checkpoint(vision_dir, allow_pickle)}
  if projector_file:
    sources["projector"] = safetensors_io.open_file(projector_file, allow_pickle)
  ignore = {"language_model": (r"lm_head\.weight",) if cfg.llm.tie_word_embeddings else ()}
  plans = {tower: check_tower(tower, ckpt, shapes[tower], ignore.get(tower, ()))
           for tower, ckpt in sources.items()}  # check everything before converting
  params = {tower: convert_tensors(sources[tower], *plans[tower], shapes[tower], as_jax,
                                   allow_nonfinite)
            for tower in sources}
  if "projector" not in params:
    params["projector"] = fresh_projector(cfg, seed)
  from mashvlm_jax.convert import params_io
  params_io.check_params(params, cfg, "imported params")
  return {k: params[k] for k in shapes}, cfg
