"""TFDS builders writing ArrayRecord (no TensorFlow needed): the synthetic UNSCENE set and
users' own annotated videos. Both write the same features, so one reader serves both.

Stored features of every example (``features(T, S)``):
  id          text    unique within the split ("train/000012", "<json stem>/000003")
  video       uint8   [T, S, S, 3] RGB frames (zlib-compressed on disk)
  source      text    the video file as written in the annotation ("" for synthetic)
  task        text    "synthetic", "instruct", "mvbench/<task>", "unscene"
  kind        text    "typical" | "unusual" | "scene_only" | "" (unknown)
  action      text    action label ("" for scene-only or unknown)
  scene       text    scene label ("" when unknown)
  candidates  [text]  multiple-choice options (MVBench), else empty
  qa          sequence of {i, q, a, task, aspect, pair}: see tasks/__init__.py
Users' data stored as data.storage "jpeg" or "source" replace ``video`` by the encoded
fields of storage.py (JPEG frames or the video file's bytes, sampled at every visit).

Builds are atomic: TFDS writes into an ``incomplete.*`` directory that is renamed only
when every split (and, for the synthetic set, its ``tokenizer.json``) is written, and
removed when the build fails.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from mashvlm_jax.data import annotations, storage, synthetic, tokenizer, video
from mashvlm_jax.data.chat import ChatTemplate
from mashvlm_jax.data.tasks import families, open_ended, train_mix, unscene_binary, vocabulary

log = logging.getLogger("mashvlm.data")

TOKENIZER_FILE = "tokenizer.json"

# Clips per split of the synthetic presets.
SYNTHETIC_PRESETS = {
    "tiny": {"train": 64, "test_typical": 16, "test_unusual": 56, "test_scene_only": 16},
    "default": {"train": 3200, "test_typical": 400, "test_unusual": 448,
                "test_scene_only": 200},
    "large": {"train": 20000, "test_typical": 800, "test_unusual": 896,
              "test_scene_only": 400},
}


class BuildError(RuntimeError):
  """A build that failed on more records than the allowed share; nothing was written."""


class BuildReport:
  """Builder mixin: the project's own console report of a build, replacing TFDS's
  "Downloading and preparing dataset Unknown size ..." lines: one line naming the data
  set, its split sizes and directory, a progress bar over the records, and the time the
  build took. ``planned_sizes()`` gives the split sizes known before the build (or {});
  generators call ``count_records(n)`` as records are done or planned (``planned``)."""

  def planned_sizes(self) -> dict:
    return {}

  def _log_download_bytes(self):  # TFDS hook, called once before the splits are generated
    from tqdm import tqdm
    sizes = self.planned_sizes()
    what = ", ".join(f"{split} {n}" for split, n in sizes.items()) or "sizes from annotations"
    log.info("building data set %s/%s (%s) in %s", self.name, self.builder_config.name, what,
             self.data_dir_root)
    self._build_start = time.perf_counter()
    self._bar = tqdm(total=sum(sizes.values()) or None, desc=f"building {self.name}",
                     unit="record", dynamic_ncols=True)

  def count_records(self, done: int = 0, planned: int = 0) -> None:
    bar = getattr(self, "_bar", None)
    if bar is None:
      return
    if planned:
      bar.total = (bar.total or 0) + planned
      bar.refresh()
    if done:
      bar.update(done)

  def _log_download_done(self):  # TFDS hook, called once the data set is complete
    bar = getattr(self, "_bar", None)
    if bar is not None:
      bar.close()
    log.info("built %s/%s in %.1f s", self.name, self.builder_config.name,
             time.perf_counter() - getattr(self, "_build_start", time.perf_counter()))


def features(num_frames: int, size: int) -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(),
      "video": tfds.features.Tensor(shape=(num_frames, size, size, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
      "source": text(), "task": text(), "kind": text(), "action": text(), "scene": text(),
      "candidates": tfds.features.Sequence(text()),
      "qa": tfds.features.Sequence({"i": text(), "q": text(), "a": text(), "task": text(),
                                    "aspect": text(),
                                    "pair": tfds.features.Tensor(shape=(), dtype=np.int32)}),
  })


def example(*, id, frames, qa, source="", task="", kind="", action="", scene="",
            candidates=()):
  """A dict with every stored feature (see the module docstring)."""
  return {"id": id, "video": frames, "source": source, "task": task, "kind": kind,
          "action": action, "scene": scene, "candidates": list(candidates), "qa": list(qa)}


# ------------------------------------------------------------------------------ synthetic

def vocabulary_texts() -> list[str]:
  """Every string the synthetic generator writes (the union the task modules register,
  tasks/vocabulary.py) plus the default chat markers; sorted, without duplicates."""
  template = ChatTemplate()
  return sorted(set(vocabulary.texts()) | {template.user, template.assistant})


def vocabulary_tokens() -> list[str]:
  """The synthetic word tokenizer's tokens in id order."""
  return tokenizer.word_vocabulary(vocabulary_texts())


def vocabulary_fingerprint() -> str:
  """Fingerprint of the synthetic word vocabulary (tokenizer.vocabulary_fingerprint)."""
  return tokenizer.vocabulary_fingerprint(vocabulary_tokens())


def synthetic_questions(spec: synthetic.ClipSpec, train_negatives: str = "typical",
                        train_tasks: Sequence[str] = (),
                        ctx: families.BuildContext | None = None) -> list[dict]:
  """train: the training mixture (its "No" labels per ``train_negatives``,
  train_mix.questions), then the rows of each family in ``train_tasks`` (families.py;
  ``ctx`` required with them); test splits: UNSCENE binary duals, the open-ended
  description and the short action/scene questions."""
  rng = spec.rng(synthetic.QUESTIONS)
  if spec.split == "train":
    rows = train_mix.questions(spec.action, spec.scene, rng, train_negatives)
    if train_tasks:
      rows += families.family_rows(train_tasks, spec, spec.rng(synthetic.TASKS), ctx)
    return rows
  short = [q for q in train_mix.questions(spec.action, spec.scene, rng)
           if q["task"] in ("action", "scene")]
  return (unscene_binary.questions(spec.action, spec.scene, rng)
          + open_ended.questions(spec.action, spec.scene) + short)


def synthetic_example(spec: synthetic.ClipSpec, num_frames: int, size: int,
                      train_negatives: str = "typical", train_tasks: Sequence[str] = (),
                      seed: int = 0, config=None) -> dict:
  """One stored example; ``config`` (the build's SyntheticConfig) reaches the families
  (BuildContext.config), and a family's clip renderer may draw a training clip."""
  ctx = families.BuildContext(num_frames=num_frames, size=size, seed=seed,
                              train_negatives=train_negatives, config=config)
  frames = None
  if spec.split == "train" and train_tasks:
    frames = families.family_frames(train_tasks, spec, ctx)
  if frames is None:
    frames = synthetic.render_clip(spec, num_frames, size, size)
  return example(id=spec.id, frames=frames,
                 qa=synthetic_questions(spec, train_negatives, train_tasks, ctx),
                 task="synthetic", kind=spec.kind,
                 action=spec.action, scene=spec.scene)


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  preset: str = "default"
  num_frames: int = 8
  size: int = 64
  typical_prob: float = 0.9
  scene_only_share: float = 0.05
  seed: int = 0
  train_size: int = 0  # 0 = the preset's
  test_size: int = 0  # clips per test split; 0 = the preset's
  train_negatives: str = "typical"  # train_mix.NEGATIVES
  train_tasks: tuple = ()  # extra task families of the train split (tasks/families.py)
  vocabulary: str = ""  # fingerprint of the word vocabulary the data is built with

  @property
  def split_sizes(self) -> dict:
    sizes = dict(SYNTHETIC_PRESETS[self.preset])
    for split in sizes:
      override = self.train_size if split == "train" else self.test_size
      sizes[split] = override or sizes[split]
    return sizes


def synthetic_config(preset: str = "default", num_frames: int = 8, size: int = 64,
                     typical_prob: float = 0.9, scene_only_share: float = 0.05,
                     seed: int = 0, train_size: int = 0, test_size: int = 0,
                     train_negatives: str = "typical",
                     train_tasks: Sequence[str] = ()) -> SyntheticConfig:
  """A config whose name spells every parameter and ends in the word vocabulary's
  fingerprint (``_v<12 hex>``), so data built with other parameters or another vocabulary
  never share a directory."""
  if preset not in SYNTHETIC_PRESETS:
    raise ValueError(f"unknown synthetic preset {preset!r}; known: {sorted(SYNTHETIC_PRESETS)}")
  if train_negatives not in train_mix.NEGATIVES:
    raise ValueError(f"data.train_negatives must be one of {train_mix.NEGATIVES}, found "
                     f"{train_negatives!r}")
  train_tasks = families.check_train_tasks(train_tasks)
  if num_frames < 2 or size < 8 or train_size < 0 or test_size < 0:
    raise ValueError(f"synthetic data needs num_frames >= 2, size >= 8 and sizes >= 0, found "
                     f"{num_frames}, {size}, {train_size}, {test_size}")
  name = (f"{preset}_t{num_frames}_s{size}_p{round(typical_prob * 1000)}"
          f"_o{round(scene_only_share * 1000)}_seed{seed}")
  if train_size or test_size:
    name += f"_n{train_size}_{test_size}"
  if train_negatives != "typical":  # the default keeps the names of existing data
    name += f"_neg{train_negatives}"
  if train_tasks:
    name += "_tasks-" + "-".join(train_tasks)
  fingerprint = vocabulary_fingerprint()
  return SyntheticConfig(name=f"{name}_v{fingerprint}", preset=preset, num_frames=num_frames,
                         size=size, typical_prob=typical_prob,
                         scene_only_share=scene_only_share, seed=seed,
                         train_size=train_size, test_size=test_size,
                         train_negatives=train_negatives, train_tasks=train_tasks,
                         vocabulary=fingerprint,
                         description=f"synthetic UNSCENE, {preset} sizes, word vocabulary "
                                     f"{fingerprint}")


class SyntheticUnscene(BuildReport, tfds.core.GeneratorBasedBuilder):
  """Procedural action/scene videos (synthetic.py) with UNSCENE-style questions."""
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Config names end in the word vocabulary's fingerprint."}
  BUILDER_CONFIGS = [synthetic_config(p) for p in SYNTHETIC_PRESETS]
  DEFAULT_CONFIG_NAME = synthetic_config("default").name

  def _info(self):
    cfg = self.builder_config
    return tfds.core.DatasetInfo(builder=self, description=__doc__,
                                 features=features(cfg.num_frames, cfg.size))

  def planned_sizes(self) -> dict:
    return self.builder_config.split_sizes

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in synthetic.SPLITS}

  def _generate_examples(self, split):
    cfg = self.builder_config
    specs = synthetic.clip_specs(split, cfg.split_sizes[split], seed=cfg.seed,
                                 typical_prob=cfg.typical_prob,
                                 scene_only_share=cfg.scene_only_share)
    for spec in specs:
      yield spec.id, synthetic_example(spec, cfg.num_frames, cfg.size, cfg.train_negatives,
                                       cfg.train_tasks, cfg.seed, cfg)
      self.count_records(1)

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is still the incomplete directory here: the tokenizer lands atomically
    # with the data.
    save_word_tokenizer(f"{self.data_dir}/{TOKENIZER_FILE}", self.builder_config.vocabulary)


def save_word_tokenizer(path: str, fingerprint: str) -> None:
  """Writes the synthetic word tokenizer to ``path``; RuntimeError when the registered
  vocabulary no longer has ``fingerprint`` (the one the data set's name carries)."""
  texts = vocabulary_texts()
  found = tokenizer.vocabulary_fingerprint(tokenizer.word_vocabulary(texts))
  if found != fingerprint:
    raise RuntimeError(f"the task modules now register word vocabulary {found}, but the "
                       f"data set at {path} is named for vocabulary {fingerprint}; a task "
                       f"module registered texts after the builder config was made")
  tokenizer.save_atomic(tokenizer.build_word_tokenizer(texts), path)


# ------------------------------------------------------------------------------ users' data

@dataclasses.dataclass(eq=False)
class LocalConfig(tfds.core.BuilderConfig):
  """``sources``: tuples (split, annotation JSON file or directory, video root)."""
  sources: tuple = ()
  num_frames: int = 8
  size: int = 224
  sample_mode: str = "middle"
  max_failure_share: float = 0.05
  predictions: str = ""  # EPIC layout: clip id -> ranked action ids (JSON lines)
  num_threads: int = 4
  seed: int = 0
  storage: storage.StorageSpec = storage.StorageSpec()  # data.storage: raw | jpeg | source
  haca_family: str = "haca"  # rows of VideoCon-style records (local_haca_family)


def local_haca_family(train_tasks: Sequence[str]) -> str:
  """The HACA family ("entailment" | "haca" | "haca_mask") data.train_tasks names for
  users' VideoCon-style records; "haca" when it names none; ValueError when it names more
  than one. (Its other, synthetic-only families do not apply to users' data.)"""
  from mashvlm_jax.data.tasks import haca
  names = [str(n) for n in train_tasks if str(n) in haca.FAMILIES]
  if len(names) > 1:
    raise ValueError(f"data.train_tasks names {len(names)} HACA families {names}; users' "
                     f"VideoCon-style records are turned into the rows of one of "
                     f"{haca.FAMILIES}")
  return names[0] if names else haca.HACA


class LocalVideoQa(BuildReport, tfds.core.GeneratorBasedBuilder):
  """Users' videos with VideoChat2-IT, MVBench, UNSCENE, tracks, EPIC-KITCHENS or HACA
  (VideoCon, VELOCITI, SSv2) annotations or caption rows (annotations.py, captions.py),
  decoded and frame-sampled at build time (video.read_video, ``sample_mode``, no random
  draws), or stored encoded for sampling at every visit (``storage``: jpeg or source,
  storage.py)."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.report = {}

  def _info(self):
    cfg = self.builder_config
    feats = features(cfg.num_frames, cfg.size)
    if cfg.storage.format != "raw":  # encoded frames or the source file (storage.py)
      feats = storage.encoded_features({k: v for k, v in feats.items() if k != "video"})
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=feats)

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = collections.defaultdict(list)
    for split, path, root in self.builder_config.sources:
      splits[split].append((path, root))
    return {split: self._generate_examples(split, sources) for split, sources in splits.items()}

  def _decode(self, item: annotations.Item):
    cfg = self.builder_config
    meta = {}
    try:
      frames = self._read(item, meta)
    except FileNotFoundError as e:
      return None, (str(e), "missing video")
    except video.VideoDecodeError as e:
      return None, (str(e), "undecodable video")
    except storage.SourceTooLarge as e:
      return None, (str(e), "video over data.source_max_mb")
    except ValueError as e:
      return None, (str(e), "bad bounds")
    if item.tracks:  # UTR query rows need the sampled frames (tasks/utr.py)
      from mashvlm_jax.data.tasks import utr
      if cfg.storage.format != "raw":
        return None, (f"field 'tracks': boxes follow the frames sampled at build time, so "
                      f"tracks need data.storage='raw', found {cfg.storage.format!r}",
                      "bad record")
      if any(p[0] is None for t in item.tracks for p in t.points) and not meta["fps"] > 0:
        return None, ("field 'tracks' gives times but the video's fps is unknown",
                      "bad record")
      item = dataclasses.replace(item, qa=utr.track_rows(item.tracks, meta, cfg.size,
                                                         item.seed))
      if not item.qa:
        return None, (f"no track is in every sampled frame (frames {meta['indices'].tolist()}) "
                      f"and at least 1/32 of the {cfg.size}x{cfg.size} frame in each",
                      "no usable track")
    out = example(id=item.key, frames=frames, qa=item.qa, source=item.source,
                  task=item.task, kind=item.kind, action=item.action, scene=item.scene,
                  candidates=item.candidates)
    if isinstance(frames, dict):  # an encoded format's video fields (storage.py)
      out.update(frames)
    return out, None

  def _read(self, item: annotations.Item, meta: dict):
    """The record's video: uint8 [T, S, S, 3] (raw; ``meta`` receives the sampled frame
    indices, fps and decoded size, video.read_video) or the encoded fields (jpeg, source)."""
    cfg = self.builder_config
    if cfg.storage.format == "jpeg":
      return storage.jpeg_record(item.video, cfg.size, cfg.storage, item.start, item.end)
    if cfg.storage.format == "source":
      return storage.source_record(item.video, cfg.storage, item.start, item.end)
    return video.read_video(item.video, cfg.num_frames, cfg.sample_mode, cfg.size,
                            start=item.start, end=item.end, meta=meta)

  def _generate_examples(self, split, sources):
    cfg = self.builder_config
    items, failures = [], []
    predictions = None
    if cfg.predictions:  # a broken predictions file is a configuration error: it raises
      from mashvlm_jax.data import recognizer
      if not os.path.isfile(cfg.predictions):
        raise FileNotFoundError(f"data.mqa_predictions names {cfg.predictions}, which does "
                                f"not exist")
      predictions = recognizer.read_predictions(cfg.predictions, num_classes=None)
    for path, root in sources:
      got, failed = annotations.read_items(path, root, seed=cfg.seed, predictions=predictions,
                                           haca_family=cfg.haca_family)
      items += got
      failures += failed
    for failure in failures:
      log.warning("skipping %s", failure)
    total, written, tracks = len(items) + len(failures), 0, 0
    self.count_records(planned=len(items))
    threads = max(1, cfg.num_threads)
    chunk = 8 * threads  # bounded look-ahead: decoded videos are held until written
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for begin in range(0, len(items), chunk):
        batch = items[begin:begin + chunk]
        for item, (ex, why) in zip(batch, pool.map(self._decode, batch)):
          self.count_records(1)
          if ex is None:
            failure = annotations.Failure(f"record {item.key} (video {item.video})", *why)
            log.warning("skipping %s", failure)
            failures.append(failure)
            continue
          written += 1
          tracks += bool(item.tracks)
          yield item.key, ex
    self.report[split] = {"total": total, "written": written, "tracks": tracks,
                          "failed": [str(f) for f in failures]}
    check_failures(split, total, failures, cfg.max_failure_share)


def check_failures(split: str, total: int, failures: list, max_share: float) -> None:
  """Logs a summary; raises BuildError when the failed share exceeds ``max_share`` or
  nothing usable is left."""
  summary = f"split {split!r}: {len(failures)} of {total} records skipped"
  reasons = collections.Counter(f.category for f in failures)
  if failures:
    log.warning("%s (%s)", summary, "; ".join(f"{n}x {r}" for r, n in reasons.most_common(5)))
  if total == 0 or len(failures) == total:
    raise BuildError(f"{summary}: no usable records. First failures:\n  "
                     + "\n  ".join(str(f) for f in failures[:10]))
  if len(failures) > max_share * total:
    raise BuildError(
        f"{summary} ({len(failures) / total:.1%} > data.max_failure_share = "
        f"{max_share:.1%}); nothing was written. First failures:\n  "
        + "\n  ".join(str(f) for f in failures[:10]))
