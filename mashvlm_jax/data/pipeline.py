"""The Grain input pipeline: TFDS ArrayRecord source -> seeded per-epoch shuffle -> frames
(resample, optional random resized crop / flip) -> chat template -> tokens, answer-only
labels, truncation (chat.py), padding -> per-process share of each global batch -> batch
-> worker processes. The iterator's state is checkpointable (``get_state``/``set_state``).

With ``data.text_buckets`` (e.g. (128, 256, 512)) each batch's text is padded to the
smallest bucket that holds all its rows instead of data.text_len (buckets.py: the rule,
the multi-host agreement, exact resume); without them every batch has L = data.text_len.

BATCH CONTRACT (per process; B = data.batch_size / process_count, L = data.text_len or
the batch's bucket):
  frames      uint8   [B, T, H, W, 3]  raw RGB 0..255 at the model's frame count and
                                       resolution. CLIP mean/std normalisation happens on
                                       device inside the model (model/vision.py
                                       normalize_frames): uint8 is 4x smaller to ship.
  text_ids    int32   [B, L]  the chat text (chat.py), right-padded with the pad id
  text_mask   bool    [B, L]  True on real tokens
  labels      int32   [B, L]  labels[:, i] = text_ids[:, i + 1]; 0 where there is none
  label_mask  float32 [B, L]  1.0 exactly where labels[:, i] is an answer token (answers
                              and their </s>), else 0
Loss = sum(label_mask * xent(logits, labels)) / sum(label_mask).
With data.storage "jpeg" or "source" (storage.py) batches also carry read_failures int32
[B]: the undecodable records skipped before each row (the trainer logs their sum).
With model.action_token.enabled (model/action_token.py) one more key:
  class_labels int32 [B, 3]   (verb, noun, action) class ids of the clip, -1 where it has
                              none (synthetic: tasks/mqa.clip_labels of the record's action
                              and scene, -1 for scene-only clips; users' data: -1 unless
                              the record carries a ``class_labels`` field)
"""
from __future__ import annotations

import logging

import grain
import numpy as np

from mashvlm_jax.data import buckets as buckets_lib
from mashvlm_jax.data import chat, frames as frames_lib, registry, row_filter
from mashvlm_jax.data import storage as storage_lib
from mashvlm_jax.data.tasks import families
from mashvlm_jax.data.registry import ensure_built  # noqa: F401  (the trainer's entry)

log = logging.getLogger("mashvlm.data")

BATCH_KEYS = ("frames", "text_ids", "text_mask", "labels", "label_mask")
ACTION_KEYS = ("class_labels",)  # with model.action_token.enabled
NO_CLASS = (-1, -1, -1)


def batch_keys(action_token: bool) -> tuple[str, ...]:
  """The batch contract's keys (module docstring), with or without the action token's."""
  return BATCH_KEYS + (ACTION_KEYS if action_token else ())


def action_token_enabled(config) -> bool:
  """model.action_token.enabled of a config (False when the section is absent)."""
  return bool(dict(config.model.get("action_token", None) or {}).get("enabled", False))


def record_class_labels(raw: dict, record: dict, synthetic: bool) -> np.ndarray:
  """int32 [3] (verb, noun, action) of a record: its ``class_labels`` field when it has
  one, else on the synthetic set tasks/mqa.clip_labels(action, scene), else -1s."""
  if "class_labels" in raw:
    labels = np.asarray(raw["class_labels"])
    if labels.shape != (3,) or not np.issubdtype(labels.dtype, np.integer) or (
        labels < -1).any():
      raise ValueError(f"example {record['id']!r}: class_labels must be 3 integer class ids "
                       f"(verb, noun, action) >= -1, found {raw['class_labels']!r}")
    return labels.astype(np.int32)
  if synthetic:
    from mashvlm_jax.data.tasks import mqa
    labels = mqa.clip_labels(record["action"], record["scene"])
    return np.asarray(NO_CLASS if labels is None else labels, np.int32)
  return np.asarray(NO_CLASS, np.int32)
QA_MODES = ("sample", "all")


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


HEADER_FIELDS = ("id", "source", "task", "kind", "action", "scene")


def record_header(raw: dict) -> dict:
  """A data-source example's text fields (``HEADER_FIELDS``) as ``str``: all a reader of
  ids and tasks needs, from ``registry.text_source`` too."""
  return {k: _text(raw[k]) for k in HEADER_FIELDS}


def decode_record(raw: dict) -> dict:
  """A data-source example with text as ``str`` and ``qa`` as a list of dicts.

  Fields: id, video (uint8 [T, H, W, 3]), source, task, kind, action, scene (str),
  candidates (list of str), qa (list of {i, q, a, task, aspect: str, pair: int}).
  """
  out = record_header(raw)
  out["video"] = storage_lib.stored_video(raw)  # an EncodedClip for jpeg/source storage
  out["candidates"] = [_text(c) for c in raw["candidates"]]
  qa = raw["qa"]
  fields = ("i", "q", "a", "task", "aspect")
  out["qa"] = [dict({f: _text(qa[f][k]) for f in fields}, pair=int(qa["pair"][k]))
               for k in range(len(qa["q"]))]
  return out


def check_template(tok, template: chat.ChatTemplate) -> None:
  """Errors when the template's text maps to <unk> (e.g. a word tokenizer that lacks it)."""
  unk = tok.unk_id
  for name in ("system", "user", "assistant"):
    text = getattr(template, name)
    if unk is not None and text and unk in tok.encode(text):
      raise ValueError(f"data.template.{name}={text!r} has words outside the vocabulary of "
                       f"{tok.path}; use words the tokenizer knows")


class ExampleTransform:
  """record (raw data-source dict) + rng -> one row of the batch contract (no B axis).

  ``augment``: None, or a dict with random_resized_crop, crop_scale, crop_ratio, flip.
  Without augmentation frames are resampled with ``middle`` and centre-resized.
  """

  def __init__(self, tok, template: chat.ChatTemplate, text_len: int, num_frames: int,
               image_size: int, qa_mode: str = "sample", sample_mode: str = "rand",
               augment: dict | None = None, class_labels: str | None = None):
    if qa_mode not in QA_MODES:
      raise ValueError(f"data.qa_mode must be one of {QA_MODES}, found {qa_mode!r}")
    check_template(tok, template)
    self.tok, self.template, self.text_len = tok, template, int(text_len)
    self.num_frames, self.image_size = int(num_frames), int(image_size)
    self.qa_mode, self.sample_mode, self.augment = qa_mode, sample_mode, augment
    # None: no class_labels key; "synthetic" | "records": how rows get them
    self.class_labels = class_labels

  def frames(self, video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    aug = self.augment
    mode = self.sample_mode if aug else "middle"
    # jpeg/source storage: the VideoChat2 rule over the stored or source frames, per visit
    video = storage_lib.model_frames(video, self.num_frames, mode, self.image_size, rng)
    video = frames_lib.resample(video, self.num_frames, mode, rng)
    if aug and aug.get("random_resized_crop"):
      video = frames_lib.random_resized_crop(video, rng, self.image_size,
                                             tuple(aug["crop_scale"]), tuple(aug["crop_ratio"]))
    else:
      video = frames_lib.resize(video, self.image_size)
    if aug and aug.get("flip") and rng.random() < 0.5:
      video = video[:, :, ::-1]
    return np.ascontiguousarray(video, np.uint8)

  def turns(self, qa: list, rng: np.random.Generator) -> list:
    """The visit's QA turns (one drawn, or all), each re-rendered for this visit
    (tasks/families.render_visit: shuffled options, masked words)."""
    if self.qa_mode == "sample":
      qa = [qa[int(rng.integers(len(qa)))]]
    return [families.render_visit(row, rng) for row in qa]

  def text(self, record: dict, rng: np.random.Generator) -> tuple[dict, dict]:
    """(text arrays of the row, truncation report) for a decoded record. Draws the QA
    turn: the first use of ``rng`` (buckets.TextLength repeats it to count tokens)."""
    if not record["qa"]:
      raise ValueError(f"example {record['id']!r} has no question/answer turns")
    return chat.encode_example(self.tok, self.template, self.turns(record["qa"], rng),
                               self.text_len, record["id"])

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    record = decode_record(raw)
    row, report = self.text(record, rng)
    if any(report.values()):
      _warn_truncated(record["id"], self.text_len, report)
    row["frames"] = self.frames(record["video"], rng)
    if self.class_labels is not None:
      row["class_labels"] = record_class_labels(raw, record, self.class_labels == "synthetic")
    return row


_truncated = {"count": 0}


def _warn_truncated(example_id: str, text_len: int, report: dict) -> None:
  """Logs the first 20 truncated examples of a process, then every 1000th."""
  _truncated["count"] += 1
  n = _truncated["count"]
  if n <= 20 or n % 1000 == 0:
    log.warning("example %s truncated to data.text_len=%d: %s (%d truncated so far in this "
                "process)", example_id, text_len, report, n)


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  return int(process_index), int(process_count)


def example_transform(config, split: str, augment: bool | None = None) -> ExampleTransform:
  """The per-example transform the config describes (augmentation: train split only,
  unless ``augment`` says otherwise)."""
  d = config.data
  augment = (split == d.train_split) if augment is None else augment
  if split == d.train_split:
    from mashvlm_jax.data.tasks import utr
    utr.check_config(config, augment)  # UTR rows: text_len; crop/flip would move boxes
  return ExampleTransform(
      registry.load_tokenizer(config), chat.ChatTemplate(**dict(d.template)), d.text_len,
      config.model.num_frames, config.model.vision.image_size, d.qa_mode, d.sample_mode,
      dict(d.augment) if augment else None,
      class_labels=(("synthetic" if d.name == "synthetic_unscene" else "records")
                    if action_token_enabled(config) else None))


def shard(ds: grain.MapDataset, process_index: int, process_count: int,
          equal: bool, multiple: int = 1) -> grain.MapDataset:
  """Process ``process_index``'s share: positions process_index, +process_count, ...
  With ``equal`` the stream is first cut to a multiple of ``multiple`` (a multiple of
  process_count), so every process holds the same number of examples (finite epochs must
  give every host the same steps)."""
  if equal:
    ds = ds[:len(ds) - len(ds) % multiple]
  return ds[process_index::process_count]


def make_dataset(config, split: str, *, process_index=None, process_count=None, seed=None,
                 shuffle=True, num_epochs=None, augment=None) -> grain.IterDataset:
  """The batched IterDataset behind ``make_iterator`` (same arguments)."""
  d = config.data
  if str(d.num_workers) == "auto":  # Grain's performance tooling picks workers and buffer
    config = _with_auto_workers(config, split, process_index=process_index,
                                process_count=process_count, seed=seed, shuffle=shuffle,
                                num_epochs=num_epochs, augment=augment)
    d = config.data
  process_index, process_count = _process(process_index, process_count)
  if d.batch_size % process_count:
    raise ValueError(f"data.batch_size={d.batch_size} (global) is not divisible by the "
                     f"process count {process_count}")
  seed = int(config.get("seed", 0) if seed is None else seed)
  buckets = buckets_lib.text_buckets(d)
  ds = grain.MapDataset.source(registry.data_source(config, split))
  ds = row_filter.apply(ds, config, split)  # data.row_filter: only the kept QA rows
  if len(ds) < d.batch_size:
    raise ValueError(f"split {split!r} has {len(ds)} examples, fewer than one global batch "
                     f"(data.batch_size={d.batch_size})")
  # Every process walks the same global stream (shuffle and augmentation keyed by the
  # stream position; repeat() folds in the epoch) and takes positions p, p+P, ...: global
  # batch k is stream[k*B:(k+1)*B] (with data.text_buckets: the planner's k-th global
  # batch, buckets.py) whatever the number of processes, so a multi-host run trains on
  # exactly the batches of a single-host run.
  stream = np.random.SeedSequence([seed]).generate_state(2)

  def walk(records: grain.MapDataset, fn) -> grain.MapDataset:
    """The global stream: seeded shuffle, ``fn`` keyed by stream position, repeat."""
    if shuffle:
      records = records.shuffle(seed=int(stream[0]))
    records = records.random_map(fn, seed=int(stream[1]))
    if encoded and fn is transform:  # undecodable records: skipped, counted, bounded
      records = storage_lib.SkipCorrupt(
          records, float(d.get("max_read_failure_share", storage_lib.MAX_READ_FAILURE_SHARE)))
    return records.repeat(num_epochs)

  transform = example_transform(config, split, augment)
  encoded = storage_lib.spec(config).format != "raw"
  if encoded and buckets:
    raise ValueError(f"data.text_buckets is not supported with data.storage="
                     f"{d.storage!r} yet: a skipped undecodable record's replacement can be "
                     f"longer than its planned bucket; set data.text_buckets=()")
  ds = walk(ds, transform)
  if buckets:
    # The same walk over the records' text gives every row's token count (buckets.py).
    text_only = registry.text_source(config, split)
    text = row_filter.apply(grain.MapDataset.source(text_only), config, split)
    lengths = walk(text, buckets_lib.TextLength(transform, decode_record))
    stream_len = None if num_epochs is None else len(ds) - len(ds) % d.batch_size
    it = buckets_lib.BucketPlan(lengths, stream_len, buckets, d.batch_size, process_index,
                                process_count).map(buckets_lib.LocalBatch(ds, d.num_threads))
    if int(d.num_workers) == 0:
      rows = d.batch_size // process_count
      it = grain.experimental.ThreadPrefetchIterDataset(
          it, prefetch_buffer_size=max(1, int(d.prefetch_buffer_size) // rows))
  else:
    ds = shard(ds, process_index, process_count, equal=num_epochs is not None,
               multiple=d.batch_size)
    ds = ds.batch(d.batch_size // process_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(d.num_threads), prefetch_buffer_size=int(d.prefetch_buffer_size)))
  if int(d.num_workers) > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; outside absl.app
      flags.FLAGS.mark_as_parsed()   # (scripts, notebooks, tests) use their defaults.
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  return it


def _with_auto_workers(config, split: str, **kwargs):
  """A copy of ``config`` with data.num_workers and data.prefetch_buffer_size chosen by
  storage.auto_performance over the same pipeline built without workers."""
  _, process_count = _process(kwargs["process_index"], kwargs["process_count"])
  rows = int(config.data.batch_size) // process_count
  probe = config.copy_and_resolve_references()
  with probe.data.ignore_type():  # the field holds the string "auto"
    probe.data.num_workers = 0
    probe.data.batch_size = process_count  # one row per batch: the tool reads 10 rows,
    # not 10 batches, and sizes per row against the budget's share of one row
    workers, buffer = storage_lib.auto_performance(probe, make_dataset(probe, split, **kwargs),
                                                   rows_per_batch=rows)
  out = config.copy_and_resolve_references()
  with out.data.ignore_type():
    out.data.num_workers, out.data.prefetch_buffer_size = workers, buffer
  return out


def make_iterator(config, split: str, *, process_index=None, process_count=None, seed=None,
                  shuffle=True, num_epochs=None, augment=None) -> grain.DatasetIterator:
  """Iterator of per-process batches (module docstring) with get_state()/set_state().

  Args:
    split: a split of the configured data set (e.g. config.data.train_split).
    process_index, process_count: this process's shard; default jax.process_index() and
      jax.process_count(). data.batch_size is global and must divide by process_count.
    seed: shuffle/augmentation seed (default config.seed); every epoch is reshuffled.
    shuffle: False keeps the stored order (e.g. for evaluation).
    num_epochs: None repeats forever; otherwise the iterator stops after that many
      passes (the last partial batch is dropped).
    augment: None = augmentation on the train split only.
  """
  return iter(make_dataset(config, split, process_index=process_index,
                           process_count=process_count, seed=seed, shuffle=shuffle,
                           num_epochs=num_epochs, augment=augment))


class _EvalRecord:
  """raw -> decode_record with ``video`` replaced by ``frames`` at the model's shape."""

  def __init__(self, num_frames: int, image_size: int):
    self.num_frames, self.image_size = num_frames, image_size

  def __call__(self, raw):
    record = decode_record(raw)
    video = storage_lib.model_frames(record.pop("video"), self.num_frames, "middle",
                                     self.image_size)
    video = frames_lib.resample(video, self.num_frames, "middle")
    record["frames"] = frames_lib.resize(video, self.image_size)
    return record


def make_eval_records(config, split: str, *, process_index: int = 0,
                      process_count: int = 1) -> grain.MapDataset:
  """Random-access raw examples for evaluators, in stored order (optionally sharded).

  Each record: id, source, task, kind ("typical" | "unusual" | "scene_only" | ""),
  action, scene (str), candidates (list of str), qa (list of {i, q, a, task, aspect:
  str, pair: int}; UNSCENE duals share ``pair`` and have task "unscene_binary"), frames
  (uint8 [T, H, W, 3] at the model's shape, middle-frame sampling). Prompts for
  generation: chat.encode_prompt(registry.load_tokenizer(config), template, q, i).
  """
  ds = grain.MapDataset.source(registry.data_source(config, split))
  ds = shard(ds, process_index, process_count, equal=False)
  return ds.map(_EvalRecord(config.model.num_frames, config.model.vision.image_size))


def num_examples(config, split: str) -> int:
  return len(registry.data_source(config, split))
