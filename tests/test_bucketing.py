"""Text-length buckets (data/buckets.py): the bucket rule and planner by hand, one bucket
per batch at its length, an epoch's rows equal to the unbucketed epoch's, exact resume
mid-stream (the iterator, and the state the trainer checkpoints), processes agreeing on
every step's bucket, the trainer's padded_share against a count from the batches, and the
text index the planner reads (record by record against the data set; the same batches
without it)."""
import hashlib
import json

import ml_collections
import numpy as np
import pytest

from conftest import load_config
from mashvlm_jax.data import buckets, pipeline
from mashvlm_jax.train import checkpoint
from test_data_pipeline import config  # noqa: F401  (fixture: the tiny set, built, batch 8)

BUCKETS = (16, 20, 32)  # the tiny set's rows hold 12..27 tokens (text_len 32)
TEXT_KEYS = ("text_ids", "text_mask", "labels", "label_mask")


def with_buckets(config, value=BUCKETS, **data):
  out = config.copy_and_resolve_references()
  out.data.text_buckets = value
  out.data.update(data)
  return out


def take(config, n, split="train", state=None, **kwargs):
  """n batches (all of them when n is None) and the iterator state after them."""
  kwargs = dict(dict(process_index=0, process_count=1), **kwargs)
  it = pipeline.make_iterator(config, split, **kwargs)
  if state is not None:
    it.set_state(state)
  batches = list(it) if n is None else [next(it) for _ in range(n)]
  after = it.get_state()
  it.close()
  return batches, after


def same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def rows(batches):
  """Each row as (digest of its frames and unpadded text, its real token count)."""
  out = []
  for batch in batches:
    for i in range(len(batch["frames"])):
      n = int(batch["text_mask"][i].sum())
      h = hashlib.sha1(np.ascontiguousarray(batch["frames"][i]).tobytes())
      for key in TEXT_KEYS:
        h.update(np.ascontiguousarray(batch[key][i][:n]).tobytes())
      out.append((h.hexdigest(), n))
  return out


def test_bucket_rule_planner_and_config_checks_by_hand():
  assert [buckets.bucket_index(n, (4, 8, 16)) for n in (1, 4, 5, 8, 9, 16)] == [0, 0, 1, 1, 2, 2]
  with pytest.raises(ValueError, match="longer than the last bucket 16"):
    buckets.bucket_index(17, (4, 8, 16))
  planner = buckets.BucketPlanner((4, 8, 16), batch_size=2)
  out = [planner.add(p, n) for p, n in enumerate([3, 9, 5, 2, 16, 7, 1, 1, 6])]
  assert out == [None, None, None, (4, [0, 3]), (16, [1, 4]), (8, [2, 5]), None, (4, [6, 7]),
                 None]
  state = json.loads(json.dumps(planner.get_state()))
  assert state == {"queues": [[], [8], []]}
  planner = buckets.BucketPlanner((4, 8, 16), batch_size=2)
  for p, n in enumerate([12, 3, 16, 6]):
    planner.add(p, n)  # (16, [0, 2]) leaves 1 (bucket 4) and 3 (bucket 8) queued
  assert planner.flush() == (8, [1, 3])  # the end of a finite stream: mixed, padded up
  with pytest.raises(ValueError, match="0 rows queued"):
    planner.flush()
  with pytest.raises(ValueError, match="2 bucket queues.*3 data.text_buckets"):
    planner.set_state({"queues": [[], []]})
  assert buckets.padded_share(np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)) == 5 / 8

  data = load_config("tiny_synthetic").data  # text_len 32
  assert buckets.text_buckets(data) == ()
  for bad, message in [((16, 24), "must end with data.text_len=32"),
                       ((16, 8, 32), "strictly increasing"), ((0, 32), "positive"),
                       (("a", 32), "tuple of token counts"), ((16.5, 32), "whole token")]:
    data.text_buckets = bad
    with pytest.raises(ValueError, match=message):
      buckets.text_buckets(data)
  data.text_buckets = (16, 32)
  assert buckets.text_buckets(data) == (16, 32)
  typed = ml_collections.ConfigDict(dict(text_len=32, text_buckets="16,32"))  # a str field
  with pytest.raises(ValueError, match="tuple of token counts, found '16,32'"):
    buckets.text_buckets(typed)


def test_every_batch_is_one_bucket_at_its_length(config):
  batches, _ = take(with_buckets(config), 12, seed=3)
  plain, _ = take(config, 1)
  lengths = set()
  for batch in batches:
    length = batch["text_ids"].shape[1]
    lengths.add(length)
    assert length in BUCKETS
    for key in TEXT_KEYS:
      assert batch[key].shape == (8, length) and batch[key].dtype == plain[0][key].dtype
    assert batch["frames"].shape == plain[0]["frames"].shape
    for i in range(8):  # every row's smallest bucket is the batch's (an endless stream)
      n = int(batch["text_mask"][i].sum())
      assert batch["text_mask"][i][:n].all() and not batch["text_mask"][i][n:].any()
      assert BUCKETS[buckets.bucket_index(n, BUCKETS)] == length
      assert not batch["label_mask"][i][n - 1:].any() and not batch["labels"][i][n - 1:].any()
  assert lengths == set(BUCKETS)  # all three buckets occur in 12 batches


def test_one_bucket_of_text_len_gives_the_unbucketed_batches(config):
  """Bucketing's own path (token counts, planner, row reads by stream position) with a
  single bucket must make exactly Grain's shard-and-batch batches."""
  want, _ = take(config, 10, seed=5)
  got, _ = take(with_buckets(config, (32,)), 10, seed=5)
  assert same(got, want)


def test_epoch_holds_the_unbucketed_epochs_rows_with_less_padding(config):
  want, _ = take(config, None, split="test_unusual", num_epochs=1, augment=False)
  got, _ = take(with_buckets(config), None, split="test_unusual", num_epochs=1, augment=False)
  assert len(got) == len(want) == 7  # 56 clips, batch 8
  assert sorted(rows(got)) == sorted(rows(want))
  padded = lambda bs: sum((~b["text_mask"]).sum() for b in bs) / sum(b["text_mask"].size
                                                                        for b in bs)
  assert padded(got) < 0.5 * padded(want)


def test_resume_mid_stream_is_exact(config):
  cfg = with_buckets(config)
  first, state = take(cfg, 3, seed=7)
  state = checkpoint.decode_data_state(checkpoint.encode_data_state(state))  # as saved
  expected, _ = take(cfg, 9, seed=7)
  resumed, _ = take(cfg, 6, seed=7, state=state)
  assert same(first + resumed, expected)  # crosses into the second epoch (8 per epoch)
  other, _ = take(cfg, 3, seed=8)
  assert not same(other, first)


def test_processes_agree_on_every_steps_bucket(config):
  single, _ = take(with_buckets(config), 6, seed=2)
  parts = [take(with_buckets(config), 6, seed=2, process_index=i, process_count=2)[0]
           for i in range(2)]
  for k in range(6):
    length = single[k]["text_ids"].shape[1]
    assert [p[k]["text_ids"].shape for p in parts] == [(4, length), (4, length)]
    assert sorted(rows([parts[0][k]]) + rows([parts[1][k]])) == sorted(rows([single[k]]))


def test_two_workers_match_zero_workers_and_restore(config):
  cfg = with_buckets(config, num_workers=2)
  first, state = take(cfg, 3)
  rest, _ = take(cfg, 3, state=state)
  serial, _ = take(with_buckets(config), 6)
  assert same(first + rest, serial)


def test_trainer_logs_padded_share_and_saves_an_exact_data_state(config, tmp_path):
  from mashvlm_jax.train import trainer
  cfg = with_buckets(config, (16, 32), batch_size=4)
  cfg.update(total_steps=4, checkpoint_every=4, log_every=1, log_batch_fingerprints=True,
             async_checkpointing=False)
  trainer.train(cfg, str(tmp_path))
  batches, _ = take(cfg, 7, seed=int(cfg.seed))  # the trainer's stream, read independently
  assert {b["text_ids"].shape[1] for b in batches[:4]} == {16, 32}
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [1, 2, 3, 4]
  for row, batch in zip(logged, batches):
    mask = batch["text_mask"]
    assert row["text_len"] == mask.shape[1]
    assert row["padded_share"] == pytest.approx(np.count_nonzero(mask == 0) / mask.size)
  seen = [json.loads(l)["batch"] for l in (tmp_path / "batches.jsonl").read_text().splitlines()]
  assert seen == [trainer.batch_fingerprint(b) for b in batches[:4]]
  # the data state saved with step 4 (queued rows included) continues with batches 5..7
  saved = tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json"
  resumed, _ = take(cfg, 3, seed=int(cfg.seed),
                    state=checkpoint.decode_data_state(saved.read_text()))
  assert same(resumed, batches[4:])


def test_text_index_holds_each_record_without_its_video(config):
  from mashvlm_jax.data import registry, text_index
  b = registry.built_builder(config)
  for split in sorted(b.info.splits):
    index = registry.text_source(config, split)
    source = registry.data_source(config, split, video=False)
    assert isinstance(index, text_index.TextIndexSource) and len(index) == len(source)
    for i in range(len(source)):
      raw, stored = source[i], index[i]
      assert stored["video"] == b"" and len(raw["video"]) > 0  # the data set's zlib bytes
      want, got = pipeline.decode_record(raw), pipeline.decode_record(stored)
      del want["video"], got["video"]
      assert got == want, (split, i)
    assert [pipeline.record_header(r) for r in index.__getitems__([2, 0])] == [
        pipeline.record_header(source[2]), pipeline.record_header(source[0])]


def test_bucketed_batches_read_the_index_and_equal_those_without_it(config, monkeypatch,
                                                                   caplog):
  from mashvlm_jax.data import registry, text_index
  cfg = with_buckets(config)
  original = registry.data_source

  def no_text_reads(config, split, *, video=True):
    assert video, "the planner read the data set's records for their text"
    return original(config, split, video=video)
  monkeypatch.setattr(registry, "data_source", no_text_reads)
  indexed, _ = take(cfg, 6, seed=4)
  monkeypatch.setattr(registry, "data_source", original)

  b = registry.built_builder(config)
  header = text_index.header_path(b.data_path, "train")
  saved = header.read_text()
  try:
    stale = json.loads(saved)
    stale["shards"][0][1] += 1  # as if the data set had been rebuilt since
    header.write_text(json.dumps(stale))
    with caplog.at_level("WARNING", logger="mashvlm.data"):
      unindexed, _ = take(cfg, 6, seed=4)
    assert "no text index for split 'train'" in caplog.text and "indexes shards" in caplog.text
    assert same(indexed, unindexed)
    registry.ensure_built(config)  # rewrites the stale index
    assert text_index.stale_reason(b, "train") is None and header.read_text() == saved
  finally:
    header.write_text(saved)


def test_a_data_set_that_cannot_be_written_to_trains_without_an_index(config, monkeypatch,
                                                                       caplog):
  from mashvlm_jax.data import registry, text_index
  b = registry.built_builder(config)
  header = text_index.header_path(b.data_path, "test_unusual")
  saved = header.read_text()
  header.unlink()

  def read_only(builder, split, source):
    raise PermissionError(13, "Permission denied", str(text_index.index_path(
        builder.data_path, split)))
  monkeypatch.setattr(text_index, "write", read_only)
  try:
    with caplog.at_level("WARNING", logger="mashvlm.data"):
      registry.ensure_built(config)
    assert "could not write the text index of split 'test_unusual'" in caplog.text
    assert "Permission denied" in caplog.text
    assert not isinstance(registry.text_source(config, "test_unusual"),
                          text_index.TextIndexSource)
  finally:
    header.write_text(saved)
  assert isinstance(registry.text_source(config, "test_unusual"), text_index.TextIndexSource)
