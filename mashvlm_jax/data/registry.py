"""From ``config.data`` to TFDS builders, data sources and the tokenizer.

``ensure_built(config)`` builds the configured data set when it is not on disk yet (the
training command calls it, so a fresh machine trains on the first run);
``mashvlm make-data`` calls it explicitly. Either also writes each split's text index
(text_index.py) when missing; ``text_source`` reads it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import time

from mashvlm_jax import paths
from mashvlm_jax.data import builders, storage, text_index
from mashvlm_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger("mashvlm.data")

NAMES = ("synthetic_unscene", "local_video_qa")


def data_dir(config) -> str:
  """config.data.data_dir with ``~`` expanded (the config reads $MASHVLM_DATA_DIR)."""
  return os.path.expanduser(str(config.data.data_dir))


def stored_shape(config) -> tuple[int, int]:
  """(frames, size) written at build time: data.stored_* or, when 0, the model's."""
  d, m = config.data, config.model
  return (int(d.get("stored_frames", 0)) or int(m.num_frames),
          int(d.get("stored_size", 0)) or int(m.vision.image_size))


def sources(config) -> tuple:
  """data.annotations as (split, absolute JSON path, absolute video root) tuples."""
  out = []
  default_root = str(config.data.get("video_root", ""))
  for split, value in dict(config.data.get("annotations", {})).items():
    entries = value if isinstance(value, (list, tuple)) else [value]
    for entry in entries:
      if isinstance(entry, str):
        path, root = entry, default_root
      else:
        entry = dict(entry)
        if "path" not in entry:
          raise ValueError(f"data.annotations[{split!r}] entry {entry} has no 'path'")
        path, root = entry["path"], entry.get("video_root", default_root)
      out.append((split, paths.local_path(path), paths.local_path(root or ".")))
  if not out:
    raise ValueError("data.name='local_video_qa' needs data.annotations: split -> JSON file "
                     "or directory (e.g. {'train': 'it.json'})")
  return tuple(out)


def _stamp(path) -> tuple[int, int] | None:
  """(size in bytes, mtime in ns) of a file, None when it does not exist: what tells a
  changed input file apart in a data set's name."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  st = path.stat()
  return st.st_size, st.st_mtime_ns


def _fingerprint(srcs, params) -> str:
  """Hash of the annotation files (paths, sizes, mtimes) and build parameters."""
  h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
  for split, path, root in srcs:
    h.update(f"{split}|{path}|{root}".encode())
    p = pathlib.Path(path)
    for f in sorted(p.glob("*.json")) if p.is_dir() else [p]:
      stamp = _stamp(f)
      if stamp:
        h.update(f"{f}|{stamp[0]}|{stamp[1]}".encode())
  return h.hexdigest()[:12]


def builder(config):
  """The TFDS builder instance the config names (nothing is built or read)."""
  d = config.data
  storage.check_readable(config)  # gs:// that the readers cannot open: say so at start
  store = storage.spec(config)
  frames, size = stored_shape(config)
  common = dict(data_dir=data_dir(config), file_format="array_record")
  if d.name == "synthetic_unscene":
    cfg = builders.synthetic_config(d.builder_config, frames, size, float(d.typical_prob),
                                    float(d.scene_only_share), int(d.seed),
                                    int(d.get("train_size", 0)), int(d.get("test_size", 0)),
                                    str(d.get("train_negatives", "typical")),
                                    tuple(d.get("train_tasks", ())))
    known = {c.name for c in builders.SyntheticUnscene.BUILDER_CONFIGS}
    return builders.SyntheticUnscene(config=cfg.name if cfg.name in known else cfg, **common)
  if d.name == "local_video_qa":
    srcs = sources(config)
    params = dict(frames=frames, size=size, mode=d.build_sample_mode, seed=int(d.seed),
                  **store.params())
    predictions = str(d.get("mqa_predictions", "") or "")
    if predictions:  # the options change with the file: part of the name
      predictions = paths.local_path(predictions)
      params["predictions"] = [predictions, *(_stamp(predictions) or (None, None))]
    haca_family = builders.local_haca_family(tuple(d.get("train_tasks", ())))
    if haca_family != builders.LocalConfig.haca_family:  # the default keeps existing names
      params["haca_family"] = haca_family
    cfg = builders.LocalConfig(
        name=f"local_{_fingerprint(srcs, params)}", sources=srcs, num_frames=frames,
        size=size, sample_mode=d.build_sample_mode,
        max_failure_share=float(d.max_failure_share), num_threads=int(d.build_threads),
        seed=int(d.seed), storage=store, predictions=predictions, haca_family=haca_family,
        description=f"local annotations {[s[1] for s in srcs]}")
    return builders.LocalVideoQa(config=cfg, **common)
  raise ValueError(f"unknown data.name {d.name!r}; known: {NAMES}")


def ensure_built(config, overwrite: bool = False):
  """Builds the configured data set unless it is already complete; returns the builder
  (with ``report``: per split, records total/written and the skipped ones, when built).

  Builds are atomic (builders.py): an interrupted or failed build leaves nothing a
  reader would take for a finished data set. ``overwrite`` rebuilds a finished one.
  """
  import tensorflow_datasets as tfds
  with tfds_quiet():
    b = builder(config)
    if b.is_prepared() and not overwrite:
      write_text_indexes(config, b)
      return b
    tfds.disable_progress_bar()  # the builders report instead (builders.BuildReport)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite
            else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    b.download_and_prepare(file_format="array_record",
                           download_config=tfds.download.DownloadConfig(download_mode=mode))
    fresh = builder(config)  # a fresh instance reads the finished directory's metadata
  write_text_indexes(config, fresh, rewrite=True)  # a rebuild may hold other records
  fresh.report = getattr(b, "report", {})
  return fresh


def write_text_indexes(config, b, rewrite: bool = False) -> None:
  """Writes the text index (text_index.py) of each split of the built ``b`` that has none
  matching it (every split with ``rewrite``, after a build): one pass over the split's
  records, once per data set. A data set that cannot be written to (a read-only mount)
  keeps working without one, with a warning."""
  for split in sorted(b.info.splits):
    reason = "the data set was just built" if rewrite else text_index.stale_reason(b, split)
    if reason is None:
      continue
    log.info("writing the text index of split %r (%s)", split, reason)
    t0 = time.perf_counter()
    try:
      header = text_index.write(b, split, data_source(config, split, video=False))
    except OSError as e:
      log.warning("could not write the text index of split %r in %s (%s): the bucket "
                  "planner will read the text from the data set, video bytes included",
                  split, b.data_path, e)
      continue
    log.info("wrote %s (%d records, %.1fs)", header, b.info.splits[split].num_examples,
             time.perf_counter() - t0)


@contextlib.contextmanager
def tfds_quiet():
  """Drops TFDS's warnings below ERROR (e.g. "Variant folder ... has no
  dataset_info.json", said of every data set not built yet)."""
  def keep(record):
    return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(keep)
  try:
    yield
  finally:
    absl_logger.removeFilter(keep)


def built_builder(config):
  """The builder, which must be built already (clear error otherwise)."""
  b = builder(config)
  if not b.is_prepared():
    raise FileNotFoundError(
        f"data set {b.name}/{b.builder_config.name} is not built in {data_dir(config)}; run "
        f"`mashvlm make-data --config=<your config>` (or call "
        f"mashvlm_jax.data.registry.ensure_built(config))")
  return b


def data_source(config, split: str, *, video: bool = True):
  """Random-access ArrayRecord source of one split (decoded numpy dicts). ``video=False``
  leaves the video feature undecoded (its stored bytes): for readers of the text and ids
  only (the bucket planner, record scans), since the frames are most of a record's decode
  time."""
  b = built_builder(config)
  if split not in b.info.splits:
    raise ValueError(f"split {split!r} is not in {b.name}/{b.builder_config.name}; "
                     f"known: {sorted(b.info.splits)}")
  if video:
    return b.as_data_source(split=split)
  import tensorflow_datasets as tfds
  return b.as_data_source(split=split, decoders={"video": tfds.decode.SkipDecoding()})


def text_source(config, split: str):
  """The split's records for readers of their text and ids only (the bucket planner,
  record scans): its text index (text_index.py), which holds no video, when the data set
  has a matching one, else ``data_source(config, split, video=False)``. Items are the
  same dicts either way, except ``video`` (b"" from the index, undecoded bytes else)."""
  index = text_index.open_source(built_builder(config), split)
  return index if index is not None else data_source(config, split, video=False)


def load_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """data.tokenizer: kind "word" (stored with the synthetic data), "hf" or "sentencepiece"
  (data.tokenizer.path). Checks that the ids fit model.llm.vocab_size; a stored word
  tokenizer must have the vocabulary the data set was built for (check_word_tokenizer)."""
  t = config.data.tokenizer
  if t.kind == "word":
    _require_synthetic(config)
    b = built_builder(config)
    path = pathlib.Path(str(b.data_path)) / builders.TOKENIZER_FILE
    if not path.exists():  # deterministic: rebuild a lost file from the vocabulary
      builders.save_word_tokenizer(str(path), b.builder_config.vocabulary)
    tok = tokenizer_lib.Tokenizer(str(path), "hf", t.bos, t.eos)
    check_word_tokenizer(tok, b.builder_config.vocabulary)
    check_template_words(config, tok)
  else:
    tok = _file_tokenizer(config)
  vocab = int(config.model.llm.vocab_size)
  if tok.vocab_size > vocab:
    added = (f" after adding the {tok.extra} token that data.train_tasks "
             f"{list(config.data.get('train_tasks', ()))} masks captions with: the embedding "
             f"table has no room for it; give model.llm.vocab_size >= {tok.vocab_size} "
             f"(resizing the imported embeddings) or train without masking rows"
             if tok.extra and tok.extra_id >= vocab else "")
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but "
                     f"model.llm.vocab_size is {vocab}{added}")
  return tok


def _require_synthetic(config) -> None:
  if config.data.name != "synthetic_unscene":
    raise ValueError("data.tokenizer.kind='word' only exists for the synthetic set; set "
                     "data.tokenizer.kind='hf' or 'sentencepiece' and data.tokenizer.path")


def _file_tokenizer(config) -> tokenizer_lib.Tokenizer:
  t = config.data.tokenizer
  if not t.path:
    raise ValueError(f"data.tokenizer.kind={t.kind!r} needs data.tokenizer.path")
  return tokenizer_lib.Tokenizer(os.path.expanduser(str(t.path)), t.kind, t.bos, t.eos,
                                 extra=mask_token(config))


def mask_token(config) -> str:
  """tokenizer.MASK when data.train_tasks trains with masking rows (HACA's haca_mask, whose
  masked words must each be one token), else "" (the user's tokenizer as it is)."""
  from mashvlm_jax.data.tasks import haca
  return tokenizer_lib.MASK if haca.HACA_MASK in tuple(config.data.get("train_tasks", ())) else ""


def check_word_tokenizer(tok: tokenizer_lib.Tokenizer, fingerprint: str) -> None:
  """ValueError naming the file and both fingerprints when a stored word tokenizer's
  vocabulary is not ``fingerprint`` (the one its data set was built for): its token ids
  would differ from the ones the task modules' vocabulary gives."""
  found = tok.fingerprint
  if found != fingerprint:
    raise ValueError(
        f"stored word tokenizer {tok.path} has vocabulary {found} ({tok.vocab_size} "
        f"tokens), but the data set beside it is built for vocabulary {fingerprint}, the "
        f"one the task modules register (mashvlm_jax/data/tasks); its token ids would "
        f"shift. Delete {pathlib.Path(tok.path).parent} and run `mashvlm make-data` again.")


def check_template_words(config, tok: tokenizer_lib.Tokenizer) -> None:
  """ValueError naming the data.template field whose words the word tokenizer lacks (they
  would all read as <unk>)."""
  known = set(tok.tokens())
  for field in ("system", "user", "assistant"):
    value = str(config.data.template.get(field, ""))
    unknown = [w for w in tokenizer_lib.split_words(value) if w not in known]
    if unknown:
      raise ValueError(
          f"data.template.{field}={value!r} has words the synthetic word tokenizer "
          f"{tok.path} does not know: {unknown}; use the task modules' words "
          f"(mashvlm_jax/data/tasks) or the default markers 'USER:' and 'ASSISTANT:'")


# ------------------------------------------------------------------------------ checkpoints

VOCABULARY_FILE = "vocabulary.json"  # vocabulary_record(config), beside model_config.json


def vocabulary_record(config) -> dict:
  """{"kind", "fingerprint", "size", "tokenizer"} of the tokenizer ``config.data`` names,
  to store with parameters so they are never used with other token ids. The word kind's
  comes from the task modules' registered texts (no data needed); "hf" and
  "sentencepiece" from data.tokenizer.path."""
  kind = str(config.data.tokenizer.kind)
  if kind == "word":
    _require_synthetic(config)
    tokens = builders.vocabulary_tokens()
    source = "synthetic word vocabulary (mashvlm_jax/data/tasks)"
  else:
    tok = _file_tokenizer(config)
    tokens, source = tok.tokens(), tok.path
  return {"kind": kind, "fingerprint": tokenizer_lib.vocabulary_fingerprint(tokens),
          "size": len(tokens), "tokenizer": source}


def check_vocabulary(config, record: dict, where: str) -> None:
  """ValueError naming ``where`` (the stored record's file), the field and both
  fingerprints when ``record`` (a stored vocabulary_record) is not the vocabulary of
  ``config``'s tokenizer."""
  if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
    raise ValueError(f"{where}: expected a JSON object with a string field 'fingerprint' "
                     f"(registry.vocabulary_record), found {record!r}")
  current = vocabulary_record(config)
  if record["fingerprint"] != current["fingerprint"]:
    raise ValueError(
        f"{where}: field 'fingerprint' is {record['fingerprint']} ({record.get('size', '?')} "
        f"tokens, {record.get('kind', '?')} tokenizer {record.get('tokenizer', '?')}), but "
        f"the config's tokenizer has vocabulary {current['fingerprint']} ({current['size']} "
        f"tokens, {current['kind']} tokenizer {current['tokenizer']}): these parameters "
        f"were trained with other token ids. Set data.tokenizer to the tokenizer they were "
        f"trained with, or train again.")


def check_vocabulary_file(config, path) -> None:
  """check_vocabulary against the JSON file ``path`` (local or gs://); no-op when there is
  none (checkpoints written before the file existed, import-hf outputs)."""
  from etils import epath
  path = epath.Path(path)
  if not path.exists():
    return
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  check_vocabulary(config, record, str(path))
