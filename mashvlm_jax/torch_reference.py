"""PyTorch reference of the whole MASH-VLM forward, run from an ``export-torch`` directory.

    from mashvlm_jax import torch_reference
    model = torch_reference.load("exported/")              # float32 weights on CPU
    logits = model.logits(frames_uint8, text_ids, text_mask)  # [B, L, vocab]

frames [B, T, H, W, 3] -> CLIP ViT at the feature layer (CLS and patches) -> projector ->
token builder (temporal 3T-1: CLS, frame means, frame-difference means; spatial: 4
``array_split`` segments, averaged, 2x2-pooled) -> LLaMA whose rotary pair k takes its
position from id row k % 2 (Harmonic-RoPE) under the DST mask -> logits at the text
positions. With an action token (exported ``action_token`` file) each row is
``[video][action][text]``, the token typed as text, and ``forward`` also returns its
verb / noun / action head logits. The network is written here in plain torch from the exported HuggingFace
tensors; the position ids and the mask come from ``layout.py`` (numpy), their one home.
torch is imported only when a function here runs; importing this module needs neither
torch nor jax.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from mashvlm_jax import layout

_CLIP = "vision_model."


def _torch():
  import torch
  return torch


def read_weights(directory, dtype=None) -> dict:
  """{HF name: tensor} of a HF directory (single file or index) or a .safetensors file."""
  from safetensors.torch import load_file
  path = pathlib.Path(directory)
  if path.is_file():
    files = [path]
  elif (path / "model.safetensors.index.json").is_file():
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted({path / f for f in index["weight_map"].values()})
  else:
    files = [path / "model.safetensors"]
  out = {}
  for f in files:
    out.update(load_file(str(f)))
  return {k: v if dtype is None else v.to(dtype) for k, v in out.items()}


@dataclasses.dataclass
class Reference:
  """An exported MASH-VLM: its mash_config.json and the towers' tensors (``action``:
  the action token's, empty without one)."""
  config: dict
  llm: dict
  vision: dict
  projector: dict
  action: dict = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> dict:
    return self.config["model"]

  def logits(self, frames, text_ids, text_mask=None):
    """float logits [B, L, vocab] at the text positions.

    Args:
      frames: uint8 [B, T, H, W, 3] (0..255) or CLIP-normalised float, numpy or torch.
      text_ids: int [B, L], right-padded.
      text_mask: bool [B, L], True for real tokens (default: all real).
    """
    return self.forward(frames, text_ids, text_mask)[0]

  def forward(self, frames, text_ids, text_mask=None):
    """(logits [B, L, vocab] at the text positions, {verb, noun, action: float logits
    [B, classes]} of the action token's heads, or {} without one); arguments as
    ``logits``."""
    torch = _torch()
    text_ids = torch.as_tensor(np.asarray(text_ids)).long()
    if text_mask is None:
      text_mask = np.ones(tuple(text_ids.shape), bool)
    text_mask = np.asarray(text_mask, bool)
    with torch.no_grad():
      temporal, spatial = self.video_tokens(frames)
      text = self.llm["model.embed_tokens.weight"][text_ids]
      parts = [temporal.to(text.dtype), spatial.to(text.dtype)]
      if self.action:  # one text-typed token between the video and the text
        parts.append(self.action["embedding"].to(text.dtype).expand(text.shape[0], 1, -1))
        text_mask = np.concatenate([np.ones((len(text_mask), 1), bool), text_mask], axis=1)
      embeds = torch.cat(parts + [text], dim=1)
      types = layout.text_token_types(text_mask, temporal.shape[1], spatial.shape[1])
      ids = torch.from_numpy(layout.position_ids(types, self.model["rope_mode"])).long()
      mask = torch.from_numpy(layout.dst_mask(types, **self.model["mask"]))
      hidden = llama_hidden(self.llm, self.model["llm"], embeds, ids, mask)
      logits = lm_head(self.llm, self.model["llm"], hidden[:, -text_ids.shape[1]:])
      token = hidden[:, temporal.shape[1] + spatial.shape[1]]
      heads = {head: (token @ self.action[f"{head}_head.weight"].T).float()
               for head in ("verb", "noun", "action")} if self.action else {}
      return logits, heads

  def text_logits(self, text_ids, attention_mask=None):
    """Plain LLaMA: distinct ids, causal mask. int [B, L] -> logits [B, L, vocab]."""
    torch = _torch()
    text_ids = torch.as_tensor(np.asarray(text_ids)).long()
    if attention_mask is None:
      attention_mask = np.ones(tuple(text_ids.shape), bool)
    types = layout.text_token_types(np.asarray(attention_mask, bool), 0, 0)
    ids = torch.from_numpy(layout.position_ids(types, "distinct")).long()
    mask = torch.from_numpy(layout.dst_mask(types, **layout.plain_causal_switches()))
    with torch.no_grad():
      embeds = self.llm["model.embed_tokens.weight"][text_ids]
      return lm_head(self.llm, self.model["llm"],
                     llama_hidden(self.llm, self.model["llm"], embeds, ids, mask))

  def vision_features(self, frames):
    """Projected (cls [B, T, D], patches [B, T, P, D]) of frames [B, T, H, W, 3]."""
    torch = _torch()
    frames = torch.as_tensor(np.asarray(frames))
    batch, num_frames = frames.shape[:2]
    pixels = frames.reshape((-1,) + tuple(frames.shape[2:]))
    if pixels.dtype == torch.uint8:
      pixels = normalize(pixels, self.config["vision"])
    dtype = self.vision[_CLIP + "embeddings.class_embedding"].dtype
    feats = clip_hidden(self.vision, self.model["vision"], pixels.to(dtype))  # [BT, P+1, W]
    feats = project(self.projector, feats)
    cls = feats[:, 0].reshape(batch, num_frames, -1)
    return cls, feats[:, 1:].reshape(batch, num_frames, feats.shape[1] - 1, -1)

  def video_tokens(self, frames):
    """(temporal [B, 3T-1, D], spatial [B, grid^2, D])."""
    cls, patches = self.vision_features(frames)
    return build_video_tokens(cls, patches, self.model["vision"]["image_size"]
                              // self.model["vision"]["patch_size"])


def load(directory, dtype="float32") -> Reference:
  """Reads an ``export-torch`` directory; weights are cast to ``dtype`` (a torch dtype name)."""
  torch = _torch()
  directory = pathlib.Path(directory)
  config = json.loads((directory / "mash_config.json").read_text())
  files = config["files"]
  torch_dtype = getattr(torch, dtype)
  llm = read_weights(directory / files["language_model"], torch_dtype)
  if "language_model_adapter" in files:
    llm = fold_adapter(llm, directory / files["language_model_adapter"])
  return Reference(config=config, llm=llm,
                   vision=read_weights(directory / files["vision_tower"], torch_dtype),
                   projector=read_weights(directory / files["projector"], torch_dtype),
                   action=(read_weights(directory / files["action_token"], torch_dtype)
                           if "action_token" in files else {}))


PEFT_PREFIX = "base_model.model."


def fold_adapter(llm: dict, adapter_dir) -> dict:
  """LLaMA weights {HF name: tensor} with a PEFT LoRA adapter directory folded in:
  W + (lora_alpha / r) lora_B lora_A for each adapted ``<module>.weight`` (in float64,
  cast back to W's dtype)."""
  from safetensors.torch import load_file
  adapter_dir = pathlib.Path(adapter_dir)
  config = json.loads((adapter_dir / "adapter_config.json").read_text())
  scale = config["lora_alpha"] / config["r"]
  tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
  out = dict(llm)
  for name, a in tensors.items():
    if not name.endswith(".lora_A.weight"):
      continue
    module = name[len(PEFT_PREFIX):-len(".lora_A.weight")]
    b = tensors[name.replace(".lora_A.", ".lora_B.")]
    w = out[module + ".weight"]
    out[module + ".weight"] = (w.double() + scale * (b.double() @ a.double())).to(w.dtype)
  return out


def normalize(pixels_uint8, vision_config: dict):
  """uint8 [..., 3] -> (x / 255 - mean) / std, float32."""
  torch = _torch()
  mean = torch.tensor(vision_config["pixel_mean"])
  std = torch.tensor(vision_config["pixel_std"])
  return (pixels_uint8.float() / 255.0 - mean) / std


def _layer_norm(x, w, name, eps):
  torch = _torch()
  return torch.nn.functional.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"],
                                        eps)


def _linear(x, w, name):
  return _torch().nn.functional.linear(x, w[name + ".weight"], w.get(name + ".bias"))


def attention(q, k, v, mask=None):
  """softmax(q k^T / sqrt(d)) v with kv heads shared by groups of query heads.

  q [B, H, S, d], k/v [B, Hkv, S, d], mask bool [B, S, S] (True = may attend) or None.
  """
  torch = _torch()
  group = q.shape[1] // k.shape[1]
  k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
  scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
  if mask is not None:
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
  return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def _heads(x, num_heads):
  """[B, S, H*d] -> [B, H, S, d]."""
  return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def _merge(x):
  """[B, H, S, d] -> [B, S, H*d]."""
  return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def clip_hidden(w: dict, v: dict, pixels):
  """HF CLIPVisionModel hidden_states[feature_layer]: pixels [N, H, W, 3] -> [N, P+1, W]."""
  torch = _torch()
  eps = v["layer_norm_eps"]
  x = torch.nn.functional.conv2d(pixels.permute(0, 3, 1, 2),
                                 w[_CLIP + "embeddings.patch_embedding.weight"],
                                 stride=v["patch_size"])
  x = x.flatten(2).transpose(1, 2)  # [N, P, W], patches row-major
  cls = w[_CLIP + "embeddings.class_embedding"].expand(x.shape[0], 1, -1)
  x = torch.cat([cls, x], dim=1) + w[_CLIP + "embeddings.position_embedding.weight"]
  x = _layer_norm(x, w, _CLIP + "pre_layrnorm", eps)
  layers = v["feature_layer"] if v["feature_layer"] >= 0 else (
      v["num_layers"] + 1 + v["feature_layer"])
  for i in range(layers):
    p = f"{_CLIP}encoder.layers.{i}."
    h = _layer_norm(x, w, p + "layer_norm1", eps)
    q, k, val = (_heads(_linear(h, w, p + f"self_attn.{n}"), v["num_heads"])
                 for n in ("q_proj", "k_proj", "v_proj"))
    x = x + _linear(_merge(attention(q, k, val)), w, p + "self_attn.out_proj")
    h = _layer_norm(x, w, p + "layer_norm2", eps)
    h = _linear(h, w, p + "mlp.fc1")
    if v["hidden_act"] == "quick_gelu":
      h = h * torch.sigmoid(1.702 * h)
    else:
      h = torch.nn.functional.gelu(h)
    x = x + _linear(h, w, p + "mlp.fc2")
  return x


def project(w: dict, x):
  """Projector: linear_1, or linear_1 -> exact GELU -> linear_2."""
  torch = _torch()
  x = _linear(x, w, "linear_1")
  if "linear_2.weight" in w:
    x = _linear(torch.nn.functional.gelu(x), w, "linear_2")
  return x


def build_video_tokens(cls, patches, grid: int):
  """cls [B, T, D], patches [B, T, grid^2, D] -> (temporal [B, 3T-1, D], spatial [B, grid^2, D])."""
  torch = _torch()
  batch, num_frames, _, dim = patches.shape
  means = patches.mean(dim=2)
  temporal = torch.cat([cls, means, means[:, 1:] - means[:, :-1]], dim=1)
  segments = np.array_split(np.arange(num_frames), layout.NUM_SEGMENTS)
  pooled = []
  for seg in segments:
    avg = patches[:, seg[0]:seg[-1] + 1].mean(dim=1)  # [B, P, D]
    avg = avg.reshape(batch, grid // 2, 2, grid // 2, 2, dim).mean(dim=(2, 4))
    pooled.append(avg.reshape(batch, -1, dim))
  return temporal, torch.cat(pooled, dim=1)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None):
  """float32 [head_dim/2]: theta^(-2k/d) with LLaMA's linear / llama3 rope_scaling."""
  torch = _torch()
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
  if kind == "linear":
    inv = inv / scaling["factor"]
  elif kind == "llama3":
    factor, old = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    inv = np.where(wavelen > old / low, inv / factor,
                   np.where(wavelen < old / high, inv, (1 - smooth) * inv / factor + smooth * inv))
  elif kind != "default":
    raise ValueError(f"rope_scaling type {kind!r} is not supported")
  return torch.from_numpy(inv.astype(np.float32))


def _rotate_half(x):
  half = x.shape[-1] // 2
  return _torch().cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_cos_sin(ids, c: dict):
  """ids int [B, 2, S] -> cos, sin [B, 1, S, d]: pair k takes ids row k % 2."""
  torch = _torch()
  head_dim = c["head_dim"] or c["hidden_size"] // c["num_heads"]
  scaling = dict(c["rope_scaling"]) if c["rope_scaling"] else None
  inv = inverse_frequencies(head_dim, c["rope_theta"], scaling)
  rows = torch.arange(head_dim // 2) % 2
  angles = ids[:, rows, :].float().transpose(1, 2) * inv  # [B, S, d/2]
  angles = torch.cat([angles, angles], dim=-1)[:, None]
  return angles.cos(), angles.sin()


def _rms_norm(x, weight, eps):
  torch = _torch()
  xf = x.float()
  xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
  return weight * xf.to(x.dtype)


def llama_hidden(w: dict, c: dict, embeds, ids, mask):
  """LLaMA decoder: embeds [B, S, D], ids int [B, 2, S], mask bool [B, S, S] -> normed [B, S, D]."""
  torch = _torch()
  cos, sin = rotary_cos_sin(ids, c)
  rotate = lambda x: (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)
  h = embeds
  for i in range(c["num_layers"]):
    p = f"model.layers.{i}."
    x = _rms_norm(h, w[p + "input_layernorm.weight"], c["rms_norm_eps"])
    q = rotate(_heads(_linear(x, w, p + "self_attn.q_proj"), c["num_heads"]))
    k = rotate(_heads(_linear(x, w, p + "self_attn.k_proj"), c["num_kv_heads"]))
    v = _heads(_linear(x, w, p + "self_attn.v_proj"), c["num_kv_heads"])
    h = h + _linear(_merge(attention(q, k, v, mask)), w, p + "self_attn.o_proj")
    x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
    gate = torch.nn.functional.silu(_linear(x, w, p + "mlp.gate_proj"))
    h = h + _linear(gate * _linear(x, w, p + "mlp.up_proj"), w, p + "mlp.down_proj")
  return _rms_norm(h, w["model.norm.weight"], c["rms_norm_eps"])


def lm_head(w: dict, c: dict, hidden):
  """[B, S, D] -> float32 logits [B, S, vocab] (tied: the embedding matrix)."""
  head = w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]
  return (hidden @ head.T).float()
