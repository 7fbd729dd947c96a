"""UTR's temporal perplexity (TPL, paper eq. 6) of every QA row of a data split.

TPL = NLL_keyframe - NLL_full, in nats: a row's mean negative log-likelihood per answer
token, counting exactly the tokens the training label mask counts (the answer and its
``</s>``, data/chat.py; the row is encoded alone, as ``data.qa_mode="sample"`` trains
it, with the same truncation), given one keyframe tiled T times (so the sequence layout
is unchanged) minus the same given the full video. Positive when the full video helps.
The keyframe is drawn uniformly per clip from (seed, clip id) with a stable hash (the same
on every run and host), or is the first, middle (index T // 2) or last frame. Tiling
zeroes the frame-difference tokens, which training only shows on empty scenes, so compare
TPL within a task type, not across types.

Scoring reuses eval/scoring.py's Scorer (one prefill per video, its rows as one chunk over
the cache): each clip goes in twice, full and keyframe, and every row is scored against
both. Batches are split over the devices of a 1-D data mesh with ``shard_map``: device d
holds clips [d*C, (d+1)*C) and rows [d*R, (d+1)*R), and its rows name clips by their
index among its own C clips (``pack_clips``).

``run`` writes, in ``out_dir``: tpl.jsonl (one line per QA row; resumable: rows already
there are skipped, a torn last line is dropped), summary.md and summary.json (mean TPL per
task and kind, tertile cut points per task) and tpl_<task>.png (histogram per task).

Multi-host (``process_count`` > 1, a ``jax.distributed`` run): process i scores records
i, i + n, i + 2n, ... of the split on its own local devices (a local mesh: scoring needs
no communication between hosts) and appends its rows to its own part file
tpl.process_<i>-of-<n>.jsonl (its resume state); after a barrier process 0 merges every
part (and the rows of earlier runs) into tpl.jsonl in (record index, QA row) order and
writes the summary. A rerun with another process count reuses the rows already scored:
each process skips the rows of its share that tpl.jsonl or the parts of other counts hold.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import re
from typing import Callable, Sequence

import numpy as np

from mashvlm_jax import paths

log = logging.getLogger("mashvlm.tpl")

KEYFRAME_MODES = ("random", "first", "middle", "last")
TPL_FILE = "tpl.jsonl"
SETTINGS_FILE = "tpl_settings.json"
PART_FILE = re.compile(r"tpl\.process_(\d+)-of-(\d+)\.jsonl")


# ------------------------------------------------------------------------------ the score

def keyframe_index(seed: int, clip_id: str, num_frames: int, mode: str = "random") -> int:
  """The keyframe of a clip of ``num_frames`` frames: uniform over 0..T-1 from (seed, clip
  id) for "random" (sha256, not Python's salted hash()), else 0, T // 2 or T - 1."""
  if num_frames < 1:
    raise ValueError(f"a clip needs at least one frame, found num_frames={num_frames}")
  if mode == "random":
    digest = hashlib.sha256(f"{int(seed)}\x00{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_frames
  fixed = {"first": 0, "middle": num_frames // 2, "last": num_frames - 1}
  if mode not in fixed:
    raise ValueError(f"keyframe mode must be one of {KEYFRAME_MODES}, found {mode!r}")
  return fixed[mode]


def keyframe_video(frames: np.ndarray, index: int) -> np.ndarray:
  """frames [T, H, W, 3] -> the same shape and dtype, every frame a copy of frame
  ``index``."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or not 0 <= index < frames.shape[0]:
    raise ValueError(f"keyframe {index} of frames {frames.shape}: expected [T, H, W, 3] "
                     f"and 0 <= index < T")
  return np.ascontiguousarray(np.broadcast_to(frames[index], frames.shape))


def mean_answer_nll(token_logprobs: np.ndarray, label_mask: np.ndarray) -> np.ndarray:
  """float64 [R]: mean NLL in nats over each row's answer tokens.

  token_logprobs [R, W]: log p(text[i + 1] | video, text[:i + 1]) (Scorer.score_rows,
  W = L - 1); label_mask [R, L] or [R, W]: 1 where text[i + 1] is an answer token (the
  training label mask, data/chat.py to_arrays). A mask column past W must be 0.
  """
  logp = np.asarray(token_logprobs, np.float64)
  mask = np.asarray(label_mask, np.float64)
  rows, width = logp.shape
  if mask.shape[0] != rows or mask.shape[1] not in (width, width + 1):
    raise ValueError(f"label_mask {mask.shape} does not fit token_logprobs {logp.shape}: "
                     f"expected [{rows}, {width}] or [{rows}, {width + 1}]")
  if mask[:, width:].any():
    raise ValueError("label_mask marks a token past the scored positions")
  mask = mask[:, :width]
  counts = mask.sum(-1)
  if (counts == 0).any():
    raise ValueError(f"rows {np.flatnonzero(counts == 0).tolist()} have no answer token")
  return -(mask * logp).sum(-1) / counts


def tpl(nll_keyframe, nll_full):
  """TPL = NLL given the keyframe minus NLL given the full video (float64, any shape)."""
  return np.asarray(nll_keyframe, np.float64) - np.asarray(nll_full, np.float64)


def encode_rows(tok, template, qa: Sequence[dict], text_len: int, example_id: str = ""):
  """Each QA turn alone as training encodes it (chat.encode_example): per turn (ids:
  list of the row's tokens, label_mask float32 [text_len])."""
  from mashvlm_jax.data import chat
  out = []
  for turn in qa:
    row, _ = chat.encode_example(tok, template, [turn], text_len, example_id)
    n = int(row["text_mask"].sum())
    out.append((row["text_ids"][:n].tolist(), row["label_mask"]))
  return out


# ------------------------------------------------------------------------------ batches

@dataclasses.dataclass
class Clip:
  """One video to score: frames uint8 [T, H, W, 3], its keyframe index and its text rows
  (ids list, label_mask float32 [L]) from ``encode_rows``."""
  frames: np.ndarray
  keyframe: int
  rows: list


@dataclasses.dataclass
class Batch:
  """A packed batch for D devices of C clips and R rows each (see module docstring).

  frames uint8 [D*C, T, H, W, 3] (scored clip j of a device: slot 2j full, 2j+1 keyframe;
  unused slots are zeros); clip_index int32 [D*R] local to the device; text_ids int32,
  text_mask bool, label_mask float32 [D*R, L] (padding rows: one pad token, no answer);
  full_rows / keyframe_rows: per clip, the batch row of each of its text rows.
  """
  frames: np.ndarray
  clip_index: np.ndarray
  text_ids: np.ndarray
  text_mask: np.ndarray
  label_mask: np.ndarray
  full_rows: list
  keyframe_rows: list


def pack_clips(clips: Sequence[Clip], devices: int, text_len: int, pad_id: int,
               rows_multiple: int = 8) -> Batch:
  """Spreads ``clips`` over ``devices`` in contiguous groups of ceil(len / devices); R is
  the largest group's row count (two per text row) rounded up to ``rows_multiple``."""
  from mashvlm_jax.eval.generate import pad_prompts
  per = -(-len(clips) // devices)
  groups = [list(range(d * per, min((d + 1) * per, len(clips)))) for d in range(devices)]
  most = max(sum(2 * len(clips[c].rows) for c in g) for g in groups)
  rows_per = -(-most // rows_multiple) * rows_multiple
  shape = clips[0].frames.shape
  frames = np.zeros((devices * 2 * per, *shape), np.uint8)
  clip_index = np.zeros(devices * rows_per, np.int32)
  texts = [[pad_id]] * (devices * rows_per)
  label_mask = np.zeros((devices * rows_per, text_len), np.float32)
  full_rows, keyframe_rows = [None] * len(clips), [None] * len(clips)
  for d, group in enumerate(groups):
    row = d * rows_per
    for j, c in enumerate(group):
      clip = clips[c]
      if clip.frames.shape != shape:
        raise ValueError(f"clip {c} has frames {clip.frames.shape}, clip 0 {shape}")
      frames[d * 2 * per + 2 * j] = clip.frames
      frames[d * 2 * per + 2 * j + 1] = keyframe_video(clip.frames, clip.keyframe)
      full_rows[c], keyframe_rows[c] = [], []
      for slot, rows in ((2 * j, full_rows[c]), (2 * j + 1, keyframe_rows[c])):
        for ids, mask in clip.rows:
          clip_index[row], texts[row], label_mask[row] = slot, ids, mask
          rows.append(row)
          row += 1
  text_ids, text_mask = pad_prompts(texts, pad_id, length=text_len)
  return Batch(frames, clip_index, text_ids, text_mask, label_mask, full_rows, keyframe_rows)


# (frames, clip_index, text_ids, text_mask) of a Batch -> token_logprobs float [D*R, L-1]
ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def score_clips(score_fn: ScoreFn, clips: Sequence[Clip], devices: int, text_len: int,
                pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per clip (nll_full, nll_keyframe), float64 [rows of the clip] each."""
  batch = pack_clips(clips, devices, text_len, pad_id)
  logp = np.asarray(score_fn(batch.frames, batch.clip_index, batch.text_ids,
                             batch.text_mask))
  out = []
  for full, key in zip(batch.full_rows, batch.keyframe_rows):
    nll = mean_answer_nll(logp[full + key], batch.label_mask[full + key])
    out.append((nll[:len(full)], nll[len(full):]))
  return out


def make_score_fn(scorer, mesh) -> ScoreFn:
  """The Scorer's teacher-forced scoring (eval/scoring.py) of a packed Batch, each
  device's rows and clips in ``shard_map`` over the mesh's batch axes, the parameters
  replicated."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from mashvlm_jax.train import sharding
  spec = P(sharding.BATCH_AXES)

  def local(params, frames, clip_index, text_ids, text_mask):
    return scorer.score_fn(params, frames, clip_index, text_ids, text_mask)[0]

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), spec, spec, spec, spec),
                             out_specs=spec, check_vma=False))
  params = jax.device_put(scorer.params, NamedSharding(mesh, P()))

  def score(frames, clip_index, text_ids, text_mask):
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
             for x in (frames, clip_index, text_ids, text_mask)]
    return np.asarray(fn(params, *batch))
  return score


# ------------------------------------------------------------------------------ the pass

def row_key(split: str, clip_id: str, k: int) -> str:
  """The key of QA row ``k`` of record ``clip_id`` (as eval/synthetic.py keys its rows)."""
  return f"{split}:{clip_id}:{k}"


def claim_settings(out_dir, settings: dict, resume: bool) -> None:
  """Records ``settings`` in out_dir/tpl_settings.json; on resume refuses a directory
  whose rows were scored with other settings (they would mix)."""
  path = pathlib.Path(out_dir) / SETTINGS_FILE
  if resume and path.exists():
    found = json.loads(path.read_text())
    diff = {k: (found.get(k), v) for k, v in settings.items() if found.get(k) != v}
    if diff:
      raise ValueError(f"{out_dir} holds TPL rows scored with other settings "
                       f"(field: stored vs now) {diff}; give another --out or --noresume")
    return
  paths.write_text_atomic(path, json.dumps(settings, sort_keys=True) + "\n")


def run(config, split: str, out_dir, score_fn: ScoreFn, devices: int = 1, *,
        keyframe: str = "random", seed: int = 0, limit: int = 0, batch_size: int = 8,
        resume: bool = True, show_progress: bool = True, process_index: int = 0,
        process_count: int = 1, barrier: Callable[[str], None] | None = None) -> dict:
  """Scores every QA row of the first ``limit`` records (0 = all) of ``split``, in
  ``batch_size`` clips per batch over ``devices``; writes the files of the module
  docstring; returns the summary with "files".

  With ``process_count`` > 1 only the share of ``process_index`` (``process_share``) is
  scored, into its part file; ``barrier(name)`` (multihost_utils.sync_global_devices)
  then waits for every process, and process 0 merges and summarises. The other processes
  return {"rows": rows in their part, "process": index, "files": {"part": path}}."""
  from mashvlm_jax.data import chat, pipeline, registry
  from mashvlm_jax.eval import common
  if keyframe not in KEYFRAME_MODES:
    raise ValueError(f"keyframe mode must be one of {KEYFRAME_MODES}, found {keyframe!r}")
  out_dir = pathlib.Path(out_dir)
  tok = registry.load_tokenizer(config)
  template = chat.ChatTemplate(**dict(config.data.template))
  text_len, num_frames = int(config.data.text_len), int(config.model.num_frames)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  claim_settings(out_dir, dict(split=split, keyframe=keyframe, seed=int(seed),
                               text_len=text_len, num_frames=num_frames), resume)
  if not resume and process_index == 0:
    remove_other_runs(out_dir, process_count)
  own_path = out_dir / (TPL_FILE if process_count == 1 else part_name(process_index,
                                                                      process_count))
  log_file = common.PredictionLog(own_path, resume)
  earlier = scored_elsewhere(out_dir, process_count) if resume else set()
  records = pipeline.make_eval_records(config, split)
  count = min(limit, len(records)) if limit else len(records)
  share = process_share(count, process_index, process_count)
  bar = common.progress(len(share), f"tpl {split}") if show_progress else None
  pending = []

  def flush():
    scores = score_clips(score_fn, [clip for clip, _ in pending], devices, text_len,
                         tok.pad_id)
    done = [dict(meta, nll_full=float(f), nll_keyframe=float(k), tpl=float(tpl(k, f)))
            for (_, metas), nlls in zip(pending, scores) for meta, f, k in zip(metas, *nlls)]
    log_file.add(done)
    if bar:
      bar.update(len(pending))
    pending.clear()

  try:
    for index in share:
      record = records[index]
      todo = [k for k in range(len(record["qa"]))
              if row_key(split, record["id"], k) not in log_file and
              row_key(split, record["id"], k) not in earlier]
      if not todo:
        if bar:
          bar.update(1)
        continue
      frame = keyframe_index(seed, record["id"], len(record["frames"]), keyframe)
      qa = [record["qa"][k] for k in todo]
      metas = [{"key": row_key(split, record["id"], k), "split": split, "id": record["id"],
                "index": index, "qa": k, "task": record["qa"][k]["task"],
                "aspect": record["qa"][k]["aspect"], "kind": record["kind"],
                "keyframe": frame} for k in todo]
      clip = Clip(record["frames"], frame, encode_rows(tok, template, qa, text_len,
                                                       record["id"]))
      pending.append((clip, metas))
      if len(pending) == batch_size:
        flush()
    if pending:
      flush()
  finally:
    if bar:
      bar.close()
  if process_count > 1:
    (barrier or (lambda name: None))("mashvlm tpl: every share scored")
    if process_index != 0:
      return {"rows": len(log_file.values()), "process": process_index,
              "files": {"part": str(own_path)}}
  rows = log_file.values()
  if process_count > 1 or part_files(out_dir):
    rows = merge_parts(out_dir, process_count)
  summary = summarize(rows)
  summary.update(split=split, keyframe=keyframe, seed=int(seed), records=count)
  summary["files"] = write_summary(out_dir, summary, rows)
  return summary


# ------------------------------------------------------------------------------ many hosts

def process_share(count: int, process_index: int, process_count: int) -> range:
  """The record indices process ``process_index`` of ``process_count`` scores among the
  first ``count``: every ``process_count``-th from its own index (as pipeline.shard)."""
  return range(process_index, count, process_count)


def part_name(process_index: int, process_count: int) -> str:
  """The part file of one process: tpl.process_<i>-of-<n>.jsonl."""
  return f"tpl.process_{process_index}-of-{process_count}.jsonl"


def part_files(out_dir) -> list[tuple[int, int, pathlib.Path]]:
  """(process count, process index, path) of every part file in ``out_dir``, sorted."""
  found = []
  for path in pathlib.Path(out_dir).glob("tpl.process_*-of-*.jsonl"):
    match = PART_FILE.fullmatch(path.name)
    if match:
      found.append((int(match[2]), int(match[1]), path))
  return sorted(found)


def read_rows(path) -> list[dict]:
  """The rows of a TPL JSONL file ([] when missing); undecodable (torn) lines are
  skipped, as PredictionLog skips them."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return rows


def scored_elsewhere(out_dir, process_count: int) -> set[str]:
  """Keys of the rows earlier runs with another process count left in ``out_dir``: the
  parts of other counts, and tpl.jsonl unless it is this (single) process's own log. A
  process never reads the parts of its own run's other processes (their records are
  not its own), so what it skips does not depend on their progress."""
  out_dir = pathlib.Path(out_dir)
  files = [path for n, _, path in part_files(out_dir) if n != process_count]
  if process_count > 1:
    files.append(out_dir / TPL_FILE)
  return {row["key"] for path in files for row in read_rows(path)}


def remove_other_runs(out_dir, process_count: int) -> None:
  """--noresume on process 0: removes the rows of runs with other process counts (each
  process removes its own part itself, PredictionLog(resume=False))."""
  out_dir = pathlib.Path(out_dir)
  for n, _, path in part_files(out_dir):
    if n != process_count:
      path.unlink(missing_ok=True)
  if process_count > 1:
    (out_dir / TPL_FILE).unlink(missing_ok=True)


def merge_parts(out_dir, process_count: int) -> list[dict]:
  """Every row of tpl.jsonl and the part files in ``out_dir``, one per key (the newest
  source wins: tpl.jsonl, parts of other counts, then this run's own), in (record index,
  QA row) order, written to tpl.jsonl at once (a reader never sees half of it)."""
  out_dir = pathlib.Path(out_dir)
  parts = part_files(out_dir)
  merged = out_dir / TPL_FILE
  sources = [path for n, _, path in parts if n != process_count]
  own = [path for n, _, path in parts if n == process_count]
  sources = ([merged] + sources + own) if process_count > 1 else (sources + [merged])
  by_key = {row["key"]: row for path in sources for row in read_rows(path)}
  rows = sorted(by_key.values(), key=lambda r: (r["index"], r["qa"]))
  paths.write_text_atomic(merged, "".join(json.dumps(r) + "\n" for r in rows))
  log.info("merged %d rows of %d part files into %s", len(rows), len(parts), merged)
  return rows


def run_with_params(config, params, split: str, out_dir, **kwargs) -> dict:
  """``run`` with ``params`` scored on every local device (a data-parallel mesh): what
  ``mashvlm tpl`` and the study harness share. ``kwargs`` go to ``run``."""
  import jax
  from mashvlm_jax.data import registry
  from mashvlm_jax.eval.scoring import Scorer
  from mashvlm_jax.model.config import ModelConfig
  from mashvlm_jax.train import sharding
  if jax.process_count() > 1:  # each process scores its share on its own devices
    from jax.experimental import multihost_utils
    params = host_params(params)
    kwargs = dict(kwargs, process_index=jax.process_index(),
                  process_count=jax.process_count(),
                  barrier=multihost_utils.sync_global_devices)
  scorer = Scorer(ModelConfig.from_dict(config.model), params,
                  registry.load_tokenizer(config).pad_id)
  devices = jax.local_devices()
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  return run(config, split, out_dir, make_score_fn(scorer, mesh), len(devices), **kwargs)


def host_params(params):
  """``params`` whole on this process, for a mesh of its local devices: a jax.Array
  replicated over every host's devices becomes its local copy, one sharded over other
  hosts' devices (a trainer checkpoint restored onto an fsdp mesh) is gathered into host
  memory (numpy); other leaves are kept. A collective: every process calls it."""
  import jax
  from jax.experimental import multihost_utils
  leaves, tree = jax.tree.flatten(params)
  spread = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and
            not x.is_fully_addressable and not x.is_fully_replicated]
  gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
  for i, value in zip(spread, gathered):
    leaves[i] = np.asarray(value)
  log.info("parameters: gathered %d of %d arrays sharded over other processes' devices",
           len(spread), len(leaves))
  leaves = [x.addressable_data(0) if isinstance(x, jax.Array) and not x.is_fully_addressable
            else x for x in leaves]
  return jax.tree.unflatten(tree, leaves)


# ------------------------------------------------------------------------------ summary

def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def summarize(rows: Sequence[dict]) -> dict:
  """{"rows": n, "tasks": {task: {"rows", "mean_tpl", "tertiles": [1/3 and 2/3 quantiles
  of TPL], "kinds": {kind: {"rows", "mean_tpl", "mean_nll_full", "mean_nll_keyframe"}}}}}."""
  tasks = {}
  for task in sorted({r["task"] for r in rows}):
    mine = [r for r in rows if r["task"] == task]
    values = np.array([r["tpl"] for r in mine])
    kinds = {}
    for kind in sorted({r["kind"] for r in mine}):
      some = [r for r in mine if r["kind"] == kind]
      kinds[kind] = {"rows": len(some), "mean_tpl": _mean([r["tpl"] for r in some]),
                     "mean_nll_full": _mean([r["nll_full"] for r in some]),
                     "mean_nll_keyframe": _mean([r["nll_keyframe"] for r in some])}
    tasks[task] = {"rows": len(mine), "mean_tpl": _mean(values),
                   "tertiles": np.quantile(values, [1 / 3, 2 / 3]).tolist(), "kinds": kinds}
  return {"rows": len(rows), "tasks": tasks}


def summary_markdown(summary: dict) -> str:
  f = lambda v: f"{v:.4f}"  # noqa: E731
  head = (f"TPL = NLL(keyframe) - NLL(full), nats per answer token (answer + </s>); "
          f"split {summary.get('split', '?')}, keyframe {summary.get('keyframe', '?')} "
          f"(seed {summary.get('seed', '?')}), {summary['rows']} QA rows. Compare within "
          f"a task.")
  lines = [head, "",
           "| task | kind | rows | mean TPL | mean NLL full | mean NLL keyframe |",
           "|---|---|---|---|---|---|"]
  for task, t in summary["tasks"].items():
    for kind, k in t["kinds"].items():
      lines.append(f"| {task} | {kind or '-'} | {k['rows']} | {f(k['mean_tpl'])} | "
                   f"{f(k['mean_nll_full'])} | {f(k['mean_nll_keyframe'])} |")
  lines += ["", "| task | rows | mean TPL | tertile cut 1/3 | tertile cut 2/3 |",
            "|---|---|---|---|---|"]
  for task, t in summary["tasks"].items():
    low, high = t["tertiles"]
    lines.append(f"| {task} | {t['rows']} | {f(t['mean_tpl'])} | {f(low)} | {f(high)} |")
  return "\n".join(lines) + "\n"


def plot_task(rows: Sequence[dict], task: str, tertiles, path) -> str:
  """Histogram of one task's TPL, one series per kind, tertile cuts dashed -> PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  values = np.array([r["tpl"] for r in rows])
  bins = np.histogram_bin_edges(values, bins=min(30, max(5, len(values) // 4)))
  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  for kind in sorted({r["kind"] for r in rows}):
    ax.hist([r["tpl"] for r in rows if r["kind"] == kind], bins=bins, alpha=0.6,
            label=kind or "all")
  for cut in tertiles:
    ax.axvline(cut, color="k", linestyle="--", linewidth=0.8)
  ax.set_xlabel("TPL (nats per answer token)")
  ax.set_ylabel("QA rows")
  ax.set_title(f"{task}: {len(rows)} rows (dashed: tertile cuts)", fontsize=9)
  ax.legend(fontsize=8)
  from mashvlm_jax.eval.plots import save_figure
  return save_figure(fig, path)


def write_summary(out_dir, summary: dict, rows: Sequence[dict]) -> dict:
  """summary.md, summary.json and tpl_<task>.png in ``out_dir``; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  files = {"jsonl": str(out_dir / TPL_FILE), "markdown": str(out_dir / "summary.md"),
           "json": str(out_dir / "summary.json"), "plots": {}}
  for task, t in summary["tasks"].items():
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
    files["plots"][task] = plot_task([r for r in rows if r["task"] == task], task,
                                     t["tertiles"], out_dir / f"tpl_{name}.png")
  (out_dir / "summary.md").write_text(summary_markdown(summary))
  (out_dir / "summary.json").write_text(json.dumps(dict(summary, files=files), indent=2)
                                        + "\n")
  return files
