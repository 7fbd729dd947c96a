"""LLaMA-family decoder (HuggingFace LlamaForCausalLM semantics) with two-stream RoPE.

RMSNorm, SwiGLU MLP, grouped-query attention, configurable rope_theta / rope_scaling,
optional tied embeddings. The rotary embedding takes position ids int[B, 2, S]
(``layout.position_ids``) and the attention takes the mask in the form its backend needs
(``attention.attention_mask``: the bool ``layout.dst_mask`` for "dense", a ``MaskLayout``
for "splash"/"gpu"); with distinct ids and a plain causal mask this is exactly LLaMA.
Layers run under ``nn.scan`` (parameters stacked on a leading ``layers`` axis), looped or
unrolled (``scan_layers``), with a configurable remat policy.

Decoding (eval/generate.py): called with ``cache_index`` int[B], each attention layer
keeps a flax ``cache`` collection of rotated keys and values [B, cache_len, Hkv, d]
(stacked on the ``layers`` axis), writes the new chunk of each row at that row's offset
and attends over the whole cache with a bool mask [B, chunk, cache_len] built by
layout.py. Without ``cache_index`` (training) nothing of this runs. ``capture_attention``
sows each layer's head-averaged attention probabilities into ``intermediates``,
``capture_heads`` the per-head ones (analysis only; the training path computes neither).

RVE (analysis/rve.py): with an ``rve`` config (a static field) and ``rve_rows`` bool[B, S]
(the query rows to enhance), the dense attention of the layers it names boosts those rows'
logits at the visual keys. Inside the layer scan the layer index is a scanned input; the
stack without ``rve`` is built and called exactly as before, so the programs compiled with
RVE off are unchanged.

LoRA (``lora``, a static LoraConfig; docs/design.md "LoRA"): each projection the config
targets gains a sibling ``<name>_lora`` module with ``lora_a`` [*in, rank] and ``lora_b``
[rank, *out], stacked on the ``layers`` axis like the rest of the layer; its output
(alpha / rank) x A B is added to the projection's. With rank 0 nothing of this is built.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mashvlm_jax.analysis import rve as rve_lib
from mashvlm_jax.model import attention as attention_lib
from mashvlm_jax.model import rope
from mashvlm_jax.model.config import LlamaConfig, LoraConfig

Dtype = jnp.dtype

_INIT = nn.initializers.normal(stddev=0.02)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def partitioned(init, axes):
  """Initializer carrying logical axis names (mapped to mesh axes in train/sharding.py).

  ``rules=()``: unboxing adds no sharding constraint (jit in/out shardings place the
  parameters); DenseGeneral boxes its kernel while still flat, which a constraint under a
  mesh rejects (flax issue #3676)."""
  return nn.with_logical_partitioning(init, axes, rules=())


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, then scale * result in the input dtype."""
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rows(layer, x, feature_dims: int = 1):
  """``layer``, a dense layer over the trailing ``feature_dims`` dims of x [*lead,
  *features], applied on CPU to x as one 2-D batch of rows [N, *features] and reshaped back
  to [*lead, *out]; elsewhere to x as it is.

  The same products either way. On CPU the weight gradient then contracts one dimension
  (the N rows) instead of B and S, which XLA's CPU dot emitter runs without transposed
  copies of the activation gradients (the tiny config's train step: 7% faster on one
  core). Not on TPU, where merging B and S can cost a relayout of tiled activations.
  """
  if x.ndim - feature_dims <= 1 or jax.default_backend() != "cpu":
    return layer(x)
  lead = x.shape[:x.ndim - feature_dims]
  y = layer(x.reshape((-1,) + x.shape[x.ndim - feature_dims:]))
  return y.reshape(lead + y.shape[1:])


def write_rows(cache, new, index):
  """cache [B, T, ...] with new [B, C, ...] written at rows' offsets index int[B]."""
  new = new.astype(cache.dtype)
  if new.shape[1] == 1:  # a decode step: a select, no scatter (and no transposes) on CPU
    hit = jnp.arange(cache.shape[1])[None, :] == index[:, None]  # [B, T]
    return jnp.where(hit.reshape(hit.shape + (1,) * (cache.ndim - 2)), new, cache)
  return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x, i, axis=0))(
      cache, new, index)


def lora_a_init(fan_in_axes: tuple[int, ...]):
  """PEFT's A initialisation (``kaiming_uniform_(a=sqrt(5))`` on torch's [rank, in]):
  uniform on +-1/sqrt(fan_in), fan_in the product of the input dims ``fan_in_axes``."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = 1
    for axis in fan_in_axes:
      fan_in *= shape[axis]
    bound = 1.0 / fan_in ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class LoraAdapter(nn.Module):
  """The low-rank update of one projection: x [*lead, *in] -> (alpha / rank) *
  dropout(x) A B [*lead, *out] with A [*in, rank] (PEFT's init) and B [rank, *out] (zeros,
  so a fresh adapter adds exactly 0). ``in_axes`` / ``out_axes``: the logical axis names
  of the projection's input and output dims (the base kernel's). Dropout (rate
  ``lora.dropout``) runs only when a "dropout" RNG is given, i.e. in training."""
  lora: LoraConfig
  out_features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    num_in = len(self.in_axes)
    rank = self.lora.rank
    a = self.param("lora_a", partitioned(lora_a_init(tuple(range(num_in))),
                                         self.in_axes + ("lora_rank",)),
                   x.shape[x.ndim - num_in:] + (rank,), self.param_dtype)
    b = self.param("lora_b", partitioned(nn.initializers.zeros,
                                         ("lora_rank",) + self.out_axes),
                   (rank,) + tuple(self.out_features), self.param_dtype)
    if self.lora.dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(self.lora.dropout, deterministic=False)(x)
    low = jnp.tensordot(x.astype(self.dtype), a.astype(self.dtype), axes=num_in)
    out = jnp.tensordot(low, b.astype(self.dtype), axes=1)
    return out * jnp.asarray(self.lora.scale, self.dtype)


def project(layer, x, name: str, lora: LoraConfig, out_features, in_axes, out_axes,
            dtype, param_dtype):
  """``rows(layer, x)`` plus, when ``lora`` targets ``name``, its adapter (a submodule
  ``<name>_lora`` of the calling module). ``in_axes`` names x's feature dims."""
  out = rows(layer, x, len(in_axes))
  if not lora.applies_to(name):
    return out
  adapter = LoraAdapter(lora, tuple(out_features), tuple(in_axes), tuple(out_axes), dtype,
                        param_dtype, name=f"{name}_lora")
  return out + rows(adapter, x, len(in_axes)).astype(out.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embedding; q/k/v kernels [D, heads, d]."""
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  backend: str = "dense"
  capture_probs: bool = False
  rve: rve_lib.RveConfig | None = None
  capture_heads: bool = False
  lora: LoraConfig = LoraConfig()

  @nn.compact
  def __call__(self, x, angles, mask, cache_index=None, rve_rows=None, layer=None):
    """x [B, C, D] -> [B, C, D]. With ``cache_index`` int[B] (decoding) ``mask`` is bool
    [B, C, cache_len] over the cache, which this call creates on first use. With ``rve``
    and ``rve_rows`` bool[B, C], the rows to enhance in layer ``layer`` (int or traced)."""
    cfg = self.cfg
    dense = functools.partial(nn.DenseGeneral, use_bias=cfg.attention_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    head_dim = cfg.dim_per_head
    lora = functools.partial(project, lora=self.lora, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    q = lora(dense((cfg.num_heads, head_dim), name="q_proj",
                   kernel_init=partitioned(_INIT, ("embed", "heads", "kv"))), x, "q_proj",
             out_features=(cfg.num_heads, head_dim), in_axes=("embed",),
             out_axes=("heads", "kv"))
    k = lora(dense((cfg.num_kv_heads, head_dim), name="k_proj",
                   kernel_init=partitioned(_INIT, ("embed", "kv_heads", "kv"))), x, "k_proj",
             out_features=(cfg.num_kv_heads, head_dim), in_axes=("embed",),
             out_axes=("kv_heads", "kv"))
    v = lora(dense((cfg.num_kv_heads, head_dim), name="v_proj",
                   kernel_init=partitioned(_INIT, ("embed", "kv_heads", "kv"))), x, "v_proj",
             out_features=(cfg.num_kv_heads, head_dim), in_axes=("embed",),
             out_axes=("kv_heads", "kv"))
    q = rope.apply_rotary(q, angles)
    k = rope.apply_rotary(k, angles)
    enhance = None
    if self.rve is not None and rve_rows is not None:
      enhance = functools.partial(rve_lib.enhance_attention_logits, rows=rve_rows,
                                  layer=layer, config=self.rve)
    if cache_index is None:
      out = attention_lib.attend(q, k, v, mask, backend=self.backend, enhance=enhance)
    else:  # the fast backends need as many keys as queries: decoding is dense
      shape = (k.shape[0], mask.shape[-1]) + k.shape[2:]
      cached_k = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
      cached_v = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
      cached_k.value = k = write_rows(cached_k.value, k, cache_index)
      cached_v.value = v = write_rows(cached_v.value, v, cache_index)
      out = attention_lib.dense_attention(q, k, v, mask, enhance)
    if self.capture_probs or self.capture_heads:
      probs = attention_lib.attention_probs(q, k, mask, enhance)  # [B, Hq, C, keys]
      if self.capture_probs:
        self.sow("intermediates", "attention_probs", probs.mean(axis=1))
      if self.capture_heads:
        self.sow("intermediates", "attention_head_probs", probs)
    return lora(dense(x.shape[-1], axis=(-2, -1), name="o_proj",
                      kernel_init=partitioned(_INIT, ("heads", "kv", "embed"))), out,
                "o_proj", out_features=(x.shape[-1],), in_axes=("heads", "kv"),
                out_axes=("embed",))


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: LoraConfig = LoraConfig()

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, use_bias=self.cfg.mlp_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    lora = functools.partial(project, lora=self.lora, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    up_init = partitioned(_INIT, ("embed", "mlp"))
    size = self.cfg.intermediate_size
    up_lora = dict(out_features=(size,), in_axes=("embed",), out_axes=("mlp",))
    gate = lora(dense(size, name="gate_proj", kernel_init=up_init), x, "gate_proj", **up_lora)
    up = lora(dense(size, name="up_proj", kernel_init=up_init), x, "up_proj", **up_lora)
    return lora(dense(x.shape[-1], name="down_proj",
                      kernel_init=partitioned(_INIT, ("mlp", "embed"))), nn.silu(gate) * up,
                "down_proj", out_features=(x.shape[-1],), in_axes=("mlp",),
                out_axes=("embed",))


class DecoderLayer(nn.Module):
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  backend: str = "dense"
  capture_probs: bool = False
  rve: rve_lib.RveConfig | None = None
  capture_heads: bool = False
  lora: LoraConfig = LoraConfig()

  @nn.compact
  def __call__(self, x, angles, mask, cache_index=None, rve_rows=None, layer=None):
    norm = functools.partial(RMSNorm, eps=self.cfg.rms_norm_eps, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "activation_embed"))
    attention = Attention(self.cfg, self.dtype, self.param_dtype, self.backend,
                          self.capture_probs, self.rve, self.capture_heads, self.lora,
                          name="self_attn")
    h = x + attention(norm(name="input_layernorm")(x), angles, mask, cache_index, rve_rows,
                      layer)
    out = h + MLP(self.cfg, self.dtype, self.param_dtype, self.lora, name="mlp")(
        norm(name="post_attention_layernorm")(h))
    return out, None


def layer_stack(layer_cls, num_layers: int, remat_policy: str, num_broadcast: int,
                scan_layers: bool = True, num_scanned: int = 0):
  """The module class of ``layer_cls`` stacked ``num_layers`` times under nn.scan,
  optionally rematerialised.

  The layer's first argument is the scan carry; the next ``num_broadcast`` arguments are
  shared by every layer and the ``num_scanned`` after them are sliced per layer along
  their leading axis. Parameters, decoding caches and sown intermediates gain a leading
  ``layers`` axis. ``scan_layers=False`` fully unrolls the scan: the same stacked variables
  and the same per-layer computation, compiled as ``num_layers`` copies of the layer with
  static slices of the stack instead of one loop body (no per-iteration weight copies, no
  stacked residual buffers in the backward pass, and XLA may drop unused layers).
  """
  if remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  return nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned,
                 length=num_layers,
                 unroll=1 if scan_layers else max(num_layers, 1),
                 metadata_params={nn.PARTITION_NAME: "layers"})


def scanned(layer_cls, num_layers: int, remat_policy: str, num_broadcast: int,
            scan_layers: bool = True, num_scanned: int = 0, **kwargs):
  """An instance of ``layer_stack(...)`` built with ``kwargs`` (the layer's fields)."""
  return layer_stack(layer_cls, num_layers, remat_policy, num_broadcast, scan_layers,
                     num_scanned)(**kwargs)


class LlamaDecoder(nn.Module):
  """Token embedding, the stack of decoder layers, final norm and LM head."""
  cfg: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention_backend: str = "dense"
  attention_blocks: tuple[int, int] = (128, 128)  # splash (block_q, block_kv), causal_lm
  capture_attention: bool = False  # sow per-layer attention probabilities (analysis)
  scan_layers: bool = True  # False: the layer stack unrolled (``scanned``)
  rve: rve_lib.RveConfig | None = None  # attention enhancement (analysis/rve.py)
  capture_heads: bool = False  # sow per-layer, per-head attention probabilities
  lora: LoraConfig = LoraConfig()  # adapters on the layers' projections (rank 0: none)

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=partitioned(_INIT, ("vocab", "embed")))
    # With RVE: the rows (broadcast) and the layer index (scanned) after the cache index.
    extra = dict(num_broadcast=4, num_scanned=1) if self.rve is not None else dict(
        num_broadcast=3)
    self.layers = scanned(DecoderLayer, cfg.num_layers, self.remat_policy,
                          scan_layers=self.scan_layers, cfg=cfg,
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          backend=self.attention_backend,
                          capture_probs=self.capture_attention, rve=self.rve,
                          capture_heads=self.capture_heads, lora=self.lora, **extra)
    self.norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              kernel_init=partitioned(_INIT, ("embed", "vocab")))
    self.inv_freq = rope.inverse_frequencies(cfg.dim_per_head, cfg.rope_theta,
                                             cfg.rope_scaling_dict)

  def embed(self, token_ids):
    """int[B, L] -> [B, L, D] in the compute dtype."""
    return self.embed_tokens(token_ids)

  def __call__(self, inputs_embeds, position_ids, mask, cache_index=None, rve_rows=None):
    """Final-normed hidden states [B, S, D].

    Args:
      inputs_embeds: [B, S, D].
      position_ids: int[B, 2, S] (row 0: even rotary pairs, row 1: odd pairs).
      mask: bool[B, S, S] or [S, S], True = query may attend key (dense backend), or an
        ``attention.MaskLayout`` (any backend); see ``attention.attention_mask``.
        Decoding: bool[B, S, cache_len] over the cache.
      cache_index: None (no cache), or int[B]: each row's offset in the ``cache``
        collection where this chunk of S tokens is written (apply with
        ``mutable=["cache"]``; the first such call creates the cache).
      rve_rows: with ``rve``, bool[B, S]: the query rows RVE enhances (None: none).
    """
    angles = rope.rotary_angles(position_ids, self.inv_freq)
    x = inputs_embeds.astype(self.dtype)
    if self.rve is None:
      h, _ = self.layers(x, angles, mask, cache_index)
    else:
      h, _ = self.layers(x, angles, mask, cache_index, rve_rows,
                         jnp.arange(self.cfg.num_layers, dtype=jnp.int32))
    return self.norm(h)

  def rotary(self, position_ids):
    """Rotary angles float32 [B, S, d/2] of position ids int[B, 2, S]."""
    return rope.rotary_angles(position_ids, self.inv_freq)

  def head(self, hidden):
    """Final norm and LM head: last-layer states [B, S, D] -> float32 logits."""
    return self.logits(self.norm(hidden))

  def logits(self, hidden):
    """[B, S, D] -> float32 logits [B, S, vocab]."""
    if self.cfg.tie_word_embeddings:
      out = rows(self.embed_tokens.attend, hidden)
    else:
      out = rows(self.lm_head, hidden)
    return out.astype(jnp.float32)

  def causal_lm(self, token_ids, attention_mask=None):
    """Plain text LLaMA: int[B, L] -> logits [B, L, vocab] with causal attention.

    ``attention_mask`` bool[B, L] (True = real token) marks right padding.
    """
    from mashvlm_jax import layout  # local: layout is numpy-first, cheap to import
    if attention_mask is None:
      attention_mask = jnp.ones(token_ids.shape, bool)
    types = layout.text_token_types(attention_mask, 0, 0)
    ids = layout.position_ids(types, "distinct")
    block_q, block_kv = self.attention_blocks
    spec = attention_lib.AttentionSpec.plain_causal(block_q=block_q, block_kv=block_kv)
    mask = attention_lib.attention_mask(types, spec, self.attention_backend)
    return self.logits(self(self.embed(token_ids), ids, mask))


def unstack_layers(tree, num_layers: int) -> list:
  """Per-layer trees of a tree whose leaves are stacked on a leading ``layers`` axis."""
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], tree) for i in range(num_layers)]


def decode_unstacked(decoder: LlamaDecoder, params, layer_params: list, layer_caches: list,
                     token_ids, position_ids, mask, cache_index):
  """``decoder``'s forward over a chunk of new tokens with one parameter tree and one
  ``cache`` tree per layer (``unstack_layers``) instead of the scanned stack.

  Same computation as ``head(decoder(embed(token_ids), ..., cache_index))`` (with the
  decoder's ``rve``: every new token's row enhanced, as ``MashVLM.extend``); on CPU the
  scan slices (copies) every layer's weights out of the stack at each decode step, and
  separate per-layer buffers avoid that copy. Returns (logits float32 [B, C, vocab], the
  per-layer caches after writing the chunk).
  """
  layer = DecoderLayer(decoder.cfg, decoder.dtype, decoder.param_dtype, rve=decoder.rve,
                       lora=decoder.lora)
  x = decoder.apply({"params": params}, token_ids, method=LlamaDecoder.embed)
  angles = decoder.apply({"params": params}, position_ids, method=LlamaDecoder.rotary)
  caches = []
  for index, (layer_p, cache) in enumerate(zip(layer_params, layer_caches)):
    # RVE: every new token is a last-token row; the layer index is a Python int here
    rve = (jnp.ones(token_ids.shape, bool), index) if decoder.rve is not None else ()
    (x, _), state = layer.apply({"params": layer_p, "cache": cache}, x, angles, mask,
                                cache_index, *rve, mutable=["cache"])
    caches.append(state["cache"])
  return decoder.apply({"params": params}, x, method=LlamaDecoder.head), caches
