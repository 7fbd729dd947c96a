"""Analytic training FLOPs of MASH-VLM and peak FLOP/s per chip, for MFU.

Model FLOPs count matmuls only (2 per multiply-add), forward x1 for the frozen vision
tower and x3 (forward + backward) for trainable parts; attention scores count the full
S x S product (what the dense and splash kernels compute, before block skipping);
rematerialisation is not counted (MFU, not hardware utilisation). With LoRA
(model.lora.rank > 0) the decoder's base weights are frozen: its backward computes
activation gradients but no weight gradients for them (the train step stops their
gradients), and the adapters count x3.
"""
from __future__ import annotations

import functools
import time

import numpy as np

from mashvlm_jax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,
    "H200": 989e12,
}


def vision_flops_per_frame(cfg: ModelConfig) -> float:
  """Patch embedding and the ``layers_to_run`` encoder layers the features are read after
  (the tower does not run the later ones)."""
  v = cfg.vision
  tokens = v.grid ** 2 + 1
  per_layer = 2 * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
  per_layer += 2 * 2 * tokens * tokens * v.hidden_size  # scores and weighted sum
  patch = 2 * (tokens - 1) * v.patch_size ** 2 * 3 * v.hidden_size
  return patch + v.layers_to_run * per_layer


def llm_flops_per_row(cfg: ModelConfig, text_len: int) -> float:
  """Forward FLOPs of the decoder over one row of M + N + text_len tokens."""
  l = cfg.llm
  seq = cfg.prefix_len + text_len  # video (+ the action token)
  head_dim = l.dim_per_head
  attn_proj = 2 * l.hidden_size * head_dim * (2 * l.num_heads + 2 * l.num_kv_heads)
  mlp = 2 * 3 * l.hidden_size * l.intermediate_size
  per_layer = seq * (attn_proj + mlp) + 2 * 2 * seq * seq * l.num_heads * head_dim
  head = 2 * text_len * l.hidden_size * l.vocab_size  # logits only at text positions
  return l.num_layers * per_layer + head


def lora_flops_per_row(cfg: ModelConfig, text_len: int) -> float:
  """Forward FLOPs of the LoRA adapters over one row: x A then (x A) B per targeted
  projection and layer (0 with LoRA off)."""
  if not cfg.lora.enabled:
    return 0.0
  l = cfg.llm
  seq = sum(cfg.video_token_counts) + text_len
  q, kv = l.num_heads * l.dim_per_head, l.num_kv_heads * l.dim_per_head
  widths = {"q_proj": (l.hidden_size, q), "k_proj": (l.hidden_size, kv),
            "v_proj": (l.hidden_size, kv), "o_proj": (q, l.hidden_size),
            "gate_proj": (l.hidden_size, l.intermediate_size),
            "up_proj": (l.hidden_size, l.intermediate_size),
            "down_proj": (l.intermediate_size, l.hidden_size)}
  per_layer = sum(2 * seq * cfg.lora.rank * (widths[name][0] + widths[name][1])
                  for name in cfg.lora.targeted())
  return l.num_layers * per_layer


def frozen_llm_weight_flops_per_row(cfg: ModelConfig, text_len: int) -> float:
  """FLOPs of the decoder's weight gradients that LoRA skips: one forward's worth of its
  projections and LM head (the attention scores have no weights)."""
  l = cfg.llm
  seq = sum(cfg.video_token_counts) + text_len
  head_dim = l.dim_per_head
  attn_proj = 2 * l.hidden_size * head_dim * (2 * l.num_heads + 2 * l.num_kv_heads)
  mlp = 2 * 3 * l.hidden_size * l.intermediate_size
  return l.num_layers * seq * (attn_proj + mlp) + 2 * text_len * l.hidden_size * l.vocab_size


def projector_flops_per_row(cfg: ModelConfig) -> float:
  """The projector's last (affine) layer runs on the 2T + N pooled rows (MashVLM
  .video_tokens), the layer before it (mlp2x_gelu) on all T * (P + 1) frame tokens."""
  frame_tokens = cfg.num_frames * (cfg.vision.grid ** 2 + 1)
  pooled_rows = 2 * cfg.num_frames + cfg.video_token_counts[1]
  d = cfg.llm.hidden_size
  first = 2 * cfg.vision.hidden_size * d
  if cfg.projector == "linear":
    return pooled_rows * first
  return frame_tokens * first + pooled_rows * 2 * d * d


def train_flops_per_row(cfg: ModelConfig, text_len: int) -> float:
  """Model FLOPs of one training row (vision forward only when frozen; with LoRA, no
  weight gradients for the decoder's base weights)."""
  vision = cfg.num_frames * vision_flops_per_frame(cfg) * (1 if cfg.freeze_vision else 3)
  total = vision + 3 * (projector_flops_per_row(cfg) + llm_flops_per_row(cfg, text_len))
  if cfg.lora.enabled:
    total += 3 * lora_flops_per_row(cfg, text_len) - frozen_llm_weight_flops_per_row(
        cfg, text_len)
  return total


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(size: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a jitted float32 matmul on the default device: the CPU 'peak'."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * size ** 3 / best


def peak_flops_per_device(device_kind: str, platform: str) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for one device."""
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in device_kind.lower():
      return PEAK_FLOPS[name], f"table: {name}"
  if platform == "cpu":
    return measured_matmul_peak(), "measured 1024^2 f32 matmul"
  raise KeyError(f"no peak FLOP/s known for device kind {device_kind!r}; known: "
                 f"{sorted(PEAK_FLOPS)}")
