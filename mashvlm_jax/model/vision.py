"""CLIP ViT vision encoder with HuggingFace ``CLIPVisionModel`` semantics.

Patch conv (no bias) + class token + learned positions -> pre-layernorm -> pre-LN
transformer layers (quick_gelu MLP) -> post-layernorm on the class token (pooled output).
The features MASH-VLM uses come from ``feature_layer``, an index into HF's
``hidden_states`` tuple (-2 = penultimate layer), not from the pooled output.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax.model import attention as attention_lib
from mashvlm_jax.model.config import VisionConfig
from mashvlm_jax.model.llm import layer_stack, partitioned, rows

Dtype = jnp.dtype

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INIT = nn.initializers.normal(stddev=0.02)


def sincos2d(grid: int, dim: int) -> np.ndarray:
  """float32 [grid * grid, dim] 2D sin-cos position codes, row-major patches.

  Channels [x sin | x cos | y sin | y cos], each dim/4 wide with frequencies
  10000^(-k / (dim/4)), k = 0..dim/4-1; x, y are patch column and row indices.
  """
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.divmod(np.arange(grid * grid), grid)
  parts = []
  for coord in (cols, rows):
    angle = coord[:, None] * omega[None, :]
    parts += [np.sin(angle), np.cos(angle)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def sincos2d_init(grid: int):
  """Initializer of the [1 + grid^2, dim] position table: zeros for the class token, then
  ``sincos2d`` codes for the patches."""
  def init(key, shape, dtype=jnp.float32):
    del key
    if shape[0] != grid * grid + 1:
      raise ValueError(f"position table of shape {shape} does not fit a {grid}x{grid} grid")
    table = np.concatenate([np.zeros((1, shape[1]), np.float32), sincos2d(grid, shape[1])])
    return jnp.asarray(table, dtype)
  return init


def normalize_frames(frames_uint8: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """uint8 [..., H, W, 3] in 0..255 -> CLIP-normalised float [..., H, W, 3]."""
  x = frames_uint8.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)).astype(dtype)


def _activation(name):
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  return functools.partial(jax.nn.gelu, approximate=False)


class VisionLayer(nn.Module):
  """One pre-LN CLIP encoder layer; also tracks the hidden state at the selected layer.

  Scan carry: (hidden [N, P+1, W], selected [N, P+1, W], layer index int32).
  """
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry):
    x, selected, index = carry
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))  # frames split
    cfg = self.cfg
    norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             scale_init=partitioned(nn.initializers.ones, ("norm",)),
                             bias_init=partitioned(nn.initializers.zeros, ("norm",)))
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype, param_dtype=self.param_dtype,
                              bias_init=nn.initializers.zeros)
    heads = (cfg.num_heads, cfg.head_dim)
    h = norm(name="layer_norm1")(x)
    qkv_init = partitioned(_INIT, ("embed", "heads", "kv"))
    q = rows(dense(heads, name="q_proj", kernel_init=qkv_init), h)
    k = rows(dense(heads, name="k_proj", kernel_init=qkv_init), h)
    v = rows(dense(heads, name="v_proj", kernel_init=qkv_init), h)
    attn = attention_lib.dense_attention(q, k, v, mask=None)
    x = x + rows(dense(cfg.hidden_size, axis=(-2, -1), name="out_proj",
                       kernel_init=partitioned(_INIT, ("heads", "kv", "embed"))), attn, 2)
    h = norm(name="layer_norm2")(x)
    h = rows(dense(cfg.intermediate_size, name="fc1",
                   kernel_init=partitioned(_INIT, ("embed", "mlp"))), h)
    h = rows(dense(cfg.hidden_size, name="fc2",
                   kernel_init=partitioned(_INIT, ("mlp", "embed"))),
             _activation(cfg.hidden_act)(h))
    x = x + h
    index = index + 1
    selected = jnp.where(index == cfg.layers_to_run, x, selected)
    return (x, selected, index), None


class ClipVisionEncoder(nn.Module):
  """pixels float [N, H, W, 3] (CLIP-normalised) -> dict of features.

  Returns {"cls": [N, W], "patches": [N, P, W]} taken at ``cfg.feature_layer`` (P =
  grid^2 patches in row-major order); with ``pooled=True`` also "pooled": post-layernorm
  of the last layer's class token [N, W] (HF ``pooler_output``).

  Every layer's parameters exist (``init`` builds the whole stack, the HF checkpoint
  layout), but applying runs only the ``cfg.layers_to_run`` layers the selected hidden state
  depends on, over the first rows of the stacked parameters; the later layers run only for
  ``pooled``.
  """
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = True  # False: the layer stack unrolled (llm.layer_stack)
  pooled: bool = False  # also run the layers past feature_layer, for "pooled"

  @nn.compact
  def __call__(self, pixels):
    cfg = self.cfg
    if pixels.shape[-3:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"vision encoder expects frames of {cfg.image_size}x{cfg.image_size}"
                       f"x3, found {pixels.shape[-3:]}")
    norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                             param_dtype=self.param_dtype,
                             scale_init=partitioned(nn.initializers.ones, ("norm",)),
                             bias_init=partitioned(nn.initializers.zeros, ("norm",)))
    patches = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                      strides=(cfg.patch_size, cfg.patch_size), padding="VALID",
                      use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=partitioned(_INIT, (None, None, None, "embed")),
                      name="patch_embedding")(pixels.astype(self.dtype))
    patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
    cls = self.param("class_embedding", partitioned(_INIT, ("embed",)), (cfg.hidden_size,),
                     self.param_dtype)
    pos_init = _INIT if cfg.position_init == "normal" else sincos2d_init(cfg.grid)
    positions = self.param("position_embedding", partitioned(pos_init, (None, "embed")),
                           (cfg.grid ** 2 + 1, cfg.hidden_size), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + positions.astype(self.dtype)
    x = norm(name="pre_layrnorm")(x)
    run_all = self.pooled or self.is_initializing()
    count = cfg.num_layers if run_all else cfg.layers_to_run
    carry = (x, x, jnp.zeros((), jnp.int32))
    if count:
      stack = layer_stack(VisionLayer, count, self.remat_policy, 0, self.scan_layers)
      if count < cfg.num_layers:  # the first `count` layers of the stacked parameters
        first = lambda tree: jax.tree_util.tree_map(lambda x: x[:count], tree)
        stack = nn.map_variables(stack, "params", trans_in_fn=first, mutable=False)
      carry, _ = stack(cfg=cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="layers")(carry)
    last, selected, _ = carry
    out = {"cls": selected[:, 0], "patches": selected[:, 1:]}
    if run_all:  # post_layernorm's parameters are created at init
      out["pooled"] = norm(name="post_layernorm")(last[:, 0])
    return out
