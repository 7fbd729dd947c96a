"""Extra task families of the synthetic training split, and rows drawn afresh per visit.

``data.train_tasks`` names families (e.g. ("utr",)) whose rows the synthetic builder adds
to every training clip beside the ordinary mixture (train_mix.py). A family is a function
``rows(spec, rng, ctx) -> list[QA dict]`` registered here by its task module:

    @families.train_family("utr")
    def rows(spec, rng, ctx): ...

``ctx`` is a ``BuildContext`` (the stored frame count and size, the data seed, the
ordinary rows' negatives, the build's config). The pipeline samples one row per visit
(``data.qa_mode="sample"``), so a family's share of the samples is its row count over
the clip's total.

A family may also draw its training clips otherwise (``@clip_renderer(name)``, e.g. held
still around the action for temporal detection); rows that read the ordinary render's
geometry (UTR boxes) refuse such families beside them.

A stored row whose ``task`` has a visit renderer is re-rendered at every visit with the
visit's rng (``render_visit``): options shuffled, words masked, drawn afresh each epoch
while the stored record stays fixed. The renderer must be a pure function of (row, rng),
and its task name must be its own: the ordinary rows' names ("caption", "action", ...)
are never re-rendered (tests/test_task_families.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

# family name -> rows(spec, rng, ctx) -> list of QA dicts.
TRAIN_FAMILIES: dict[str, Callable] = {}
# QA task name -> render(row, rng) -> row.
VISIT_RENDERERS: dict[str, Callable[[dict, np.random.Generator], dict]] = {}
# family name -> frames(spec, ctx) -> uint8 [T, S, S, 3] or None (the clip as usual).
CLIP_RENDERERS: dict[str, Callable] = {}


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a family may need beside the clip's spec: stored frames and size, data seed,
  the ordinary rows' negatives (data.train_negatives)."""
  num_frames: int
  size: int
  seed: int = 0
  train_negatives: str = "typical"
  # The build's builders.SyntheticConfig, for families that need the whole split (the
  # multiple-choice families fit a recognizer on it); None outside a build.
  config: object = None


def _register(table: dict, kind: str, name: str):
  def decorator(fn):
    if name in table and table[name] is not fn:
      raise ValueError(f"{kind} {name!r} is registered twice ({table[name].__module__} and "
                       f"{fn.__module__})")
    table[name] = fn
    return fn
  return decorator


def train_family(name: str):
  """Decorator: ``fn(spec, rng, ctx) -> list[dict]`` adds rows to training clips when
  ``name`` is in data.train_tasks."""
  return _register(TRAIN_FAMILIES, "training task family", name)


def visit_renderer(task: str):
  """Decorator: ``fn(row, rng) -> row`` re-renders stored rows of ``task`` at each visit."""
  return _register(VISIT_RENDERERS, "visit renderer", task)


def clip_renderer(name: str):
  """Decorator: ``fn(spec, ctx) -> frames or None`` renders the training clips family
  ``name`` needs drawn otherwise (e.g. held still around the action); None: as usual."""
  return _register(CLIP_RENDERERS, "clip renderer", name)


_loaded = []


def _load() -> None:
  """Imports every task module once, so each has registered its families and renderers."""
  if not _loaded:
    from mashvlm_jax.data.tasks import vocabulary
    vocabulary.task_modules()
    _loaded.append(True)


def check_train_tasks(names: Sequence[str]) -> tuple[str, ...]:
  """``names`` as a tuple; ValueError naming any family that is not registered or
  repeated."""
  _load()
  names = tuple(str(n) for n in names)
  unknown = [n for n in names if n not in TRAIN_FAMILIES]
  if unknown:
    raise ValueError(f"data.train_tasks names unknown task families {unknown}; known: "
                     f"{sorted(TRAIN_FAMILIES)}")
  if len(set(names)) != len(names):
    raise ValueError(f"data.train_tasks repeats a family: {list(names)}")
  return names


def family_rows(names: Sequence[str], spec, rng: np.random.Generator,
                ctx: BuildContext) -> list[dict]:
  """The rows of every family in ``names`` for one clip, in the order named."""
  out = []
  for name in check_train_tasks(names):
    out += TRAIN_FAMILIES[name](spec, rng, ctx)
  return out


def render_visit(row: dict, rng: np.random.Generator) -> dict:
  """``row`` as shown at this visit: its task's renderer applied, or unchanged."""
  _load()
  render = VISIT_RENDERERS.get(row["task"])
  return row if render is None else render(dict(row), rng)


def family_frames(names: Sequence[str], spec, ctx: BuildContext):
  """The frames of a training clip as the first family in ``names`` with a clip renderer
  draws them, or None when none does (the clip renders as usual)."""
  for name in check_train_tasks(names):
    render = CLIP_RENDERERS.get(name)
    frames = None if render is None else render(spec, ctx)
    if frames is not None:
      return frames
  return None
