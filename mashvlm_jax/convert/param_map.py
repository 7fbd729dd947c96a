"""The one parameter-name table between HuggingFace checkpoints and mashvlm_jax params.

Each ``Entry`` pairs a HuggingFace tensor name (``{i}`` stands for the layer index) with a
path in the unboxed params tree of one tower and a ``Layout``: a pair of inverse array
transforms. Import applies ``Layout.to_jax``, export ``Layout.to_hf``; nothing else in the
package knows a HuggingFace name. ``plan`` expands the table against a tower's parameter
shapes into one ``Tensor`` per HuggingFace tensor, and refuses a tree that has a leaf the
table does not cover.

Towers and their HuggingFace models:
  language_model  LlamaForCausalLM  (model.*, lm_head.weight)
  vision_tower    CLIPVisionModel   (vision_model.*; also the vision part of a CLIPModel)
  projector       mashvlm's projector.safetensors (linear_1.*, linear_2.*)
  action_token    mashvlm's action_token.safetensors (embedding, {verb,noun,action}_head
                  .weight), only in models with model.action_token.enabled

Layer-stacked leaves (``layers`` under nn.scan) have a leading layer axis L; the table's
per-layer shapes drop it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np

Shape = tuple[int, ...]


class ConversionError(ValueError):
  """A checkpoint, config or table problem, found before anything is written."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """Inverse transforms between a HF tensor and one (per-layer) params leaf.

  to_jax(hf_array, jax_shape) -> jax array; to_hf(jax_array) -> hf array;
  hf_shape(jax_shape) -> the HF shape that corresponds to ``jax_shape``.
  """
  name: str
  to_jax: Callable[[np.ndarray, Shape], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  hf_shape: Callable[[Shape], Shape]


# torch nn.Linear stores [out, in]; flax Dense kernels are [in, out].
COPY = Layout("copy", lambda w, s: w, lambda x: x, lambda s: tuple(s))
LINEAR = Layout("linear", lambda w, s: w.T, lambda x: x.T, lambda s: tuple(s[::-1]))
# q/k/v: torch [heads*head_dim, D] <-> flax DenseGeneral kernel [D, heads, head_dim].
HEADS_IN = Layout("heads_in", lambda w, s: w.T.reshape(s),
                  lambda x: x.reshape(x.shape[0], -1).T, lambda s: (s[1] * s[2], s[0]))
# o_proj/out_proj: torch [D, heads*head_dim] <-> flax kernel [heads, head_dim, D].
HEADS_OUT = Layout("heads_out", lambda w, s: w.T.reshape(s),
                   lambda x: x.reshape(-1, x.shape[-1]).T, lambda s: (s[2], s[0] * s[1]))
# q/k/v biases: torch [heads*head_dim] <-> flax [heads, head_dim].
FLAT = Layout("flat", lambda w, s: w.reshape(s), lambda x: x.reshape(-1),
              lambda s: (math.prod(s),))
# patch conv: torch OIHW [W, 3, p, p] <-> flax HWIO [p, p, 3, W].
CONV = Layout("conv", lambda w, s: w.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1),
              lambda s: (s[3], s[2], s[0], s[1]))


@dataclasses.dataclass(frozen=True)
class Entry:
  hf: str  # HF name relative to the tower's prefix; "{i}" = layer index
  path: tuple[str, ...]  # path inside the tower's params
  layout: Layout

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


def _entries(rows) -> tuple[Entry, ...]:
  return tuple(Entry(hf, tuple(path.split("/")), layout) for hf, path, layout in rows)


def _dense(hf: str, path: str, weight: Layout, bias: Layout = COPY):
  return [(f"{hf}.weight", f"{path}/kernel", weight), (f"{hf}.bias", f"{path}/bias", bias)]


def _norm(hf: str, path: str, bias: bool):
  rows = [(f"{hf}.weight", f"{path}/scale", COPY)]
  return rows + ([(f"{hf}.bias", f"{path}/bias", COPY)] if bias else [])


_LLAMA_LAYER = "model.layers.{i}"
LLAMA = _entries(
    [("model.embed_tokens.weight", "embed_tokens/embedding", COPY)]
    + _norm(f"{_LLAMA_LAYER}.input_layernorm", "layers/input_layernorm", bias=False)
    + _norm(f"{_LLAMA_LAYER}.post_attention_layernorm", "layers/post_attention_layernorm",
            bias=False)
    + [row for name in ("q_proj", "k_proj", "v_proj")
       for row in _dense(f"{_LLAMA_LAYER}.self_attn.{name}", f"layers/self_attn/{name}",
                         HEADS_IN, FLAT)]
    + _dense(f"{_LLAMA_LAYER}.self_attn.o_proj", "layers/self_attn/o_proj", HEADS_OUT)
    + [row for name in ("gate_proj", "up_proj", "down_proj")
       for row in _dense(f"{_LLAMA_LAYER}.mlp.{name}", f"layers/mlp/{name}", LINEAR)]
    + _norm("model.norm", "norm", bias=False)
    + [("lm_head.weight", "lm_head/kernel", LINEAR)])

_CLIP_LAYER = "encoder.layers.{i}"
CLIP_VISION = _entries(
    [("embeddings.class_embedding", "class_embedding", COPY),
     ("embeddings.patch_embedding.weight", "patch_embedding/kernel", CONV),
     ("embeddings.position_embedding.weight", "position_embedding", COPY)]
    + _norm("pre_layrnorm", "pre_layrnorm", bias=True)  # sic: HF's name
    + _norm(f"{_CLIP_LAYER}.layer_norm1", "layers/layer_norm1", bias=True)
    + _norm(f"{_CLIP_LAYER}.layer_norm2", "layers/layer_norm2", bias=True)
    + [row for name in ("q_proj", "k_proj", "v_proj")
       for row in _dense(f"{_CLIP_LAYER}.self_attn.{name}", f"layers/{name}", HEADS_IN, FLAT)]
    + _dense(f"{_CLIP_LAYER}.self_attn.out_proj", "layers/out_proj", HEADS_OUT)
    + _dense(f"{_CLIP_LAYER}.mlp.fc1", "layers/fc1", LINEAR)
    + _dense(f"{_CLIP_LAYER}.mlp.fc2", "layers/fc2", LINEAR)
    + _norm("post_layernorm", "post_layernorm", bias=True))

PROJECTOR = _entries(_dense("linear_1", "linear_1", LINEAR)
                     + _dense("linear_2", "linear_2", LINEAR))

# LLaVAction's action token (model/action_token.py): the embedding and bias-free heads.
ACTION_TOKEN = _entries([("embedding", "embedding", COPY)]
                        + [(f"{head}_head.weight", f"{head}_head/kernel", LINEAR)
                           for head in ("verb", "noun", "action")])


@dataclasses.dataclass(frozen=True)
class Tower:
  """A tower's table and the prefix its names carry in an exported checkpoint."""
  name: str
  entries: tuple[Entry, ...]
  prefix: str  # written on export; import also accepts ``alt_prefixes``
  alt_prefixes: tuple[str, ...] = ()
  # HF buffers that are not parameters (older checkpoints store them): skipped on import.
  buffers: tuple[str, ...] = ()
  optional: bool = False  # only some models have it (``present_towers``)


TOWERS = {
    "language_model": Tower("language_model", LLAMA, "",
                            buffers=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)),
    # transformers < 5 and every CLIPModel name the vision weights "vision_model.*"; a
    # CLIPVisionModel saved by transformers >= 5 drops the prefix.
    "vision_tower": Tower("vision_tower", CLIP_VISION, "vision_model.", alt_prefixes=("",),
                          buffers=(r"embeddings\.position_ids",)),
    # HF LLaVA names the projector "multi_modal_projector.linear_{1,2}.*".
    "projector": Tower("projector", PROJECTOR, "", alt_prefixes=("multi_modal_projector.",)),
    "action_token": Tower("action_token", ACTION_TOKEN, "", optional=True),
}


def present_towers(params: Mapping) -> list[str]:
  """The towers of TOWERS a params tree has: every required one, the optional ones it
  holds (ConversionError naming a missing required tower)."""
  missing = [name for name, tower in TOWERS.items() if not tower.optional and name not in params]
  if missing:
    raise ConversionError(f"params lack the tower(s) {missing}")
  return [name for name in TOWERS if name in params]


# LoRA adapters of the decoder (model/llm.py: a ``<name>_lora`` module beside each targeted
# projection, ``lora_a`` [*in, rank] and ``lora_b`` [rank, *out]) <-> the tensors of a PEFT
# adapter of LlamaForCausalLM (``lora_A.weight`` [rank, in], ``lora_B.weight`` [out, rank],
# named under PEFT's ``base_model.model.`` prefix). Not in TOWERS: export-torch writes it
# as a separate adapter directory (torch_export.py).
LORA_SUFFIX = "_lora"
_LORA_LAYOUTS = {  # projection: (module, lora_A layout, lora_B layout)
    "q_proj": ("self_attn", LINEAR, HEADS_IN), "k_proj": ("self_attn", LINEAR, HEADS_IN),
    "v_proj": ("self_attn", LINEAR, HEADS_IN), "o_proj": ("self_attn", HEADS_OUT, LINEAR),
    "gate_proj": ("mlp", LINEAR, LINEAR), "up_proj": ("mlp", LINEAR, LINEAR),
    "down_proj": ("mlp", LINEAR, LINEAR)}
LLAMA_LORA = _entries(
    [(f"{_LLAMA_LAYER}.{part}.{name}.lora_{ab.upper()}.weight",
      f"layers/{part}/{name}{LORA_SUFFIX}/lora_{ab}", layout)
     for name, (part, a_layout, b_layout) in _LORA_LAYOUTS.items()
     for ab, layout in (("a", a_layout), ("b", b_layout))])
LORA_TOWER = Tower("language_model_lora", LLAMA_LORA, "base_model.model.")


def split_lora(tree: Mapping) -> tuple[dict, dict]:
  """(base, adapters) of a decoder params tree: the ``*_lora`` modules go to adapters
  (same nesting), everything else to base. Leaves are not copied."""
  base, adapters = {}, {}
  for path, leaf in leaves(tree).items():
    is_lora = any(key.endswith(LORA_SUFFIX) for key in path)
    set_path(adapters if is_lora else base, path, leaf)
  return base, adapters


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HuggingFace tensor of a tower: its name, where it lives in params, shapes."""
  hf: str  # full name without the tower prefix
  path: tuple[str, ...]
  layer: int | None  # index on the stacked layer axis, None for unstacked leaves
  layout: Layout
  jax_shape: Shape  # per-layer shape (the leaf shape without the layer axis)

  @property
  def hf_shape(self) -> Shape:
    return self.layout.hf_shape(self.jax_shape)

  def to_jax(self, hf_array: np.ndarray) -> np.ndarray:
    return self.layout.to_jax(hf_array, self.jax_shape)

  def to_hf(self, jax_array: np.ndarray) -> np.ndarray:
    return self.layout.to_hf(jax_array)


def leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  """{path: leaf} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(leaves(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def get_path(tree: Mapping, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def plan(tower: "str | Tower", shapes: Mapping) -> list[Tensor]:
  """Every HF tensor of ``tower`` given its params shapes (a tree of anything with .shape).

  Table entries whose path is absent from the tree are skipped (biases of a bias-free
  model, lm_head under tied embeddings, linear_2 of a linear projector). A leaf no entry
  covers is a ConversionError: the table does not know that architecture.
  """
  tower = tower if isinstance(tower, Tower) else TOWERS[tower]
  table, tower = tower.entries, tower.name
  tree_leaves = leaves(shapes)
  covered = {e.path for e in table}
  unknown = sorted("/".join(p) for p in tree_leaves if p not in covered)
  if unknown:
    raise ConversionError(f"{tower} parameters not covered by the conversion table "
                          f"(convert/param_map.py): {', '.join(unknown)}")
  out = []
  for entry in table:
    if entry.path not in tree_leaves:
      continue
    shape = tuple(tree_leaves[entry.path].shape)
    if entry.per_layer:
      out += [Tensor(entry.hf.format(i=i), entry.path, i, entry.layout, shape[1:])
              for i in range(shape[0])]
    else:
      out.append(Tensor(entry.hf, entry.path, None, entry.layout, shape))
  return out
