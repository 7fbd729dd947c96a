"""Generation speed: our batched KV-cache decoding beside HuggingFace transformers'
``generate`` for the same decoder shapes, on this machine's CPU, in one run.

    python benchmarks/generate.py [--shapes tiny,small] [--batch 4] [--new 64] [--repeats 3]

Both sides decode greedily with a KV cache, exactly ``--new`` tokens per row (no EOS),
from a prefill of S = M + N + L positions: ours is the full MashVLM (vision tower and
projector for the video block, DST mask, Harmonic-RoPE) with a text prompt of L tokens,
once with the host decode loop and once with the on-device ``lax.while_loop`` (the
Generator's ``loop="host"`` / ``"device"``, same parameters, same tokens);
HF's is LlamaForCausalLM on S prompt token ids (torch eager, fp32, its own DynamicCache).
Tokens/s = batch x new tokens / wall time of the whole call (prefill included), best of
``--repeats`` after one warm-up call (ours: after compilation); decode tokens/s =
batch x (new - 1) / (time of the call minus time of a call generating one token), i.e.
the cached steps without the prefill. Shapes: tiny = the
decoder of configs/tiny_synthetic.py; small = a 1024-wide, 8-layer LLaMA with a 32k
vocabulary (matmuls dominate instead of per-step dispatch).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SHAPES = {  # decoder: vocab, hidden, intermediate, layers, heads, kv heads
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4,
                 num_heads=4, num_kv_heads=2),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8,
                  num_heads=16, num_kv_heads=8),
}


def load_tiny_config():
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def best_time(fn, repeats: int) -> float:
  fn()  # warm-up (compilation for jax)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def ours(shape: dict, batch: int, text_len: int, new: int, repeats: int):
  """({loop: (seconds per call with ``new`` tokens, with 1 token)} for both decode loops,
  prefill length S) for MashVLM + eval/generate.py."""
  import flax.linen as nn
  import jax
  from mashvlm_jax.eval import generate
  from mashvlm_jax.model import mashvlm
  from mashvlm_jax.model.config import ModelConfig
  config = load_tiny_config()
  config.model.llm.update(shape)
  cfg = ModelConfig.from_dict(config.model)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  frames = rng.integers(0, 256, (batch, cfg.num_frames, size, size, 3)).astype(np.uint8)
  prompts = [list(rng.integers(4, shape["vocab_size"], text_len)) for _ in range(batch)]
  gen = generate.Generator(cfg, params)

  def call(count, loop):
    out = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=count),
                       loop=loop)
    assert all(len(t) == count for t in out.tokens)
    return out.tokens
  host, device = call(new, "host"), call(new, "device")
  assert host == device, "the two decode loops disagree"
  times = {loop: (best_time(lambda loop=loop: call(new, loop), repeats),
                  best_time(lambda loop=loop: call(1, loop), repeats))
           for loop in generate.LOOPS}
  return times, sum(cfg.video_token_counts) + text_len


def huggingface(shape: dict, batch: int, prefill: int, new: int, repeats: int):
  """(seconds per call with ``new`` tokens, with 1 token)."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
      max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
      eos_token_id=2)
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  ids = torch.randint(4, shape["vocab_size"], (batch, prefill))
  mask = torch.ones_like(ids)

  def call(count):
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=count,
                           min_new_tokens=count, do_sample=False, use_cache=True,
                           pad_token_id=0)
    assert out.shape == (batch, prefill + count)
  return best_time(lambda: call(new), repeats), best_time(lambda: call(1), repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,small")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--text_len", type=int, default=32)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  import jax
  import torch
  import transformers
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs")
  print(f"batch {args.batch}, {args.new} new tokens per row, greedy, KV cache on both sides")
  print("tok/s of ours with the host loop, ours with the device loop, HF; x = ours / HF")
  print(f"{'shape':<6} {'S':>4} | {'end-to-end: host':>16} {'device':>7} {'HF':>7} "
        f"{'host x':>7} {'dev x':>6} | {'decode: host':>12} {'device':>7} {'HF':>7} "
        f"{'host x':>7} {'dev x':>6}")
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    times, prefill = ours(shape, args.batch, args.text_len, args.new, args.repeats)
    times["hf"] = huggingface(shape, args.batch, prefill, args.new, args.repeats)
    total, steps = args.batch * args.new, args.batch * (args.new - 1)
    e2e = {k: total / n for k, (n, _) in times.items()}
    dec = {k: steps / max(n - one, 1e-9) for k, (n, one) in times.items()}
    row = lambda rate, width: (f"{rate['host']:>{width}.1f} {rate['device']:>7.1f} "
                               f"{rate['hf']:>7.1f} {rate['host'] / rate['hf']:>7.2f} "
                               f"{rate['device'] / rate['hf']:>6.2f}")
    print(f"{name:<6} {prefill:>4} | {row(e2e, 16)} | {row(dec, 12)}", flush=True)


if __name__ == "__main__":
  main()
