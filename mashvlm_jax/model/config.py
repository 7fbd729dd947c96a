"""Typed, validated model configuration built from the ``config.model`` ConfigDict.

The ml_collections files in ``configs/`` are what users edit; these frozen dataclasses are
what modules receive. ``ModelConfig.from_dict`` rejects unknown or missing keys by name, so
a typo in a config file or a ``--config.model.X=...`` override fails before any tracing.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import jax.numpy as jnp

from mashvlm_jax import layout

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
PROJECTORS = ("linear", "mlp2x_gelu")
VISION_ACTS = ("quick_gelu", "gelu")
POSITION_INITS = ("normal", "sincos2d")
# model/attention.py BACKENDS, plus "auto": resolved when traced (attention.resolve_backend)
ATTENTION_BACKENDS = ("auto", "dense", "splash", "gpu")
SPLASH_LANES = 128  # splash tiles are multiples of the TPU lane width


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP ViT (HuggingFace CLIPVisionModel semantics)."""
  image_size: int = 224
  patch_size: int = 14
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  # Index into HF's hidden_states tuple (0 = embeddings after pre-LN, i = after layer i;
  # negative counts from the end, -2 = penultimate layer as in LLaVA/MASH-VLM).
  feature_layer: int = -2
  # Initial position embeddings of a tower trained from scratch (imported CLIP weights
  # replace them): "normal" (std 0.02, as HF) | "sincos2d" (fixed-frequency 2D sin-cos at
  # unit scale, as big_vision/MAE: position stays legible next to patch content).
  position_init: str = "normal"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def layers_to_run(self) -> int:
    """How many encoder layers produce the selected hidden state."""
    return self.feature_layer if self.feature_layer >= 0 else (
        self.num_layers + 1 + self.feature_layer)

  def validate(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"vision.image_size={self.image_size} is not a multiple of "
                       f"vision.patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"vision.hidden_size={self.hidden_size} is not divisible by "
                       f"vision.num_heads={self.num_heads}")
    if not 0 <= self.layers_to_run <= self.num_layers:
      raise ValueError(f"vision.feature_layer={self.feature_layer} is outside "
                       f"[-{self.num_layers + 1}, {self.num_layers}]")
    if self.position_init not in POSITION_INITS:
      raise ValueError(f"vision.position_init must be one of {POSITION_INITS}, "
                       f"found {self.position_init!r}")
    if self.position_init == "sincos2d" and self.hidden_size % 4:
      raise ValueError(f"vision.position_init='sincos2d' needs vision.hidden_size divisible "
                       f"by 4, found {self.hidden_size}")
    if self.hidden_act not in VISION_ACTS:
      raise ValueError(f"vision.hidden_act must be one of {VISION_ACTS}, "
                       f"found {self.hidden_act!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """LLaMA-family decoder (HuggingFace LlamaForCausalLM semantics)."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 0  # 0 = hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None  # HF rope_scaling dict as sorted (key, value) pairs
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def rope_scaling_dict(self) -> dict | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def validate(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"llm.num_heads={self.num_heads} must be a multiple of "
                       f"llm.num_kv_heads={self.num_kv_heads}")
    if not self.head_dim and self.hidden_size % self.num_heads:
      raise ValueError(f"llm.hidden_size={self.hidden_size} is not divisible by "
                       f"llm.num_heads={self.num_heads}; set llm.head_dim")
    if self.dim_per_head % 2:
      raise ValueError(f"llm head dim must be even for rotary pairs, found "
                       f"{self.dim_per_head}")


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  """dst_mask switches (layout.dst_mask); defaults are MASH-VLM's DST attention."""
  temporal: str = "causal"
  spatial: str = "bidirectional"
  temporal_sees_spatial: bool = False
  spatial_sees_temporal: bool = False

  def as_kwargs(self) -> dict:
    return dataclasses.asdict(self)

  def validate(self):
    for name in ("temporal", "spatial"):
      if getattr(self, name) not in layout.ATTENTION_KINDS:
        raise ValueError(f"mask.{name} must be one of {layout.ATTENTION_KINDS}, "
                         f"found {getattr(self, name)!r}")


# The decoder layer's projections as the parameter tree names them (model/llm.py).
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                    "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters on the decoder's projections (docs/design.md "LoRA"); rank 0 = off.

  ``targets`` is a regex that must match a projection name (LORA_PROJECTIONS) in full;
  each matched projection W gains W + (alpha / rank) B A with A [in, rank], B [rank, out].
  ``dropout`` applies to the adapter's input in training only.
  """
  rank: int = 0
  alpha: float = 32.0
  targets: str = "|".join(LORA_PROJECTIONS)
  dropout: float = 0.05  # as LLaVA's LoRA scripts

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / rank, the factor on B A (PEFT's ``scaling`` without rsLoRA)."""
    return float(self.alpha) / self.rank

  def targeted(self) -> tuple[str, ...]:
    """The projection names ``targets`` matches, in LORA_PROJECTIONS order."""
    return tuple(n for n in LORA_PROJECTIONS if re.fullmatch(self.targets, n))

  def applies_to(self, name: str) -> bool:
    """True when the projection ``name`` carries an adapter."""
    return self.enabled and name in self.targeted()

  def validate(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
      raise ValueError(f"lora.rank must be an integer >= 0 (0 = off), found {self.rank!r}")
    if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise ValueError(f"lora.alpha must be a positive number, found {self.alpha!r}")
    if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
      raise ValueError(f"lora.dropout must be in [0, 1), found {self.dropout!r}")
    if not isinstance(self.targets, str):
      raise ValueError(f"lora.targets must be a regex string, found {self.targets!r}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"lora.targets={self.targets!r} is not a valid regex: {e}") from None
    if not self.targeted():
      raise ValueError(f"lora.targets={self.targets!r} matches none of the decoder's "
                       f"projections {LORA_PROJECTIONS} (matched in full)")


@dataclasses.dataclass(frozen=True)
class ActionTokenConfig:
  """LLaVAction's action token (model/action_token.py): one learnable embedding after the
  video block whose final hidden state feeds bias-free verb / noun / action heads, trained
  with loss_weight * sum_h head_weights[h] * CE_h (averaged over labelled rows)."""
  enabled: bool = False
  num_verbs: int = 8
  num_nouns: int = 8
  num_actions: int = 64
  loss_weight: float = 0.05  # lambda
  head_weights: tuple = (0.5, 0.5, 0.1)  # (w_verb, w_noun, w_action)

  @property
  def num_classes(self) -> tuple[int, int, int]:
    return self.num_verbs, self.num_nouns, self.num_actions

  def validate(self):
    if not isinstance(self.enabled, bool):
      raise ValueError(f"action_token.enabled must be true or false, found {self.enabled!r}")
    for name in ("num_verbs", "num_nouns", "num_actions"):
      size = getattr(self, name)
      if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"action_token.{name} must be a positive integer, found {size!r}")
    if not isinstance(self.loss_weight, (int, float)) or isinstance(self.loss_weight, bool) \
        or not self.loss_weight >= 0:
      raise ValueError(f"action_token.loss_weight must be a number >= 0, "
                       f"found {self.loss_weight!r}")
    weights = self.head_weights
    if (not isinstance(weights, tuple) or len(weights) != 3 or any(
        isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 for w in weights)):
      raise ValueError(f"action_token.head_weights must be 3 numbers >= 0 (verb, noun, "
                       f"action), found {weights!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: VisionConfig = VisionConfig()
  llm: LlamaConfig = LlamaConfig()
  mask: MaskConfig = MaskConfig()
  action_token: ActionTokenConfig = ActionTokenConfig()
  projector: str = "mlp2x_gelu"
  num_frames: int = 16
  rope_mode: str = "harmonic"
  freeze_vision: bool = True  # stop gradients into the vision tower (paper: frozen CLIP)
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"
  # "auto": splash on TPU, "gpu" on GPUs, "dense" on CPU, from jax.default_backend() when
  # traced; or one of "dense" | "splash" | "gpu" (model/attention.py).
  attention_backend: str = "auto"
  # True: each layer stack (vision tower, decoder) runs under nn.scan, one compiled layer
  # body (compile time flat in depth; the large configs). False: the same stacked
  # parameters applied layer by layer, unrolled (MaxText's scan_layers=False): faster steps
  # for shallow models, on CPU above all, at a compile time linear in depth.
  scan_layers: bool = True
  # Splash attention tiles (query rows / key columns per block); sequences are padded to
  # a multiple of both. Ignored by the other backends.
  splash_block_q: int = 128
  splash_block_kv: int = 128
  lora: LoraConfig = LoraConfig()  # decoder adapters; rank 0 = off

  @property
  def video_token_counts(self) -> tuple[int, int]:
    return layout.video_token_counts(self.num_frames, self.vision.grid)

  @property
  def prefix_len(self) -> int:
    """Tokens before the text: M + N video tokens, + 1 with the action token."""
    return sum(self.video_token_counts) + int(self.action_token.enabled)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def validate(self) -> "ModelConfig":
    self.vision.validate()
    self.llm.validate()
    self.mask.validate()
    self.action_token.validate()
    self.lora.validate()
    self.video_token_counts  # raises on bad frame count / odd grid
    checks = {"projector": PROJECTORS, "rope_mode": layout.ROPE_MODES,
              "remat_policy": REMAT_POLICIES, "dtype": tuple(DTYPES),
              "param_dtype": tuple(DTYPES), "attention_backend": ATTENTION_BACKENDS}
    for name, allowed in checks.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name} must be one of {allowed}, "
                         f"found {getattr(self, name)!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"model.scan_layers must be true or false, found {self.scan_layers!r}")
    for name in ("splash_block_q", "splash_block_kv"):
      size = getattr(self, name)
      if not isinstance(size, int) or size <= 0 or size % SPLASH_LANES:
        raise ValueError(f"model.{name} must be a positive multiple of {SPLASH_LANES} "
                         f"(splash attention tiles), found {size!r}")
    return self

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from ``config.model`` (a ConfigDict or dict); unknown keys are an error."""
    d = _plain(d)
    kwargs = _take_fields(cls, d, "model")
    sections = {"vision": VisionConfig, "llm": LlamaConfig, "mask": MaskConfig,
                "action_token": ActionTokenConfig, "lora": LoraConfig}
    for name, sub in sections.items():
      if name in kwargs:
        sub_kwargs = _take_fields(sub, kwargs[name], f"model.{name}")
        if name == "llm" and sub_kwargs.get("rope_scaling"):
          sub_kwargs["rope_scaling"] = tuple(sorted(dict(sub_kwargs["rope_scaling"]).items()))
        if name == "action_token" and isinstance(sub_kwargs.get("head_weights"), list):
          sub_kwargs["head_weights"] = tuple(sub_kwargs["head_weights"])  # JSON, ConfigDict
        kwargs[name] = sub(**sub_kwargs)
    return cls(**kwargs).validate()

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    if d["llm"]["rope_scaling"]:
      d["llm"]["rope_scaling"] = dict(d["llm"]["rope_scaling"])
    return d


def _plain(d):
  return d.to_dict() if hasattr(d, "to_dict") else dict(d)


def _take_fields(cls, d, where: str) -> dict:
  d = _plain(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"unknown config key(s) {', '.join(where + '.' + k for k in unknown)}; "
                     f"known keys of {where}: {', '.join(sorted(names))}")
  return dict(d)
