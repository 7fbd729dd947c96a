"""Optimizer: AdamW with warmup + cosine decay, global-norm clipping, per-parameter
freezing and learning-rate multipliers by regex over parameter paths.

Paths are "/"-joined names, e.g. ``vision_tower/layers/fc1/kernel``. Rules (config.optim):
  freeze: list of regexes; matching parameters get zero updates and no optimizer state
    (the vision tower by default, as in the paper);
  lr_multipliers: {regex: factor}; first match wins, default 1.0;
  no_decay: regex of parameters without weight decay (norms and biases).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

FROZEN = "frozen"


def path_names(tree) -> Any:
  """Tree of "/"-joined key paths, same structure as ``tree``."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def _search(patterns, name) -> bool:
  return any(re.search(p, name) for p in patterns)


def param_labels(params, optim: Mapping[str, Any]):
  """Tree of labels: "frozen" or "lr_<factor>" per parameter."""
  freeze = list(optim.get("freeze", ()))
  multipliers = dict(optim.get("lr_multipliers", {}) or {})

  def label(name):
    if _search(freeze, name):
      return FROZEN
    for pattern, factor in multipliers.items():
      if re.search(pattern, name):
        return f"lr_{float(factor)}"
    return "lr_1.0"
  return jax.tree_util.tree_map(label, path_names(params))


# With LoRA on (model.lora.rank > 0): every decoder parameter except the adapters
# (``<projection>_lora/lora_a|lora_b``, model/llm.py) is frozen.
LORA_BASE_WEIGHTS = r"^language_model/(?!.*_lora/lora_[ab]$)"


def lora_freeze(lora_enabled: bool) -> list[str]:
  """The freeze regexes LoRA adds: the decoder's base weights, or none when it is off."""
  return [LORA_BASE_WEIGHTS] if lora_enabled else []


def learning_rate_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine to ``lr * final_lr_ratio``."""
  lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=lr * float(optim["final_lr_ratio"]))


def make_optimizer(params, optim: Mapping[str, Any], total_steps: int):
  """(optax transform, schedule). Frozen gradients are zeroed before clipping, so the
  clip norm and the logged grad norm count trainable parameters only."""
  labels = param_labels(params, optim)
  schedule = learning_rate_schedule(optim, total_steps)
  no_decay = optim.get("no_decay", r"(norm|bias)")
  # A callable mask: inside multi_transform each group sees other groups' leaves as
  # empty MaskedNodes, and the mask must mirror that structure.
  decay_mask = lambda tree: jax.tree_util.tree_map(
      lambda n: not re.search(no_decay, n), path_names(tree))
  groups = {}
  for label in set(jax.tree_util.tree_leaves(labels)):
    if label == FROZEN:
      groups[label] = optax.set_to_zero()
      continue
    factor = float(label[3:])
    groups[label] = optax.adamw(lambda step, f=factor: schedule(step) * f,
                                b1=float(optim["b1"]), b2=float(optim["b2"]),
                                eps=float(optim["eps"]),
                                weight_decay=float(optim["weight_decay"]), mask=decay_mask)
  frozen_mask = jax.tree_util.tree_map(lambda l: l == FROZEN, labels)
  tx = optax.chain(
      optax.masked(optax.set_to_zero(), frozen_mask),
      optax.clip_by_global_norm(float(optim["clip_norm"])),
      optax.multi_transform(groups, labels),
  )
  return tx, schedule


def trainable_mask(params, optim: Mapping[str, Any]):
  """True for parameters the optimizer updates."""
  return jax.tree_util.tree_map(lambda l: l != FROZEN, param_labels(params, optim))
