"""Attention speed: the DST mask's cost over plain causal attention, and the fast backends
beside the dense reference, forward and forward+backward, on this machine.

    python benchmarks/attention.py [--shapes tiny,7b] [--heads 32] [--iters 5]

Rows: best-of-N wall time per call of a jitted function (ms), the functions of a group run
interleaved; the ratios below each group compare:
- dense DST vs dense causal: the same dense XLA attention, mask built by layout.dst_mask
  from the token types inside the jitted function in both cases, so the ratio is the DST
  mask's overhead;
- gpu backend (jax.nn.dot_product_attention; "xla" implementation off GPU) vs dense DST;
- on a GPU, the gpu backend with cuDNN flash attention (bf16) vs dense DST (bf16);
- on a TPU, the splash backend vs dense DST (splash only runs in Pallas interpret mode on
  CPU, whose time says nothing, so it is skipped there).
Shapes: tiny = the tiny config (M=23, N=64, L=32, 4 heads of 32, batch 2); 7b = MASH-VLM
7B (M=47, N=256, L=512, S=815, heads of 128, batch 1; --heads sets the head count).
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mashvlm_jax import layout  # noqa: E402
from mashvlm_jax.model import attention  # noqa: E402

SHAPES = {  # name: (M, N, L, batch, heads, head_dim)
    "tiny": (23, 64, 32, 2, 4, 32),
    "7b": (47, 256, 512, 1, 32, 128),
}


def make_inputs(m, n, text_len, batch, heads, head_dim, dtype):
  rng = np.random.default_rng(0)
  shape = (batch, m + n + text_len, heads, head_dim)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  types = jnp.asarray(np.broadcast_to(layout.token_types(m, n, text_len),
                                      (batch, m + n + text_len)))
  return q, k, v, types


def attention_fns(backend, spec, types):
  """(forward, forward+backward) jitted functions of (q, k, v)."""
  def fwd(q, k, v):
    return attention.attend(q, k, v, attention.MaskLayout(types, spec), backend=backend)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def best_ms(fns, args, iters: int) -> list[float]:
  """Best-of-``iters`` milliseconds per call of each fn, after one warm-up (compile) call;
  the fns run interleaved, round by round, so load from other processes hits them alike."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  best = [float("inf")] * len(fns)
  for _ in range(iters):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[i] = min(best[i], 1e3 * (time.perf_counter() - start))
  return best


def compare(label, rows, args, iters) -> dict[str, tuple[float, float]]:
  """Times each (name, backend, spec) row; prints and returns {name: (fwd ms, fwd+bwd ms)}."""
  fns = [attention_fns(backend, spec, args[3]) for _, backend, spec in rows]
  t_fwd = best_ms([f for f, _ in fns], args[:3], iters)
  t_grad = best_ms([g for _, g in fns], args[:3], iters)
  for (name, _, _), tf, tg in zip(rows, t_fwd, t_grad):
    print(f"  {label:<5} {name:<30} fwd {tf:9.2f} ms   fwd+bwd {tg:9.2f} ms", flush=True)
  return {name: (tf, tg) for (name, _, _), tf, tg in zip(rows, t_fwd, t_grad)}


def ratio(times, num: str, den: str, what: str):
  (nf, ng), (df, dg) = times[num], times[den]
  print(f"  {what:<38} fwd {nf / df:5.2f}x   fwd+bwd {ng / dg:5.2f}x")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="tiny,7b")
  parser.add_argument("--heads", type=int, default=32, help="heads of the 7b shape")
  parser.add_argument("--iters", type=int, default=5, help="timed rounds (x10 for tiny)")
  args = parser.parse_args(argv)
  platform = jax.default_backend()
  print(f"jax {jax.__version__} on {platform}: {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} host cores")
  for shape in args.shapes.split(","):
    m, n, text_len, batch, heads, head_dim = SHAPES[shape]
    heads = args.heads if shape == "7b" else heads
    iters = args.iters * (10 if shape == "tiny" else 1)
    print(f"{shape}: M={m} N={n} L={text_len} S={m + n + text_len} batch={batch} "
          f"heads={heads}x{head_dim}")
    dst = attention.AttentionSpec(m, n)
    causal = attention.AttentionSpec(m, n, **layout.plain_causal_switches())
    f32 = make_inputs(m, n, text_len, batch, heads, head_dim, jnp.float32)
    times = compare("f32", [("dense causal", "dense", causal), ("dense DST", "dense", dst),
                            ("gpu backend (xla impl) DST", "gpu", dst)], f32, iters)
    ratio(times, "dense DST", "dense causal", "DST overhead (dense DST / causal)")
    ratio(times, "gpu backend (xla impl) DST", "dense DST", "gpu backend (xla) / dense DST")
    if platform == "gpu":
      bf16 = make_inputs(m, n, text_len, batch, heads, head_dim, jnp.bfloat16)
      times = compare("bf16", [("dense DST", "dense", dst), ("dense causal", "dense", causal),
                               ("gpu backend (cudnn) DST", "gpu", dst),
                               ("gpu backend (cudnn) causal", "gpu", causal)], bf16, iters)
      ratio(times, "gpu backend (cudnn) DST", "dense DST", "gpu backend (cudnn) / dense DST")
      ratio(times, "gpu backend (cudnn) DST", "gpu backend (cudnn) causal",
            "cudnn DST / cudnn causal")
    if platform == "tpu":
      bf16 = make_inputs(m, n, text_len, batch, heads, head_dim, jnp.bfloat16)
      times = compare("bf16", [("dense DST", "dense", dst), ("splash DST", "splash", dst),
                               ("splash causal", "splash", causal)], bf16, iters)
      ratio(times, "splash DST", "dense DST", "splash / dense DST")
      ratio(times, "splash DST", "splash causal", "splash DST / splash causal")

if __name__ == "__main__":
  main()
