"""What every evaluator shares: loading parameters, prompts, resumable JSONL predictions,
a progress bar in items per second, JSON + markdown results, and the attention
enhancement (RVE) that every Scorer and Generator built in ``attention_enhancement``
applies."""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import pathlib
from typing import Iterable

import numpy as np

from mashvlm_jax import paths

log = logging.getLogger("mashvlm.eval")


# ------------------------------------------------------------------------------ parameters

def resolve_checkpoint(path) -> tuple[pathlib.Path, int | None]:
  """(Orbax checkpoints directory, step or None for the latest) for a trainer workdir,
  its ``checkpoints/`` directory or one ``checkpoints/<step>/`` directory."""
  path = pathlib.Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if path.name.isdigit() and (path / "state").exists():
    return path.parent, int(path.name)
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", None
  return path, None


def checkpoint_step(path, step: int | None = None) -> int | None:
  """The step ``load_params`` reads from a trainer checkpoint ``path`` (``step``, the step
  directory's, or the latest finished one); None for an import-hf output."""
  from mashvlm_jax.convert import params_io
  path = pathlib.Path(path).expanduser()
  if (path / params_io.PARAMS_DIR).is_dir():
    return None
  directory, found = resolve_checkpoint(path)
  if step is not None or found is not None:
    return step if step is not None else found
  steps = params_io.finished_steps(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  return steps[-1]


def default_out_dir(path, step: int | None, benchmark: str) -> pathlib.Path:
  """Where ``mashvlm eval`` writes by default: ``<workdir>/eval/step<N>/<benchmark>`` for
  a trainer checkpoint (never inside an Orbax step directory, which checkpoint pruning
  deletes, and one directory per step, so that resuming never mixes two steps'
  predictions), ``<dir>/eval/<benchmark>`` for an import-hf output."""
  path = pathlib.Path(path).expanduser().absolute()
  step = checkpoint_step(path, step)
  if step is None:
    return path / "eval" / benchmark
  return resolve_checkpoint(path)[0].parent / "eval" / f"step{step}" / benchmark


def claim_out_dir(out_dir, checkpoint, step: int | None, resume: bool = True,
                  rve: dict | None = None) -> None:
  """Records in ``out_dir/checkpoint.json`` which checkpoint it evaluates (and with
  ``rve``, the attention enhancement's settings); with ``resume`` refuses an ``out_dir``
  that holds another checkpoint's or another enhancement's predictions (resuming would
  mix them)."""
  out_dir = pathlib.Path(out_dir)
  step = checkpoint_step(checkpoint, step)
  where = pathlib.Path(checkpoint).expanduser().absolute()
  if step is not None:  # a workdir and its step directories name the same checkpoints
    where = resolve_checkpoint(where)[0]
  record = {"checkpoint": str(where), "step": step}
  if rve is not None:
    record["rve"] = rve
  path = out_dir / "checkpoint.json"
  if path.exists() and resume:
    found = json.loads(path.read_text())
    if found != record:
      raise ValueError(f"{out_dir} holds the evaluation of {found}, not of {record}: give "
                       f"another --out (or remove it) rather than mix their predictions")
    return
  out_dir.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(path, json.dumps(record) + "\n")


def load_params(config, path, step: int | None = None):
  """Parameters (plain tree, replicated on the default mesh) of a trained checkpoint.

  ``path``: a trainer workdir, its ``checkpoints/`` dir, a ``checkpoints/<step>`` dir, or
  an ``mashvlm import-hf`` output (``params/`` + ``model_config.json``).
  """
  path = pathlib.Path(path).expanduser()
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.data import registry
  if (path / params_io.PARAMS_DIR).is_dir() and (path / params_io.CONFIG_FILE).exists():
    registry.check_vocabulary_file(config, path / registry.VOCABULARY_FILE)
    return params_io.load_params(str(path))[0]
  from mashvlm_jax.train import checkpoint as ckpt_lib
  from mashvlm_jax.train import trainer
  directory, found_step = resolve_checkpoint(path)
  params_io.check_model_config(config, directory.parent / params_io.CONFIG_FILE)
  registry.check_vocabulary_file(config, directory.parent / registry.VOCABULARY_FILE)
  checkpointer = ckpt_lib.Checkpointer(directory, use_async=False)
  try:
    step = step if step is not None else found_step
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    setup = trainer.build(config)
    abstract = trainer.with_shardings(setup.abstract_state, setup.state_shardings)
    state, _, _ = checkpointer.restore(step, abstract, with_data=False)
  finally:
    checkpointer.close()
  log.info("restored step %d from %s", step, directory)
  return state.params


# ------------------------------------------------------------------------------ RVE

_ENHANCEMENT: contextvars.ContextVar = contextvars.ContextVar("mashvlm_rve", default=None)


@contextlib.contextmanager
def attention_enhancement(rve):
  """Every ``Scorer`` and ``Generator`` built inside this block, and not given its own,
  enhances attention with ``rve`` (an analysis.rve.RveConfig; None: off). This is how
  ``mashvlm eval --rve`` reaches every benchmark's evaluator."""
  token = _ENHANCEMENT.set(rve)
  try:
    yield rve
  finally:
    _ENHANCEMENT.reset(token)


def active_enhancement():
  """The RveConfig of the innermost ``attention_enhancement`` block, or None."""
  return _ENHANCEMENT.get()


# ------------------------------------------------------------------------------ prompts

class Prompter:
  """Token ids of ``<s> {system} {instruction} USER: {q} ASSISTANT: [prefix]`` for the
  config's tokenizer and chat template (data/chat.py)."""

  def __init__(self, config, tokenizer=None):
    from mashvlm_jax.data import chat, registry
    self.tok = tokenizer or registry.load_tokenizer(config)
    self.template = chat.ChatTemplate(**dict(config.data.template))
    self._encode = chat.encode_prompt

  def __call__(self, question: str, instruction: str = "", prefix: str = "") -> list:
    ids = self._encode(self.tok, self.template, question, instruction)
    return ids + (self.tok.encode(prefix) if prefix else [])

  def token(self, word: str) -> int:
    """The first token of ``word`` as an answer piece (how chat.py tokenises answers)."""
    ids = self.tok.encode(word)
    if not ids or (self.tok.unk_id is not None and ids[0] == self.tok.unk_id):
      raise ValueError(f"{word!r} is not in the vocabulary of {self.tok.path}")
    return ids[0]


def eval_records(config, splits, max_items: int = 0):
  """(split, record) for the first ``max_items`` records (0 = all) of each split, in
  stored order (data/pipeline.py make_eval_records)."""
  from mashvlm_jax.data import pipeline
  for split in splits:
    ds = pipeline.make_eval_records(config, split)
    count = len(ds) if not max_items else min(max_items, len(ds))
    for index in range(count):
      yield split, ds[index]


# ------------------------------------------------------------------------------ JSONL

class PredictionLog:
  """Append-only JSONL of predictions keyed by ``key``; a rerun skips the keys it holds
  (a torn last line from an interrupted run is ignored)."""

  def __init__(self, path, resume: bool = True):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.rows = {}
    if resume and self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          row = json.loads(line)
        except json.JSONDecodeError:
          continue
        self.rows[row["key"]] = row
      self._rewrite()  # drops a torn line so appends start on a fresh line
    elif self.path.exists():
      self.path.unlink()
    if self.rows:
      log.info("resuming: %d predictions already in %s", len(self.rows), self.path)

  def _rewrite(self) -> None:
    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows.values()))

  def __contains__(self, key: str) -> bool:
    return key in self.rows

  def add(self, rows: Iterable[dict]) -> None:
    rows = list(rows)
    with self.path.open("a") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
        self.rows[row["key"]] = row

  def values(self) -> list[dict]:
    return list(self.rows.values())


def progress(total: int, desc: str, initial: int = 0):
  """tqdm bar counting items (its rate reads items/s)."""
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="item", dynamic_ncols=True)


# ------------------------------------------------------------------------------ results

def markdown_table(header: list, rows: list[list]) -> str:
  fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def write_result(out_dir, result: dict, markdown: str) -> dict:
  """Writes result.json and result.md in ``out_dir``; returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "result.json").write_text(json.dumps(result, indent=2, default=_plain) + "\n")
  (out_dir / "result.md").write_text(markdown + "\n")
  return {"json": str(out_dir / "result.json"), "markdown": str(out_dir / "result.md")}


def _plain(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def batches(items: list, size: int):
  for begin in range(0, len(items), size):
    yield items[begin:begin + size]


def chunk_rows(chunk) -> tuple[np.ndarray, list, list[int]]:
  """A chunk [(frames [T, H, W, 3], rows)] of ``run_in_batches`` as (frames [C, T, H, W,
  3], its rows in order, the clip index of each row)."""
  frames = np.stack([f for f, _ in chunk])
  rows = [r for _, rows in chunk for r in rows]
  clip = [c for c, (_, rows) in enumerate(chunk) for _ in rows]
  return frames, rows, clip


def pad_rows(clip, prompts, multiple: int = 16):
  """Rows padded to a multiple of 16 by repeating the last one (fewer jit shapes); the
  extra rows' scores are ignored (zip with the real rows)."""
  extra = -len(prompts) % multiple
  return list(clip) + [clip[-1]] * extra, list(prompts) + [prompts[-1]] * extra


def run_in_batches(todo: list, batch_size: int, step, log_file: PredictionLog, *,
                   desc: str, show_progress: bool = True, total: int | None = None,
                   initial: int = 0) -> None:
  """Runs ``step(chunk) -> finished prediction rows`` over ``todo`` in chunks of
  ``batch_size``, appending each chunk's rows to ``log_file`` (so an interrupted run
  resumes) and counting them on a progress bar of ``total`` items (default len(todo))."""
  bar = progress(len(todo) if total is None else total, desc, initial) if (
      show_progress) else None
  try:
    for chunk in batches(todo, batch_size):
      done = list(step(chunk))
      log_file.add(done)
      if bar:
        bar.update(len(done))
  finally:
    if bar:
      bar.close()
