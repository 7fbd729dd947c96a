"""HuggingFace import and PyTorch export: wall time and peak memory, beside transformers.

    python benchmarks/convert.py [--hidden 1024 --layers 16 --vision b16] [--hf_dtype float32]
                                 [--workdir DIR] [--keep]

Builds random HF checkpoints (LlamaForCausalLM: hidden x layers, intermediate 2.75 x
hidden, vocab 32000; CLIP ViT-B/16 or L/14 at 224) saved as sharded safetensors, then runs
each phase in a fresh process:
- import:  hf_import.import_hf + params_io.save_params (what `mashvlm import-hf` does);
- export:  params_io.load_params + torch_export.export_torch, float32 and bfloat16;
- peer:    transformers LlamaForCausalLM/CLIPVisionModel.from_pretrained of the same
           checkpoints (float32), the PyTorch side's own load.
Memory: the process's resident set before the phase (python, jax, torch imported), and its
peak during the phase (VmHWM, reset through /proc/self/clear_refs at phase start); "peak -
base" is what the phase itself held, to be read against the float32 size of the model.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISION = {"b16": dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12,
                      num_heads=12, intermediate_size=3072),
          "l14": dict(image_size=224, patch_size=14, hidden_size=1024, num_layers=24,
                      num_heads=16, intermediate_size=4096)}


def model_dict(args) -> dict:
  """ModelConfig.from_dict input for the benchmarked model."""
  hidden = args.hidden
  return dict(
      num_frames=16,
      vision=VISION[args.vision],
      llm=dict(vocab_size=32000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
               num_layers=args.layers, num_heads=hidden // 64, num_kv_heads=hidden // 64,
               rms_norm_eps=1e-5))


# ------------------------------------------------------------------------- measurement


def _status(field: str) -> int:
  """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> None:
  pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


class Phase:
  """Times a block and records base RSS and peak RSS (bytes) of this process."""

  def __enter__(self):
    _reset_peak()
    self.base = _status("VmRSS")
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start
    self.peak = _status("VmHWM")

  def row(self, **extra) -> dict:
    return dict(seconds=self.seconds, base=self.base, peak=self.peak, **extra)


# ------------------------------------------------------------------------------ phases


def _warm_up_jax() -> None:
  """Import and start jax, flax and orbax before measuring, so base RSS includes them."""
  import flax.linen  # noqa: F401
  import jax
  import orbax.checkpoint  # noqa: F401
  jax.numpy.zeros(1).block_until_ready()


def phase_make(args) -> dict:
  import torch
  import transformers
  from mashvlm_jax.model.config import ModelConfig
  cfg = ModelConfig.from_dict(model_dict(args))
  work = pathlib.Path(args.workdir)
  dtype = getattr(torch, args.hf_dtype)
  torch.manual_seed(0)
  llm = cfg.llm
  hf_llm = transformers.LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      rms_norm_eps=llm.rms_norm_eps)
  transformers.LlamaForCausalLM(hf_llm).to(dtype).save_pretrained(work / "hf_llm",
                                                                  max_shard_size="500MB")
  v = cfg.vision
  hf_vision = transformers.CLIPVisionConfig(
      image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
      num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
      intermediate_size=v.intermediate_size)
  transformers.CLIPVisionModel(hf_vision).to(dtype).save_pretrained(work / "hf_clip",
                                                                    max_shard_size="500MB")
  return {}


def phase_import(args) -> dict:
  from mashvlm_jax.convert import hf_import, params_io
  from mashvlm_jax.model import mashvlm
  from mashvlm_jax.model.config import ModelConfig
  _warm_up_jax()
  work = pathlib.Path(args.workdir)
  cfg = ModelConfig.from_dict(model_dict(args))
  with Phase() as convert:
    params, cfg = hf_import.import_hf(work / "hf_llm", work / "hf_clip", cfg, as_jax=True)
  with Phase() as save:
    params_io.save_params(work / "ckpt", params, cfg, overwrite=True)
  both = dict(seconds=convert.seconds + save.seconds, base=convert.base,
              peak=max(convert.peak, save.peak))
  return dict(params=mashvlm.count_params(params), convert=convert.row(), save=save.row(),
              total=both)


def phase_export(args) -> dict:
  from mashvlm_jax.convert import params_io, torch_export
  _warm_up_jax()
  work = pathlib.Path(args.workdir)
  out = {}
  for dtype in ("float32", "bfloat16"):
    with Phase() as load:
      params, cfg = params_io.load_params(work / "ckpt")
    with Phase() as write:
      torch_export.export_torch(params, cfg, work / f"export_{dtype}", dtype=dtype,
                                max_shard_bytes=500 * 10 ** 6, overwrite=True)
    out[dtype] = dict(load=load.row(), write=write.row(),
                      total=dict(seconds=load.seconds + write.seconds, base=load.base,
                                 peak=max(load.peak, write.peak)))
    del params
  return out


def phase_peer(args) -> dict:
  import torch
  import transformers
  work = pathlib.Path(args.workdir)
  with Phase() as load:
    llm = transformers.LlamaForCausalLM.from_pretrained(work / "hf_llm", dtype=torch.float32)
    clip = transformers.CLIPVisionModel.from_pretrained(work / "hf_clip", dtype=torch.float32)
  n = sum(p.numel() for p in llm.parameters()) + sum(p.numel() for p in clip.parameters())
  return dict(load=load.row(), params=n)


PHASES = {"make": phase_make, "import": phase_import, "export": phase_export,
          "peer": phase_peer}


# ------------------------------------------------------------------------------ driver


def run_phase(name: str, args) -> dict:
  cmd = [sys.executable, __file__, f"--phase={name}", f"--workdir={args.workdir}",
         f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vision={args.vision}",
         f"--hf_dtype={args.hf_dtype}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _gb(x: float) -> str:
  return f"{x / 1e9:6.2f} GB"


def _line(label: str, row: dict, model_bytes: int) -> str:
  held = row["peak"] - row["base"]
  return (f"  {label:<34} {row['seconds']:7.1f} s   base {_gb(row['base'])}   "
          f"peak {_gb(row['peak'])}   peak-base {_gb(held)} = {held / model_bytes:4.2f} x model")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--vision", choices=sorted(VISION), default="b16")
  parser.add_argument("--hf_dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the generated HF checkpoints")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--keep", action="store_true", help="keep the work directory")
  parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:  # child process: one phase, one JSON line out
    print(json.dumps(PHASES[args.phase](args)))
    return
  made = args.workdir is None
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="mashvlm_convert_bench_")
  try:
    t0 = time.perf_counter()
    run_phase("make", args)
    made_s = time.perf_counter() - t0
    imported = run_phase("import", args)
    exported = run_phase("export", args)
    peer = run_phase("peer", args)
  finally:
    if made and not args.keep:
      shutil.rmtree(args.workdir, ignore_errors=True)
  n = imported["params"]
  model_bytes = 4 * n
  print(f"model: LLaMA hidden {args.hidden} x {args.layers} layers + CLIP {args.vision}: "
        f"{n / 1e6:.1f}M params = {_gb(model_bytes).strip()} in float32; HF checkpoints "
        f"{args.hf_dtype}, 500MB shards (made in {made_s:.0f} s)")
  print(_line("import-hf (read+check+convert)", imported["convert"], model_bytes))
  print(_line("import-hf (Orbax save)", imported["save"], model_bytes))
  print(_line("import-hf total", imported["total"], model_bytes))
  for dtype, rows in exported.items():
    print(_line(f"export-torch {dtype} (Orbax load)", rows["load"], model_bytes))
    print(_line(f"export-torch {dtype} (write)", rows["write"], model_bytes))
    print(_line(f"export-torch {dtype} total", rows["total"], model_bytes))
  print(_line("peer: transformers from_pretrained", peer["load"], model_bytes))


if __name__ == "__main__":
  main()
