"""Train-step speed: our jitted MASH-VLM train step beside HuggingFace transformers'
PyTorch LlamaForCausalLM (eager, same decoder shapes, same inputs_embeds length S = M+N+L,
AdamW) in one run on this machine's CPU.

    python benchmarks/train_step.py [--sizes tiny,100m] [--steps 5]

Our step also runs the frozen CLIP tower forward (its layers up to vision.feature_layer)
and the projector, which the PyTorch peer does not: the comparison is conservative for us.
MFU is model FLOPs / step time over the measured f32 matmul peak (train/flops.py). Both
run in one process: the PyTorch peers first, as PyTorch runs by default, then ours after
train/cpu_tuning.py's host allocator settings (glibc keeps freed memory instead of
page-faulting each step's temporaries in again), as `mashvlm train` on CPU should run.
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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mashvlm_jax.model import mashvlm  # noqa: E402
from mashvlm_jax.model.config import ModelConfig  # noqa: E402
from mashvlm_jax.train import cpu_tuning  # noqa: E402
from mashvlm_jax.train import flops as flops_lib  # noqa: E402
from mashvlm_jax.train import optim, trainer  # noqa: E402

OPTIM = dict(lr=1e-4, warmup_steps=10, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
             weight_decay=0.01, clip_norm=1.0, freeze=["^vision_tower/"], lr_multipliers={},
             no_decay=r"(norm|bias)")


def model_config(size: str) -> tuple[ModelConfig, int, int]:
  """(config, batch, text_len)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base = module.get_config().model.to_dict()
  if size == "tiny":
    return ModelConfig.from_dict(base), 8, 32
  if size == "100m":
    base.update(num_frames=8)
    base["vision"].update(image_size=128, patch_size=16, hidden_size=384, num_layers=6,
                          num_heads=6, intermediate_size=1536)
    base["llm"].update(vocab_size=8192, hidden_size=768, intermediate_size=2048,
                       num_layers=12, num_heads=12, num_kv_heads=12)
    return ModelConfig.from_dict(base), 4, 64
  raise ValueError(f"unknown size {size!r}")


def time_steps(fn, steps: int) -> float:
  """Median seconds per call after two warm-up calls."""
  fn()
  fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def ours(cfg: ModelConfig, batch: int, text_len: int, steps: int) -> float:
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  tx, schedule = optim.make_optimizer(params, OPTIM, total_steps=1000)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                             nonfinite=jnp.zeros((), jnp.int32))
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  data = dict(
      frames=jnp.asarray(rng.integers(0, 256, (batch, cfg.num_frames, size, size, 3)), jnp.uint8),
      text_ids=jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (batch, text_len)), jnp.int32),
      text_mask=jnp.ones((batch, text_len), bool),
      labels=jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (batch, text_len)), jnp.int32),
      label_mask=jnp.ones((batch, text_len), jnp.float32))
  trainable = optim.trainable_mask(params, OPTIM)
  step = jax.jit(trainer.make_train_step(mashvlm.MashVLM(cfg), tx, schedule, accum=1,
                                         trainable=trainable), donate_argnums=(0,))
  box = {"state": state}

  def run():
    box["state"], metrics = step(box["state"], data)
    jax.block_until_ready(metrics["loss"])
  return time_steps(run, steps)


def torch_peer(cfg: ModelConfig, batch: int, text_len: int, steps: int) -> float:
  import torch
  import transformers
  l = cfg.llm
  hf = transformers.LlamaConfig(vocab_size=l.vocab_size, hidden_size=l.hidden_size,
                                intermediate_size=l.intermediate_size,
                                num_hidden_layers=l.num_layers, num_attention_heads=l.num_heads,
                                num_key_value_heads=l.num_kv_heads, rope_theta=l.rope_theta,
                                rms_norm_eps=l.rms_norm_eps, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
  m, n = cfg.video_token_counts
  seq = m + n + text_len
  embeds = torch.randn(batch, seq, l.hidden_size)
  labels = torch.randint(0, l.vocab_size, (batch, seq))
  labels[:, :m + n] = -100  # loss on text positions only, like ours

  def run():
    opt.zero_grad(set_to_none=True)
    out = model(inputs_embeds=embeds, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return time_steps(run, steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,100m")
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()
  sizes = [(size,) + model_config(size) for size in args.sizes.split(",")]
  # The PyTorch peers first, with the process as PyTorch users have it: before the host
  # allocator settings (which make PyTorch's step ~10% slower next to JAX) and before JAX
  # starts its CPU client (JAX is imported, not run).
  t_torch = {size: torch_peer(cfg, batch, text_len, args.steps)
             for size, cfg, batch, text_len in sizes}
  tuned = cpu_tuning.keep_freed_host_memory()  # before JAX starts its CPU client
  peak = flops_lib.measured_matmul_peak()
  import torch
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}; "
        f"measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s; host allocator tuned for ours: "
        f"{tuned}")
  print(f"{'size':<6} {'params':>12} {'batch x S':>10} {'ours s/step':>12} {'torch s/step':>13} "
        f"{'ratio torch/ours':>17} {'ours tok/s':>11} {'torch tok/s':>12} {'MFU ours':>9} "
        f"{'MFU torch':>10}")
  for size, cfg, batch, text_len in sizes:
    m, n = cfg.video_token_counts
    seq = m + n + text_len
    count = mashvlm.count_params(mashvlm.abstract_params(cfg))
    t_ours = ours(cfg, batch, text_len, args.steps)
    mfu_ours = batch * flops_lib.train_flops_per_row(cfg, text_len) / t_ours / peak
    mfu_torch = batch * 3 * flops_lib.llm_flops_per_row(cfg, text_len) / t_torch[size] / peak
    print(f"{size:<6} {count:>12,} {f'{batch}x{seq}':>10} {t_ours:>12.4f} {t_torch[size]:>13.4f} "
          f"{t_torch[size] / t_ours:>17.2f} {batch * seq / t_ours:>11.0f} "
          f"{batch * seq / t_torch[size]:>12.0f} {mfu_ours:>9.3f} {mfu_torch:>10.3f}")


if __name__ == "__main__":
  main()
