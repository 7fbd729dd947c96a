"""RVE, relation-aware visual enhancement (papers/rve-action-relation-enhancement.txt):
the Action Relation Score of each attention head, the head sets, the target mask and the
enhanced attention logits; and the heads file that carries them from ``mashvlm
rve-heads`` to inference (docs/design.md, "RVE").

Notation (decided readings). W: the attention of the last token (the one whose logits are
read) over all keys, after softmax, not renormalised; A: W at the visual keys (all M+N
video tokens, or one block: ``VISUAL``); S: the same row's scaled logits q.k/sqrt(d) at the
visual keys.
- ARS(l, h) = ||A - Â|| / (½(||A|| + ||Â||)), Â from the same video with the verb swapped,
  per pair and then averaged over pairs, per query head.
- H_sens / H_non: the top-K / bottom-K heads of a layer by ARS (2K <= heads).
- m = floor(alpha * N_visual); M_enh[i] = mean over H_sens of S[i] >= its m-th largest
  value, M_den likewise over H_non; M_target = M_enh & ~M_den (M_enh without denoise).
- S~ = S + beta * |S| at M_target, for every head of an enhanced layer ("global") or only
  the H_sens heads ("sensitive"), at visual keys the row may attend; then the softmax.

Every function here is pure and takes numpy arrays (numpy out) or jax arrays / tracers
(jax out), like layout.py. ``RveConfig`` is the static (hashable) description a model
takes as a module field; ``enhance_attention_logits`` is what the dense attention path
calls (model/attention.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from typing import Sequence

import numpy as np

VISUAL = ("all", "spatial", "temporal")  # which video tokens are the visual keys
SCOPES = ("global", "sensitive")
LAYER_RULES = ("middle", "auto")
HEADS_FORMAT = "mashvlm-rve-heads/1"
DEFAULT_ALPHA = 0.05
DEFAULT_BETA = 1.0

# The contrast verb of each synthetic action (data/synthetic.py trajectories): one whose
# motion differs from it (direction, speed or shape of the path).
CONTRAST_ACTION = {
    "skiing": "climbing",  # diagonal descent vs steady ascent
    "boxing": "walking",  # jabs on the spot vs slow horizontal travel
    "jumping": "running",  # vertical bounce vs fast horizontal travel
    "swimming": "falling",  # horizontal glide on a wave vs accelerating drop
    "running": "jumping",
    "climbing": "skiing",
    "walking": "boxing",
    "falling": "swimming",
}


def _xp(x):
  """numpy for numpy (and Python) input, jax.numpy for jax arrays and tracers."""
  if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
    return np
  import jax.numpy as jnp  # local: keep this module importable without jax
  return jnp


# ------------------------------------------------------------------------------ scores

def ars(a, a_hat):
  """Action Relation Score over the last axis: ||a - â|| / (½(||a|| + ||â||)).

  a, a_hat: [..., V] attention weights of one head at the visual keys (same shape).
  Returns [...]: 0 for identical rows, sqrt(2) for disjoint rows of equal norm, 0 where
  both rows are zero."""
  xp = _xp(a)
  a, a_hat = xp.asarray(a), xp.asarray(a_hat)
  if a.shape != a_hat.shape:
    raise ValueError(f"ARS needs rows of one shape, found {a.shape} and {a_hat.shape}")
  norm = lambda x: xp.sqrt(xp.sum(x * x, axis=-1))  # noqa: E731
  num = norm(a - a_hat)
  den = 0.5 * (norm(a) + norm(a_hat))
  return xp.where(den > 0, num / xp.where(den > 0, den, 1), 0)


def select_heads(ars_table, k: int):
  """(sensitive int[L, k], insensitive int[L, k]) from ARS [L, H]: each layer's top-k
  heads by ARS (highest first) and bottom-k (lowest first). Both come from one stable
  ordering of the heads, so the sets are disjoint even where scores tie (2k <= H)."""
  xp = _xp(ars_table)
  ars_table = xp.asarray(ars_table)
  num_heads = ars_table.shape[-1]
  check_k(k, num_heads)
  if xp is np:
    order = np.argsort(-ars_table, axis=-1, kind="stable")
  else:
    order = xp.argsort(-ars_table, axis=-1, stable=True)
  return order[..., :k], order[..., ::-1][..., :k]


def check_k(k: int, num_heads: int) -> int:
  if not isinstance(k, (int, np.integer)) or k < 1 or 2 * k > num_heads:
    raise ValueError(f"K (heads per set) must be an integer with 1 <= K and 2K <= heads "
                     f"({num_heads}), found {k!r}")
  return int(k)


def default_k(num_heads: int) -> int:
  """The paper's K=5, scaled down for few heads: min(5, H // 4), at least 1 (tiny: 1)."""
  return max(1, min(5, num_heads // 4))


def middle_layers(num_layers: int) -> tuple[int, ...]:
  """The 0-based middle layers [floor(L/4), floor(3L/4))."""
  return tuple(range(num_layers // 4, (3 * num_layers) // 4))


def auto_layers(ars_table) -> tuple[int, ...]:
  """The ceil(L/2) layers with the highest mean ARS over heads, in layer order."""
  mean = np.asarray(ars_table, np.float64).mean(axis=-1)
  count = -(-len(mean) // 2)
  return tuple(sorted(int(i) for i in np.argsort(-mean, kind="stable")[:count]))


def num_selected(alpha: float, num_visual: int) -> int:
  """m = floor(alpha * N_visual) (1e-9 absorbs the rounding of decimal alphas)."""
  return math.floor(alpha * num_visual + 1e-9)


# ------------------------------------------------------------------------------ masks

def _top_m(values, m: int):
  """bool [..., V]: values >= their m-th largest value (ties may add more); m >= 1."""
  xp = _xp(values)
  tau = xp.sort(values, axis=-1)[..., -m][..., None]
  return values >= tau


def target_mask(scores, sens, non, m: int):
  """M_target bool [..., V] of scores [..., H, V] (one row's logits per head at the visual
  keys): the top-m visual keys of the mean over heads ``sens`` int[K] of the scores,
  minus the top-m of the mean over ``non`` int[K] (None: no denoising mask). m = 0: none."""
  xp = _xp(scores)
  num_visual = scores.shape[-1]
  if not 0 <= m <= num_visual:
    raise ValueError(f"m must be in [0, {num_visual}] (visual keys), found {m}")
  if m == 0:
    return xp.zeros(scores.shape[:-2] + scores.shape[-1:], bool)
  mean_over = lambda heads: xp.mean(xp.take(scores, heads, axis=-2), axis=-2)  # noqa: E731
  target = _top_m(mean_over(sens), m)
  if non is not None:
    target = target & ~_top_m(mean_over(non), m)
  return target


def enhance_logits(scores, target, beta: float, heads=None):
  """S + beta * |S| where ``target`` bool [..., V] is set, for scores [..., H, V]; only
  the heads where ``heads`` bool [H] is True (None: every head). Elsewhere S unchanged
  (a select, so untouched entries keep their exact bits)."""
  xp = _xp(scores)
  on = target[..., None, :]
  if heads is not None:
    on = on & xp.asarray(heads)[:, None]
  return xp.where(on, scores + beta * xp.abs(scores), scores)


# ------------------------------------------------------------------------------ the option

@dataclasses.dataclass(frozen=True)
class RveConfig:
  """What a model enhances: static and hashable (a module field, a jit cache key).

  sensitive / insensitive: [L][K] head indices per decoder layer (H_sens / H_non);
  layers: the enhanced layers (0-based); visual_keys: (start, stop) of the visual keys in
  every row (the video prefix, or one of its blocks); num_heads: query heads per layer.
  """
  sensitive: tuple
  insensitive: tuple
  layers: tuple
  visual_keys: tuple
  num_heads: int
  alpha: float = DEFAULT_ALPHA
  beta: float = DEFAULT_BETA
  scope: str = "global"
  denoise: bool = True

  def __post_init__(self):
    # tuples of ints whatever came in (lists, numpy): hashable, a valid static field
    as_tuple = lambda rows: tuple(tuple(int(h) for h in row) for row in rows)  # noqa: E731
    object.__setattr__(self, "sensitive", as_tuple(self.sensitive))
    object.__setattr__(self, "insensitive", as_tuple(self.insensitive))
    object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
    object.__setattr__(self, "visual_keys", tuple(int(k) for k in self.visual_keys))
    sens, non = np.asarray(self.sensitive), np.asarray(self.insensitive)
    if sens.ndim != 2 or sens.shape != non.shape:
      raise ValueError(f"sensitive and insensitive heads must both be [layers][K], found "
                       f"shapes {sens.shape} and {non.shape}")
    check_k(sens.shape[1], self.num_heads)
    for name, table in (("sensitive", sens), ("insensitive", non)):
      if table.size and (table.min() < 0 or table.max() >= self.num_heads):
        raise ValueError(f"{name} heads must be in [0, {self.num_heads}), found "
                         f"{sorted(set(table.ravel().tolist()))}")
    bad = [l for l in self.layers if not 0 <= l < sens.shape[0]]
    if bad:
      raise ValueError(f"enhanced layers must be in [0, {sens.shape[0]}), found {bad}")
    start, stop = self.visual_keys
    if not 0 <= start < stop:
      raise ValueError(f"visual_keys must be (start, stop) with 0 <= start < stop, found "
                       f"{self.visual_keys}")
    if not 0 <= self.alpha <= 1:
      raise ValueError(f"alpha must be in [0, 1], found {self.alpha}")
    if self.beta < 0:
      raise ValueError(f"beta must be >= 0, found {self.beta}")
    if self.scope not in SCOPES:
      raise ValueError(f"scope must be one of {SCOPES}, found {self.scope!r}")

  @property
  def num_layers(self) -> int:
    return len(self.sensitive)

  @property
  def num_visual(self) -> int:
    return self.visual_keys[1] - self.visual_keys[0]

  @property
  def m(self) -> int:
    return num_selected(self.alpha, self.num_visual)

  def check_model(self, model_cfg) -> "RveConfig":
    """ValueError unless this fits ``model_cfg`` (layers, heads, video tokens)."""
    found = (self.num_layers, self.num_heads)
    want = (model_cfg.llm.num_layers, model_cfg.llm.num_heads)
    if found != want:
      raise ValueError(f"RVE heads are for {found[0]} layers x {found[1]} heads, the model "
                       f"has {want[0]} x {want[1]}")
    if self.visual_keys[1] > sum(model_cfg.video_token_counts):
      raise ValueError(f"RVE visual keys {self.visual_keys} reach past the model's "
                       f"{sum(model_cfg.video_token_counts)} video tokens")
    return self

  def layer_tables(self, layer):
    """(sens int[K], non int[K] or None, heads bool[H] or None, active) of ``layer``: a
    Python int (numpy values, ``active`` a bool) or a traced int32 scalar inside a layer
    scan (jax values)."""
    sens = np.asarray(self.sensitive, np.int32)
    non = np.asarray(self.insensitive, np.int32)
    active = np.isin(np.arange(self.num_layers), self.layers)
    heads = np.zeros((self.num_layers, self.num_heads), bool)
    np.put_along_axis(heads, sens, True, axis=1)
    if isinstance(layer, (int, np.integer)):
      pick = lambda table: table[layer]  # noqa: E731
      active = bool(active[layer])
    else:
      import jax.numpy as jnp
      pick = lambda table: jnp.asarray(table)[layer]  # noqa: E731
      active = pick(active)
    return (pick(sens), pick(non) if self.denoise else None,
            pick(heads) if self.scope == "sensitive" else None, active)

  def describe(self) -> dict:
    """The settings as plain JSON (results, output-directory records)."""
    return {"layers": list(self.layers), "k": len(self.sensitive[0]),
            "sensitive": [list(h) for h in self.sensitive],
            "insensitive": [list(h) for h in self.insensitive],
            "visual_keys": list(self.visual_keys), "alpha": self.alpha, "beta": self.beta,
            "m": self.m, "scope": self.scope, "denoise": self.denoise}

  def tag(self) -> str:
    """8 hex digits naming these settings (default output directories)."""
    text = json.dumps(self.describe(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def enhance_attention_logits(logits, visible, rows, layer, config: RveConfig):
  """RVE on masked attention logits (model/attention.py, the dense path).

  Args:
    logits: float32 [B, H, Sq, Sk], scaled q.k with hidden keys at a large negative value.
    visible: bool [B, Sq, Sk] or [Sq, Sk] (True = the row may attend the key) or None.
    rows: bool [B, Sq], the query rows to enhance (last-token rows).
    layer: this layer's index (int, or a traced scalar in a layer scan).
  Returns logits with S~ at the enhanced rows' visual keys; every other entry unchanged.
  The masks come from these (unenhanced) logits, per row.
  """
  sens, non, heads, active = config.layer_tables(layer)
  if active is False:
    return logits
  xp = _xp(logits)
  start, stop = config.visual_keys
  scores = xp.swapaxes(logits[..., start:stop], 1, 2)  # [B, Sq, H, V]
  target = target_mask(scores, sens, non, config.m) & rows[..., None]
  if visible is not None:
    target = target & visible[..., start:stop]
  if active is not True:
    target = target & active
  enhanced = xp.swapaxes(enhance_logits(scores, target, config.beta, heads), 1, 2)
  return xp.concatenate([logits[..., :start], enhanced, logits[..., stop:]], axis=-1)


def last_token_rows(text_mask):
  """bool [B, L]: each row's last real text token (``text_mask`` bool [B, L])."""
  xp = _xp(text_mask)
  pos = xp.arange(text_mask.shape[-1])
  last = xp.max(xp.where(text_mask, pos, -1), axis=-1)
  return pos == last[..., None]


def rows_from(text_mask, start):
  """bool [B, L]: the real text tokens at index >= ``start`` int[B] (the rows whose logits
  generation reads: the last prompt token and every token after it)."""
  xp = _xp(text_mask)
  pos = xp.arange(text_mask.shape[-1])
  return text_mask & (pos >= xp.asarray(start)[..., None])


# ------------------------------------------------------------------------------ heads file

def visual_keys(model_cfg, visual: str = "all") -> tuple[int, int]:
  """(start, stop) of the visual keys: all M+N video tokens, the temporal block [0, M) or
  the spatial block [M, M+N)."""
  if visual not in VISUAL:
    raise ValueError(f"visual must be one of {VISUAL}, found {visual!r}")
  m, n = model_cfg.video_token_counts
  return {"all": (0, m + n), "temporal": (0, m), "spatial": (m, m + n)}[visual]


def model_config_hash(model_cfg) -> str:
  """16 hex digits of the fields that decide what a checkpoint computes
  (params_io.MODEL_KEYS: layout, mask, towers), not dtype or backend."""
  from mashvlm_jax.convert import params_io
  d = model_cfg.to_dict()
  text = json.dumps({k: d[k] for k in params_io.MODEL_KEYS}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_layers(spec, ars_table) -> tuple[int, ...]:
  """Enhanced layers from "middle", "auto" or comma-separated 0-based indices (or a
  sequence of ints), checked against the ARS table's layer count."""
  num_layers = len(ars_table)
  if isinstance(spec, str):
    spec = spec.strip()
    if spec == "middle":
      return middle_layers(num_layers)
    if spec == "auto":
      return auto_layers(ars_table)
    try:
      spec = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
      raise ValueError(f"RVE layers must be 'middle', 'auto' or comma-separated layer "
                       f"indices, found {spec!r}") from None
  layers = tuple(sorted({int(l) for l in spec}))
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad:
    raise ValueError(f"RVE layers must be in [0, {num_layers}), found {bad}")
  return layers


def heads_record(ars_table, model_cfg, *, k: int, layers, pairs: Sequence[dict],
                 visual: str = "all", **extra) -> dict:
  """The heads file's content: the ARS table [L][H], K, the chosen heads per layer, the
  enhanced layers, the pairs used ({"clip", "verb", "swap"}), the visual keys and the
  model config hash; ``extra`` (checkpoint, step, ...) is recorded as is."""
  table = np.asarray(ars_table, np.float64)
  sens, non = select_heads(table, k)
  return {"format": HEADS_FORMAT, "model_config_hash": model_config_hash(model_cfg),
          "num_layers": int(table.shape[0]), "num_heads": int(table.shape[1]),
          "visual": visual, "ars": table.tolist(), "k": int(k),
          "sensitive": sens.tolist(), "insensitive": non.tolist(),
          "layers": list(parse_layers(layers, table)), "pairs": list(pairs), **extra}


def write_heads(path, record: dict) -> pathlib.Path:
  """Writes ``record`` as indented JSON with each list of numbers on one line (the ARS
  table reads one layer per line)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = re.sub(r"\[([^\[\]{}\"]*)\]",
                lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
                json.dumps(record, indent=1))
  path.write_text(text + "\n")
  return path


def read_heads(path, model_cfg) -> dict:
  """A heads file, checked against ``model_cfg``: format, config hash, the ARS table's
  shape [layers][heads] and the chosen heads' shape. Errors name the file, the field and
  what was expected and found."""
  path = pathlib.Path(path)
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"RVE heads file {path} does not exist (write it with "
                            f"`mashvlm rve-heads`)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  def need(ok, field, expected, found):
    if not ok:
      raise ValueError(f"{path}: field {field!r} should be {expected}, found {found}")
  need(isinstance(record, dict) and record.get("format") == HEADS_FORMAT, "format",
       repr(HEADS_FORMAT), record.get("format") if isinstance(record, dict) else record)
  want = model_config_hash(model_cfg)
  need(record.get("model_config_hash") == want, "model_config_hash",
       f"{want} (the model of --config)",
       f"{record.get('model_config_hash')}: the heads were scored on another model")
  layers, heads = model_cfg.llm.num_layers, model_cfg.llm.num_heads
  try:
    shape = list(np.asarray(record.get("ars"), np.float64).shape)
  except (TypeError, ValueError):
    shape = "a ragged or non-numeric table"
  need(shape == [layers, heads], "ars", f"[{layers} layers][{heads} heads] of numbers", shape)
  k = record.get("k")
  need(isinstance(k, int) and 1 <= k and 2 * k <= heads, "k",
       f"an integer in [1, {heads // 2}]", k)
  for field in ("sensitive", "insensitive"):
    try:
      chosen = np.asarray(record.get(field), np.int64)
    except (TypeError, ValueError):
      chosen = np.zeros((0,), np.int64)
    need(chosen.shape == (layers, k), field, f"[{layers} layers][K={k}] head indices",
         list(chosen.shape))
    need(chosen.min() >= 0 and chosen.max() < heads, field, f"head indices in [0, {heads})",
         sorted(set(chosen.ravel().tolist())))
  need(record.get("visual") in VISUAL, "visual", f"one of {VISUAL}", record.get("visual"))
  need(isinstance(record.get("layers"), list), "layers", "a list of layer indices",
       record.get("layers"))
  return record


def config_from_heads(record: dict, model_cfg, *, k: int | None = None,
                      alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                      layers=None, scope: str = "global", denoise: bool = True) -> RveConfig:
  """The RveConfig of a heads record (``read_heads``) with overrides: ``k`` re-selects the
  heads from the ARS table (default: the file's chosen heads), ``layers`` ("middle",
  "auto", indices; default: the file's)."""
  table = np.asarray(record["ars"], np.float64)
  if k is None:
    sens, non = record["sensitive"], record["insensitive"]
  else:
    sens, non = (x.tolist() for x in select_heads(table, check_k(k, table.shape[1])))
  chosen = parse_layers(record["layers"] if layers is None else layers, table)
  return RveConfig(
      sensitive=sens, insensitive=non,
      layers=chosen, visual_keys=visual_keys(model_cfg, record["visual"]),
      num_heads=int(table.shape[1]), alpha=float(alpha), beta=float(beta), scope=scope,
      denoise=bool(denoise)).check_model(model_cfg)


def load(path, model_cfg, **overrides) -> RveConfig:
  """``config_from_heads(read_heads(path, model_cfg), model_cfg, **overrides)``."""
  return config_from_heads(read_heads(path, model_cfg), model_cfg, **overrides)


def file_digest(path) -> str:
  """16 hex digits of a file's bytes (which heads file an evaluation used)."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]
