"""``data.row_filter``: train on the QA rows a TPL pass kept (UTR, analysis/tpl.py).

    config.data.row_filter = dict(path="", rule="top", fraction=1/3, threshold=0.0,
                                  per_task=False)

  path       a tpl.jsonl written by ``mashvlm tpl`` on the train split ("" = no filter)
  rule       "top": the ``fraction`` of rows with the highest TPL (default the top third,
             the paper's high group); "bottom": the lowest (the control arm, the same
             count); "above": every row with TPL > ``threshold``
  per_task   apply the rule within each task type (TPL compares within a type)

The top/bottom count of n rows is floor(fraction * n + 1/2); ties break by row key.
Only the rows tpl.jsonl holds are candidates. The train split then yields only the kept
(record, QA row) pairs: one example per kept pair with ``data.qa_mode="sample"``, one per
record holding its kept rows with "all". Other splits are untouched.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Sequence

import grain

from mashvlm_jax import paths

log = logging.getLogger("mashvlm.data")

RULES = ("top", "bottom", "above")
DEFAULT = dict(path="", rule="top", fraction=1 / 3, threshold=0.0, per_task=False)
FIELDS = ("key", "split", "id", "index", "qa", "task", "tpl")


def settings(config) -> dict | None:
  """data.row_filter with the defaults filled, or None when it names no file."""
  given = config.data.get("row_filter", None)
  spec = dict(DEFAULT, **(dict(given) if given else {}))
  unknown = sorted(set(spec) - set(DEFAULT))
  if unknown:
    raise ValueError(f"data.row_filter has unknown fields {unknown}; known: {sorted(DEFAULT)}")
  if not spec["path"]:
    return None
  if spec["rule"] not in RULES:
    raise ValueError(f"data.row_filter.rule must be one of {RULES}, found {spec['rule']!r}")
  if spec["rule"] != "above" and not 0 < float(spec["fraction"]) <= 1:
    raise ValueError(f"data.row_filter.fraction must be in (0, 1], found {spec['fraction']}")
  return spec


def read_tpl(path) -> list[dict]:
  """The rows of a tpl.jsonl; errors name the file, the line and what is missing."""
  from etils import epath
  path = epath.Path(paths.local_path(str(path)))
  if not path.exists():
    raise FileNotFoundError(f"data.row_filter.path: {path} does not exist; write it with "
                            f"`mashvlm tpl --out=DIR` (DIR/tpl.jsonl)")
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {number} is not JSON ({e}); an interrupted "
                       f"`mashvlm tpl` finishes when run again") from e
    missing = [f for f in FIELDS if f not in row]
    if missing:
      raise ValueError(f"{path} line {number} lacks {missing}: expected the fields "
                       f"{FIELDS} of `mashvlm tpl` rows")
    rows.append(row)
  return rows


def select(rows: Sequence[dict], rule: str = "top", fraction: float = 1 / 3,
           threshold: float = 0.0, per_task: bool = False) -> list[dict]:
  """The kept rows (module docstring), in the order given."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, found {rule!r}")
  groups = {}
  for row in rows:
    groups.setdefault(row["task"] if per_task else None, []).append(row)
  kept = set()
  for group in groups.values():
    if rule == "above":
      kept.update(r["key"] for r in group if r["tpl"] > threshold)
      continue
    count = math.floor(fraction * len(group) + 0.5)
    sign = -1.0 if rule == "top" else 1.0
    order = sorted(group, key=lambda r: (sign * r["tpl"], r["key"]))
    kept.update(r["key"] for r in order[:count])
  return [r for r in rows if r["key"] in kept]


class _KeptRows:
  """(record index, id, QA indices) -> the stored record with only those QA rows."""

  def __init__(self, source, path):
    self.source, self.path = source, str(path)

  def __call__(self, item):
    index, clip_id, ks = item
    raw = self.source[index]
    found = raw["id"].decode() if isinstance(raw["id"], bytes) else str(raw["id"])
    count = len(raw["qa"]["q"])
    if found != clip_id or max(ks) >= count:
      raise ValueError(f"data.row_filter.path {self.path}: rows of record {clip_id!r} (index "
                       f"{index}, QA {list(ks)}) but the data set holds {found!r} with "
                       f"{count} QA rows there: score this build again with `mashvlm tpl`")
    return dict(raw, qa={f: [v[k] for k in ks] for f, v in raw["qa"].items()})


def apply(ds: grain.MapDataset, config, split: str) -> grain.MapDataset:
  """``ds`` (the split's records) restricted to the kept (record, QA row) pairs on the
  train split when data.row_filter names a file; otherwise ``ds`` itself."""
  spec = settings(config)
  if spec is None or split != config.data.train_split:
    return ds
  rows = [r for r in read_tpl(spec["path"]) if r["split"] == split]
  if not rows:
    raise ValueError(f"data.row_filter.path {spec['path']} holds no rows of split {split!r}")
  kept = select(rows, spec["rule"], float(spec["fraction"]), float(spec["threshold"]),
                bool(spec["per_task"]))
  per_record = {}
  for r in kept:
    per_record.setdefault((int(r["index"]), str(r["id"])), []).append(int(r["qa"]))
  if config.data.qa_mode == "all":
    items = [(i, c, sorted(ks)) for (i, c), ks in sorted(per_record.items())]
  else:
    items = [(i, c, [k]) for (i, c), ks in sorted(per_record.items()) for k in sorted(ks)]
  log.info("data.row_filter: kept %d of the %d QA rows of split %r scored in %s (rule %s, "
           "fraction %.3g, threshold %g, per task %s), from %d records", len(kept),
           len(rows), split, spec["path"], spec["rule"], float(spec["fraction"]),
           float(spec["threshold"]), bool(spec["per_task"]), len(per_record))
  if not items:
    raise ValueError(f"data.row_filter keeps no row of {spec['path']} (rule "
                     f"{spec['rule']}, fraction {spec['fraction']}, threshold "
                     f"{spec['threshold']})")
  return grain.MapDataset.source(items).map(_KeptRows(ds, spec["path"]))
