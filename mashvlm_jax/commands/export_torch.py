"""Export a params checkpoint to PyTorch: HF LLaMA + CLIP directories, projector, mash_config.

``mashvlm export-torch --checkpoint=DIR --out=DIR [--dtype=bfloat16] [--shard_size=5GB]
[--tokenizer=HF_LLAMA_DIR] [--lora=merge|adapter]``
writes language_model/ (transformers.LlamaForCausalLM.from_pretrained), vision_tower/
(transformers.CLIPVisionModel.from_pretrained), projector.safetensors and mash_config.json
(token split, RoPE mode, mask switches). mashvlm_jax.torch_reference runs the whole MASH-VLM
forward from that directory. A LoRA checkpoint (model.lora.rank > 0) is written with the
adapters merged into language_model/ (``--lora=merge``, default) or as the base weights
plus a PEFT adapter directory language_model_adapter/ (``--lora=adapter``), which
``peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter)`` loads.
"""
from __future__ import annotations

import time

from absl import flags

from mashvlm_jax import paths

_CHECKPOINT = paths.DEFINE_path("checkpoint", None,
                                "Params checkpoint (import-hf output or the trainer's).")
_OUT = paths.DEFINE_path("out", None, "Output directory.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Exported weight dtype.")
_SHARD = flags.DEFINE_string("shard_size", "5GB",
                             "Largest safetensors shard (e.g. 5GB, 500MB, 2GiB); above it a "
                             "tower is sharded with model.safetensors.index.json.")
_TOKENIZER = paths.DEFINE_path("tokenizer", None,
                               "Tokenizer to ship in language_model/: the HF LLaMA/Vicuna "
                               "directory or a tokenizer.model / tokenizer.json file.")
_LORA = flags.DEFINE_enum("lora", "merge", ["merge", "adapter"],
                          "LoRA checkpoints: fold the adapters into the LLaMA weights "
                          "(merge) or write them as a PEFT adapter directory (adapter).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv):
  del argv
  from mashvlm_jax.convert import params_io, safetensors_io, torch_export
  from mashvlm_jax.convert.param_map import ConversionError
  for name, flag in (("--checkpoint", _CHECKPOINT), ("--out", _OUT)):
    if not flag.value:
      raise SystemExit(f"mashvlm export-torch: {name} is required")
  try:
    shard_bytes = safetensors_io.parse_size(_SHARD.value)
    params_io.check_destination(_OUT.value, _OVERWRITE.value)
    t0 = time.perf_counter()
    params, cfg = params_io.load_params(_CHECKPOINT.value)
    t1 = time.perf_counter()
    out = torch_export.export_torch(params, cfg, _OUT.value, dtype=_DTYPE.value,
                                    max_shard_bytes=shard_bytes, overwrite=_OVERWRITE.value,
                                    tokenizer=_TOKENIZER.value, lora=_LORA.value)
  except (ConversionError, FileExistsError, ValueError) as e:
    raise SystemExit(f"mashvlm export-torch: {e}") from None
  t2 = time.perf_counter()
  print(f"wrote {out} ({_DTYPE.value}; load {t1 - t0:.1f}s, write {t2 - t1:.1f}s)")
