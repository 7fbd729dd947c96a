"""Text-length buckets (``data.text_buckets``): every batch pads its text to the smallest
of a few static lengths that holds all of its rows, so the train step compiles once per
bucket and short rows stop paying for ``data.text_len`` positions.

The rule. Each row of the global stream (the shuffled, repeated examples every process
walks, pipeline.make_dataset) has a token count: the ``text_mask`` sum of the row that
``ExampleTransform`` makes at that stream position (same QA-turn draw, same truncation to
``data.text_len``). Its bucket is the smallest ``data.text_buckets`` entry >= that count.
``BucketPlanner`` reads the stream in order and keeps one queue per bucket; when a queue
holds a global batch (``data.batch_size`` rows) it becomes the next global batch, padded to
that bucket's length. A row waits at most until its bucket fills (rare buckets wait
longest). A finite stream (``num_epochs``) is cut to a multiple of the global batch, as
without buckets; at its end the rows still queued are sorted by (bucket, position) and cut
into global batches, each padded to its largest row's bucket, so an epoch yields exactly
the rows it yields without buckets.

Multi-host agreement. Every process runs the same planner over the same global stream, so
all of them hold the same sequence of (bucket length, B stream positions) and compile the
same shapes in the same order; process p then builds only rows p, p + P, ... of each
global batch (the rule the unbucketed pipeline uses too), so the union of the processes'
local batches is the single-host batch. The planner needs every row's token count, not
just its own rows': each process reads the *text* of every record of the global stream
(``registry.text_source``: the split's text index, which holds no video) and tokenises
it; frames, the costly part, are made only for its own rows.

Resume. The planner's state (next stream position, the queued positions, global batches
planned so far) is a small JSON dict; the iterator's ``get_state`` after k batches
restores to yield exactly batches k+1, k+2, ... (tests/test_bucketing.py).
"""
from __future__ import annotations

import concurrent.futures
from typing import Sequence

import grain
import numpy as np

from mashvlm_jax.data import chat

TEXT_KEYS = ("text_ids", "text_mask", "labels", "label_mask")


def text_buckets(data_config) -> tuple[int, ...]:
  """``data.text_buckets`` checked: () when unset or empty (no buckets), else strictly
  increasing positive token counts whose last equals ``data.text_len``."""
  given = data_config.get("text_buckets", None)
  if not given:
    return ()
  text_len = int(data_config.text_len)
  try:
    if isinstance(given, (str, bytes)):
      raise TypeError
    buckets = tuple(int(b) for b in given)
  except (TypeError, ValueError):
    raise ValueError(f"data.text_buckets must be a tuple of token counts, found "
                     f"{given!r}") from None
  if any(float(b) != int(b) for b in given):
    raise ValueError(f"data.text_buckets must hold whole token counts, found {tuple(given)}")
  if buckets[0] <= 0 or any(b >= c for b, c in zip(buckets, buckets[1:])):
    raise ValueError(f"data.text_buckets must be positive and strictly increasing, found "
                     f"{buckets}")
  if buckets[-1] != text_len:
    raise ValueError(f"data.text_buckets={buckets} must end with data.text_len={text_len} "
                     f"(rows longer than the last bucket are truncated to it)")
  return buckets


def bucket_index(length: int, buckets: Sequence[int]) -> int:
  """Index of the smallest bucket >= ``length`` tokens (ValueError past the last)."""
  for i, bucket in enumerate(buckets):
    if length <= bucket:
      return i
  raise ValueError(f"a row of {length} tokens is longer than the last bucket {buckets[-1]}")


def padded_share(text_mask: np.ndarray) -> float:
  """Share of the padded text positions of a batch: mean of ``~text_mask`` [B, L]."""
  mask = np.asarray(text_mask, bool)
  return float(1.0 - mask.sum() / mask.size) if mask.size else 0.0


class BucketPlanner:
  """Global stream positions and token counts in stream order -> global batches of one
  bucket each (module docstring). Pure Python; ``get_state``/``set_state`` are JSON."""

  def __init__(self, buckets: Sequence[int], batch_size: int):
    self.buckets, self.batch_size = tuple(int(b) for b in buckets), int(batch_size)
    self.queues: list[list[int]] = [[] for _ in self.buckets]

  def add(self, position: int, length: int) -> tuple[int, list[int]] | None:
    """Queues one row; returns (bucket length, B positions) when its bucket fills."""
    b = bucket_index(int(length), self.buckets)
    queue = self.queues[b]
    queue.append(int(position))
    if len(queue) < self.batch_size:
      return None
    self.queues[b] = []
    return self.buckets[b], queue

  @property
  def queued(self) -> int:
    return sum(len(q) for q in self.queues)

  def flush(self) -> tuple[int, list[int]]:
    """The next global batch at the end of a finite stream: the B queued rows first in
    (bucket, position) order, padded to the largest of their buckets."""
    if self.queued < self.batch_size:
      raise ValueError(f"{self.queued} rows queued, fewer than one global batch of "
                       f"{self.batch_size}: the stream was not cut to whole batches")
    order = sorted((b, p) for b, q in enumerate(self.queues) for p in q)[:self.batch_size]
    taken = set(p for _, p in order)
    self.queues = [[p for p in q if p not in taken] for q in self.queues]
    return self.buckets[order[-1][0]], [p for _, p in order]

  def get_state(self) -> dict:
    return {"queues": [list(q) for q in self.queues]}

  def set_state(self, state: dict) -> None:
    queues = state["queues"]
    if len(queues) != len(self.buckets):
      raise ValueError(f"the data state holds {len(queues)} bucket queues, the config has "
                       f"{len(self.buckets)} data.text_buckets {self.buckets}: resume with "
                       f"the buckets it was saved with")
    self.queues = [[int(p) for p in q] for q in queues]


class TextLength:
  """(stored record, rng) -> token count of the row ``transform`` makes from them.

  Called by ``random_map`` with the seed and stream positions of the example stream, so
  the QA-turn draw is the transform's own (``ExampleTransform.text`` is its first use of
  ``rng``). Rows whose first answer cannot fit count as ``text_len``: the process that
  owns them raises the transform's error when it builds them.
  """

  def __init__(self, transform, decode):
    self.transform, self.decode = transform, decode

  def __call__(self, raw, rng) -> int:
    record = self.decode(raw)
    if not record["qa"]:
      return self.transform.text_len
    try:
      row, _ = self.transform.text(record, rng)
    except chat.TooLongError:
      return self.transform.text_len
    return int(row["text_mask"].sum())


class _PlanIterator(grain.DatasetIterator):
  """Walks the global token-count stream through a BucketPlanner; yields this process's
  (bucket length, stream positions) of every ``worker_count``-th global batch."""

  def __init__(self, plan: "BucketPlan"):
    super().__init__()
    self._plan = plan
    self._planner = BucketPlanner(plan.buckets, plan.batch_size)
    self._position = 0  # next global stream position to read
    self._planned = 0  # global batches planned so far

  def _next_global(self) -> tuple[int, list[int]]:
    plan = self._plan
    while plan.stream_len is None or self._position < plan.stream_len:
      position = self._position
      length = plan.lengths[position]
      self._position += 1
      batch = self._planner.add(position, length)
      if batch is not None:
        return batch
    if self._planner.queued == 0:
      raise StopIteration
    return self._planner.flush()

  def __next__(self) -> dict:
    plan = self._plan
    while True:
      length, positions = self._next_global()
      k = self._planned
      self._planned += 1
      if k % plan.worker_count == plan.worker_index:
        local = positions[plan.process_index::plan.process_count]
        return {"text_len": int(length), "positions": np.asarray(local, np.int64)}

  def get_state(self) -> dict:
    return {"position": self._position, "planned": self._planned,
            **self._planner.get_state()}

  def set_state(self, state: dict) -> None:
    self._planner.set_state(state)
    self._position, self._planned = int(state["position"]), int(state["planned"])


class BucketPlan(grain.IterDataset):
  """IterDataset of this process's plan entries {"text_len": bucket length, "positions":
  int64 [B / P] global stream positions}, one per global batch.

  ``lengths``: MapDataset of the global stream's token counts (position -> int);
  ``stream_len``: the positions to read (None: endless). Grain's worker processes each
  take every W-th global batch (``set_slice``); all of them run the whole plan.
  """

  def __init__(self, lengths: grain.MapDataset, stream_len: int | None,
               buckets: Sequence[int], batch_size: int, process_index: int,
               process_count: int):
    super().__init__()
    self.lengths, self.stream_len = lengths, stream_len
    self.buckets, self.batch_size = tuple(buckets), int(batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.worker_index, self.worker_count = 0, 1

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Grain worker ``sl.start`` of ``sl.step`` (mp_prefetch) takes every step-th batch."""
    if sequential_slice:
      raise ValueError("text buckets support Grain's interleaved worker slices only")
    self.worker_index, self.worker_count = int(sl.start or 0), int(sl.step or 1)

  def __iter__(self) -> _PlanIterator:
    return _PlanIterator(self)

  def __str__(self) -> str:
    return f"BucketPlan(buckets={self.buckets}, batch_size={self.batch_size})"


class LocalBatch:
  """Plan entry -> this process's batch: the rows at its stream positions (``rows``, the
  example MapDataset of the global stream), stacked, text cut to the bucket length."""

  def __init__(self, rows: grain.MapDataset, num_threads: int):
    self.rows, self.num_threads = rows, max(1, int(num_threads))
    self._pool = None

  def __getstate__(self):  # Grain workers receive a copy without the thread pool
    return dict(self.__dict__, _pool=None)

  def __call__(self, entry: dict) -> dict:
    positions = [int(p) for p in entry["positions"]]
    if self.num_threads > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
      rows = list(self._pool.map(self.rows.__getitem__, positions))
    else:
      rows = [self.rows[p] for p in positions]
    length = int(entry["text_len"])
    batch = {}
    for key in rows[0]:
      stacked = np.stack([r[key] for r in rows])
      batch[key] = np.ascontiguousarray(stacked[:, :length]) if key in TEXT_KEYS else stacked
    return batch
