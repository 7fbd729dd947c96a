"""The full MASH-VLM: CLIP ViT -> projector -> video token builder -> LLaMA with
Harmonic-RoPE and DST attention.

frames [B, T, H, W, 3] + text ids [B, L] -> logits over the text positions [B, L, vocab].
Each row is laid out ``[temporal M][spatial N][text L]`` (layout.py), with the action token
(model/action_token.py, when enabled) between the video and the text: ``[video][action][text]``.

Decoding with a KV cache (eval/generate.py) uses ``prefill`` (or ``prefill_video``) once
and then ``extend`` per chunk of new text tokens, applied with ``mutable=["cache"]``;
``capture_attention=True`` sows per-layer attention probabilities (eval/plots.py),
``capture_heads=True`` per-head ones (analysis/rve_heads.py).

RVE (analysis/rve.py, ``rve=RveConfig``) enhances the last-token rows: the row whose logits
are read and every row after it. ``__call__`` takes them as ``rve_from`` (text index, default
each row's last real token), ``prefill`` enhances the prompt's last token, ``extend`` every
new token (or ``rve_rows``), ``prefill_video`` nothing; so KV-cache decoding equals a full
forward with ``rve_from`` = the prompt's last token.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout
from mashvlm_jax.analysis import rve as rve_lib
from mashvlm_jax.model import action_token as action_lib
from mashvlm_jax.model import attention as attention_lib
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.model.llm import LlamaDecoder
from mashvlm_jax.model.projector import Projector
from mashvlm_jax.model.video_tokens import pool_video, temporal_tokens
from mashvlm_jax.model.vision import ClipVisionEncoder, normalize_frames


class MashVLM(nn.Module):
  cfg: ModelConfig
  capture_attention: bool = False  # sow "intermediates"/.../attention_probs per layer
  rve: rve_lib.RveConfig | None = None  # attention enhancement at inference (RVE)
  capture_heads: bool = False  # sow "intermediates"/.../attention_head_probs per layer

  def setup(self):
    cfg = self.cfg
    if self.rve is not None:
      self.rve.check_model(cfg)
    common = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
    self.vision_tower = ClipVisionEncoder(cfg.vision, remat_policy=cfg.remat_policy,
                                          scan_layers=cfg.scan_layers, **common)
    self.projector = Projector(cfg.llm.hidden_size, cfg.projector, **common)
    self.language_model = LlamaDecoder(
        cfg.llm, remat_policy=cfg.remat_policy, attention_backend=cfg.attention_backend,
        scan_layers=cfg.scan_layers,
        attention_blocks=(cfg.splash_block_q, cfg.splash_block_kv),
        capture_attention=self.capture_attention, rve=self.rve,
        capture_heads=self.capture_heads, lora=cfg.lora, **common)
    if cfg.action_token.enabled:
      self.action_token = action_lib.ActionToken(cfg.action_token, cfg.llm.hidden_size,
                                                 **common)

  def video_tokens(self, frames):
    """frames uint8 (0..255) or CLIP-normalised float [B, T, H, W, 3] ->
    (temporal [B, M, D], spatial [B, N, D])."""
    cfg = self.cfg
    if frames.ndim != 5 or frames.shape[1] != cfg.num_frames:
      raise ValueError(f"frames must be [B, T={cfg.num_frames}, H, W, 3], "
                       f"found shape {frames.shape}")
    batch, num_frames = frames.shape[:2]
    pixels = frames.reshape((-1,) + frames.shape[2:])
    if frames.dtype == jnp.uint8:
      pixels = normalize_frames(pixels, cfg.compute_dtype)
    feats = self.vision_tower(pixels)
    cls, patches = feats["cls"], feats["patches"]
    if cfg.freeze_vision:
      cls, patches = jax.lax.stop_gradient(cls), jax.lax.stop_gradient(patches)
    # The tokens of build_video_tokens(projector(cls), projector(patches)), with the
    # averaging moved before the projector's last layer: that layer is affine and each
    # class token, frame mean and spatial token is an average (weights summing to 1) of
    # frame rows, so the two commute; the frame-mean differences are taken after it, as
    # build_video_tokens takes them. The last layer and its backward then run over the
    # 2T + N pooled rows instead of all T * (P + 1) frame tokens.
    cls = self.projector.features(cls).reshape(batch, num_frames, -1)
    patches = self.projector.features(patches).reshape(batch, num_frames, patches.shape[1], -1)
    grid = (cfg.vision.grid, cfg.vision.grid)
    cls, frame_means, spatial = pool_video(cls, patches, grid)
    tokens = self.projector.output(jnp.concatenate([cls, frame_means, spatial], axis=1))
    cls, frame_means, spatial = jnp.split(tokens, [num_frames, 2 * num_frames], axis=1)
    return temporal_tokens(cls, frame_means), spatial

  def prefix(self, frames):
    """The tokens before the text: embeds [B, P, D] in the compute dtype and the
    text-part validity bool[B, P - M - N] of the action token (P = ``cfg.prefix_len``:
    ``[temporal M][spatial N]``, then ``[action 1]`` when enabled)."""
    temporal, spatial = self.video_tokens(frames)
    dtype = self.cfg.compute_dtype
    parts = [temporal.astype(dtype), spatial.astype(dtype)]
    if self.cfg.action_token.enabled:
      parts.append(self.action_token.embeds(frames.shape[0]))
    token_mask = jnp.ones((frames.shape[0], int(self.cfg.action_token.enabled)), bool)
    return jnp.concatenate(parts, axis=1), token_mask

  def sequence(self, frames, text_ids, text_mask=None):
    """Inputs of the decoder: embeds [B, S, D], types int[B, S], position ids int[B, 2, S]
    and the mask, with S = P + L (P = ``cfg.prefix_len``: M + N video tokens, + 1 action
    token typed as text): bool[B, S, S] (``layout.dst_mask``) for the dense backend, an
    ``attention.MaskLayout`` for the fast ones."""
    if text_mask is None:
      text_mask = jnp.ones(text_ids.shape, bool)
    prefix, token_mask = self.prefix(frames)
    text = self.language_model.embed(text_ids)
    embeds = jnp.concatenate([prefix.astype(text.dtype), text], axis=1)
    m, n = self.cfg.video_token_counts
    types = layout.text_token_types(jnp.concatenate([token_mask, text_mask], axis=1), m, n)
    ids = layout.position_ids(types, self.cfg.rope_mode)
    spec = attention_spec(self.cfg, m, n)
    mask = attention_lib.attention_mask(types, spec, self.cfg.attention_backend)
    return embeds, types, ids, mask

  def __call__(self, frames, text_ids, text_mask=None, rve_from=None, with_heads=False):
    """Logits float32 [B, L, vocab] at the text positions; with ``with_heads`` (action
    token enabled) also the heads' {verb, noun, action: float32 logits [B, classes]}.

    Args:
      frames: uint8 [B, T, H, W, 3] (or CLIP-normalised float).
      text_ids: int[B, L] chat text token ids, right-padded.
      text_mask: optional bool[B, L], True for real tokens (default: all real).
      rve_from: with ``rve``, int[B]: the text index from which rows are enhanced
        (default: each row's last real token).
    """
    if with_heads and not self.cfg.action_token.enabled:
      raise ValueError("with_heads needs model.action_token.enabled")
    if text_mask is None:
      text_mask = jnp.ones(text_ids.shape, bool)
    embeds, _, ids, mask = self.sequence(frames, text_ids, text_mask)
    rows = self._sequence_rows(text_mask, rve_from)
    hidden = self.language_model(embeds, ids, mask, rve_rows=rows)
    logits = self.language_model.logits(hidden[:, -text_ids.shape[1]:])
    if not self.cfg.action_token.enabled:
      return logits
    heads = self.action_heads(hidden)  # always traced: init creates the heads' params
    return (logits, heads) if with_heads else logits

  def action_heads(self, hidden):
    """Final-normed states [B, S, D] of ``[video][action][text]`` rows -> the heads'
    {verb, noun, action: float32 logits [B, classes]} read at the token (index M + N)."""
    return self.action_token(hidden[:, sum(self.cfg.video_token_counts)])

  def _sequence_rows(self, text_mask, rve_from=None):
    """With ``rve``: bool[B, M+N+L], the enhanced rows of ``[video][text]`` (none in the
    video); text rows from ``rve_from`` int[B] or each row's last real token. Else None."""
    if self.rve is None:
      return None
    text = (rve_lib.last_token_rows(text_mask) if rve_from is None
            else rve_lib.rows_from(text_mask, rve_from))
    prefix = jnp.zeros(text.shape[:-1] + (self.cfg.prefix_len,), bool)  # video, action
    return jnp.concatenate([prefix, text], axis=-1)

  # ---------------------------------------------------------------- KV-cache decoding

  def cache_mask(self, types, cache_len: int):
    """bool[B, S, cache_len]: the config's ``layout.dst_mask`` of ``types`` [B, S] with the
    cache slots past S (not written yet) as hidden pad keys."""
    length = types.shape[-1]
    if cache_len < length:
      raise ValueError(f"cache_len={cache_len} is shorter than the prefill ({length} tokens)")
    pad = jnp.full(types.shape[:-1] + (cache_len - length,), layout.PAD, types.dtype)
    full = jnp.concatenate([types, pad], axis=-1)
    return layout.dst_mask(full, **self.cfg.mask.as_kwargs())[..., :length, :]

  def prefill(self, frames, text_ids, text_mask, cache_len: int):
    """Runs ``[video][action][text]`` once with the config's mask, writing the KV cache
    at 0..S-1 (apply with ``mutable=["cache"]``).

    Returns (logits float32 [B, L, vocab] at the text positions, types int[B, S],
    position ids int[B, 2, S]); S = P + L <= cache_len (P = ``cfg.prefix_len``).
    """
    embeds, types, ids, _ = self.sequence(frames, text_ids, text_mask)
    start = jnp.zeros(types.shape[:1], jnp.int32)
    hidden = self.language_model(embeds, ids, self.cache_mask(types, cache_len), start,
                                 rve_rows=self._sequence_rows(text_mask))
    return self.language_model.logits(hidden[:, -text_ids.shape[1]:]), types, ids

  def prefill_video(self, frames, cache_len: int):
    """Runs the prefix alone (the video block and, when enabled, the action token) into
    the cache at 0..P-1 and returns (types int[B, P], position ids int[B, 2, P]). No video
    query sees text and the token sees only video, so these keys and values are those of
    any ``[video][action][text]`` row: questions about one video can share them."""
    embeds, token_mask = self.prefix(frames)
    types = layout.text_token_types(token_mask, *self.cfg.video_token_counts)
    ids = layout.position_ids(types, self.cfg.rope_mode)
    start = jnp.zeros(types.shape[:1], jnp.int32)
    self.language_model(embeds, ids, self.cache_mask(types, cache_len), start)
    return types, ids

  def extend(self, text_ids, position_ids, mask, cache_index, rve_rows=None):
    """Appends text tokens to the cache and returns their logits float32 [B, C, vocab].

    Args:
      text_ids: int[B, C] new tokens; row b's land at cache slots cache_index[b] + 0..C-1.
      position_ids: int[B, 2, C] (``layout.next_position_ids`` / ``position_ids``).
      mask: bool[B, C, cache_len] (``layout.text_query_mask`` over the cache's types).
      cache_index: int[B].
      rve_rows: with ``rve``, bool[B, C]: the new rows to enhance (default: all, as for
        decode steps).
    """
    embeds = self.language_model.embed(text_ids)
    if self.rve is not None and rve_rows is None:
      rve_rows = jnp.ones(text_ids.shape, bool)
    hidden = self.language_model(embeds, position_ids, mask, cache_index, rve_rows=rve_rows)
    return self.language_model.logits(hidden)


def attention_spec(cfg: ModelConfig, num_temporal: int, num_spatial: int):
  """The static ``AttentionSpec`` of a config: video prefix, mask switches, splash tiles."""
  return attention_lib.AttentionSpec(num_temporal, num_spatial, **cfg.mask.as_kwargs(),
                                     block_q=cfg.splash_block_q, block_kv=cfg.splash_block_kv)


def dummy_inputs(cfg: ModelConfig, batch: int = 1, text_len: int = 8):
  """Zero inputs of the right shapes and dtypes, for init and eval_shape."""
  size = cfg.vision.image_size
  frames = jnp.zeros((batch, cfg.num_frames, size, size, 3), jnp.uint8)
  return frames, jnp.zeros((batch, text_len), jnp.int32)


def init_params(cfg: ModelConfig, rng, batch: int = 1, text_len: int = 8):
  """Randomly initialised parameters (boxed with logical axis names), built under jit."""
  init = lambda key: MashVLM(cfg).init(key, *dummy_inputs(cfg, batch, text_len))["params"]
  return jax.jit(init)(rng)


def abstract_params(cfg: ModelConfig):
  """Parameter shapes/dtypes without allocating memory (jax.eval_shape)."""
  return jax.eval_shape(lambda rng: init_params(cfg, rng), jax.random.PRNGKey(0))


def count_params(tree) -> int:
  """Number of scalars in a parameter tree (boxed or plain, concrete or abstract)."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
  return int(sum(np.prod(x.shape) for x in leaves))
