"""Video storage formats (data.storage jpeg / source, storage.py) against the raw format
and the VideoChat2 rule: same frames for the same indices, fresh ``rand`` draws per
epoch, undecodable records skipped and counted, exact resume with workers, Grain's
worker choice, gs:// refused at start, caption pretraining data."""
import io
import json
import logging
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, load_config
from mashvlm_jax.data import (annotations, captions, pipeline, registry, storage, tokenizer,
                              video)
from test_data_video import frame_index, write_indexed_mp4

sys.path.insert(0, str(ROOT / "benchmarks"))
import video_data  # noqa: E402  (the benchmark's natural-looking test videos)

LENGTHS = (40, 44, 48, 52)  # clip c's frame i shows the number 64 * c + i in its bands
T, SIZE = 8, 32
QUESTION, ANSWER = "What happens in the video?", "Shapes move."


def decoded_ids(frames):
  """(clip, frame index) read back from each frame's bands."""
  values = [frame_index(f) for f in frames]
  return values[0] // 64, [v % 64 for v in values]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Four band-coded videos (two records each), a natural-looking video, a truncated
  copy of a video, and a word tokenizer of the QA text."""
  root = tmp_path_factory.mktemp("storage")
  videos = root / "videos"
  videos.mkdir()
  for c, n in enumerate(LENGTHS):
    write_indexed_mp4(videos / f"c{c}.mp4", n, first=64 * c)
  video_data.write_natural_video(videos / "natural.mp4", 30, 160, 120, fps=25, seed=3)
  data = (videos / "c3.mp4").read_bytes()
  (videos / "cut.mp4").write_bytes(data[:len(data) // 2])
  records = [{"video": f"c{c}.mp4", "QA": [{"i": "", "q": QUESTION, "a": ANSWER}]}
             for c in range(len(LENGTHS))] * 2
  (root / "train.json").write_text(json.dumps(records))
  cut = records[:7] + [{"video": "cut.mp4", "QA": [{"i": "", "q": QUESTION, "a": ANSWER}]}]
  (root / "cut.json").write_text(json.dumps(cut))
  tokenizer.save_atomic(tokenizer.build_word_tokenizer([QUESTION, ANSWER, "USER: ASSISTANT:"]),
                        root / "tokenizer.json")
  return root


def local_config(root, fmt, annotation="train.json", **data):
  config = load_config("tiny_synthetic")
  config.model.num_frames, config.model.vision.image_size = T, SIZE
  d = config.data
  d.update(name="local_video_qa", data_dir=str(root / "cache"), video_root=str(root / "videos"),
           annotations={"train": str(root / annotation)}, batch_size=4, storage=fmt,
           jpeg=dict(quality=90, short_side=0, max_frames=16, fps=0.0), source_max_mb=64.0,
           max_read_failure_share=0.5, build_threads=1)
  d.tokenizer.update(kind="hf", path=str(root / "tokenizer.json"))
  d.augment.update(random_resized_crop=False, flip=False)  # keep the bands readable
  d.update(data)
  return config


def mean_abs(a, b):
  return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


def test_jpeg_and_source_frames_match_raw_for_the_same_indices(root):
  """Natural 30-frame video: source decodes the very frames of the raw format's reader;
  jpeg (all 30 frames kept, shorter side at the model's size) is within JPEG loss."""
  path = str(root / "videos" / "natural.mp4")
  spec = storage.StorageSpec("jpeg", jpeg_quality=90, jpeg_max_frames=32)
  jpeg = storage.jpeg_record(path, SIZE * 2, spec)
  assert jpeg["frame_indices"].tolist() == list(range(30))  # fewer frames than the cap
  source = storage.source_record(path, storage.StorageSpec("source"))
  assert source["video"].tobytes() == pathlib.Path(path).read_bytes()
  for mode, seed in (("middle", None), ("rand", 0), ("rand", 1)):
    rng = lambda: None if seed is None else np.random.default_rng(seed)  # noqa: E731
    raw = video.read_video(path, T, mode, SIZE * 2, rng=rng())
    got = storage.jpeg_frames(jpeg["video"], jpeg["frame_offsets"], T, mode, SIZE * 2, rng())
    assert got.shape == raw.shape == (T, 64, 64, 3) and got.dtype == np.uint8
    # JPEG tolerance: no worse than a JPEG round trip of the raw frames themselves at the
    # same quality (the indices themselves: the band-coded tests below)
    round_trip = np.stack([np.asarray(Image.open(io.BytesIO(storage.encode_jpeg(f, 90))))
                           for f in raw])
    assert mean_abs(got, raw) <= 1.25 * mean_abs(round_trip, raw) and psnr(got, raw) > 33, mode
    clip = storage.stored_video(dict(source, id="natural"))
    np.testing.assert_array_equal(clip.frames(T, mode, SIZE * 2, rng()), raw)
  # stored at 4x the model's size, read back at it: within JPEG loss of the raw frames
  big = storage.jpeg_record(path, SIZE * 2, storage.StorageSpec("jpeg", jpeg_short_side=256))
  got = storage.jpeg_frames(big["video"], big["frame_offsets"], T, "middle", SIZE * 2)
  raw = video.read_video(path, T, "middle", SIZE * 2)
  assert psnr(got, raw) > 40, psnr(got, raw)
  bounded = dict(storage.source_record(path, storage.StorageSpec("source"), 0.2, 0.8),
                 id="natural")
  np.testing.assert_array_equal(storage.stored_video(bounded).frames(T, "middle", SIZE),
                                video.read_video(path, T, "middle", SIZE, start=0.2, end=0.8))


def test_built_formats_give_the_raw_formats_evaluation_frames(root, tmp_path):
  """The natural clip built as raw, jpeg and source: evaluation frames (``middle``) of
  source equal raw's, jpeg's are within JPEG loss of them."""
  (tmp_path / "natural.json").write_text(json.dumps(
      [{"video": "natural.mp4", "QA": [{"i": "", "q": QUESTION, "a": ANSWER}]}]))
  frames = {}
  for fmt in ("raw", "jpeg", "source"):
    config = local_config(root, fmt, annotations={"test": str(tmp_path / "natural.json")},
                          data_dir=str(tmp_path / "cache"),
                          jpeg=dict(quality=90, short_side=0, max_frames=32, fps=0.0))
    registry.ensure_built(config)
    frames[fmt] = pipeline.make_eval_records(config, "test")[0]["frames"]
  assert frames["raw"].shape == (T, SIZE, SIZE, 3)
  np.testing.assert_array_equal(frames["source"], frames["raw"])
  round_trip = np.stack([np.asarray(Image.open(io.BytesIO(storage.encode_jpeg(f, 90))))
                         for f in frames["raw"]])
  assert mean_abs(frames["jpeg"], frames["raw"]) <= 1.25 * mean_abs(round_trip, frames["raw"])


def test_jpeg_keeps_cap_frames_and_samples_among_them(root):
  """A 52-frame clip with max_frames=16 keeps the 16 ``middle`` frames; a visit's T
  frames are the rule's picks among those 16 (read back from the bands)."""
  path = str(root / "videos" / "c3.mp4")
  rec = storage.jpeg_record(path, SIZE, storage.StorageSpec("jpeg", jpeg_max_frames=16))
  stored = video.sample_frame_indices(52, 16, "middle")
  np.testing.assert_array_equal(rec["frame_indices"], stored)
  for seed in range(3):
    frames = storage.jpeg_frames(rec["video"], rec["frame_offsets"], T, "rand", SIZE,
                                 np.random.default_rng(seed))
    want = stored[video.sample_frame_indices(16, T, "rand", rng=seed)]
    assert decoded_ids(frames) == (3, want.tolist())
  fps_spec = storage.StorageSpec("jpeg", jpeg_max_frames=32, jpeg_fps=2.0)
  assert storage.stored_count(52, 10.0, fps_spec) == 11  # 5.2 s at 2 frames/s
  assert storage.stored_count(520, 10.0, fps_spec) == 32  # capped


@pytest.mark.parametrize("fmt", ["jpeg", "source"])
def test_rand_sampling_is_fresh_each_epoch_and_follows_the_rule(root, fmt):
  config = local_config(root, fmt)
  registry.ensure_built(config)
  it = pipeline.make_iterator(config, "train", process_index=0, process_count=1,
                              num_epochs=2)
  batches = list(it)
  assert len(batches) == 4  # 8 records, batch 4, two epochs
  epochs = [{}, {}]
  for b, batch in enumerate(batches):
    assert batch["frames"].shape == (4, T, SIZE, SIZE, 3)
    assert batch["read_failures"].tolist() == [0] * 4
    for frames in batch["frames"]:
      clip, got = decoded_ids(frames)
      n = LENGTHS[clip]
      # the frames the rule can pick from: the clip's (source) or the 16 stored (jpeg)
      pool = np.arange(n) if fmt == "source" else video.sample_frame_indices(n, 16, "middle")
      bounds = np.linspace(0, len(pool), T + 1).astype(int)
      for k, index in enumerate(got):
        assert index in pool[bounds[k]:bounds[k + 1]], (clip, k, got)
      epochs[b // 2].setdefault(clip, []).append(got)
  assert sorted(epochs[0]) == sorted(epochs[1]) == [0, 1, 2, 3]
  assert any(sorted(epochs[0][c]) != sorted(epochs[1][c]) for c in range(4))
  # evaluation reads the ``middle`` frames, as the raw format stores them
  records = pipeline.make_eval_records(config, "train")
  clip, got = decoded_ids(records[0]["frames"])
  pool = np.arange(LENGTHS[clip]) if fmt == "source" else \
      video.sample_frame_indices(LENGTHS[clip], 16, "middle")
  assert got == pool[video.sample_frame_indices(len(pool), T, "middle")].tolist()


def test_undecodable_records_are_skipped_counted_and_bounded(root, monkeypatch):
  """A truncated source video and a truncated JPEG: each visit of the bad record is
  replaced by the next readable one and counted in read_failures; above the share the
  pipeline stops with an error naming the setting."""
  source = local_config(root, "source", "cut.json")
  b = registry.ensure_built(source)
  assert b.report["train"]["failed"] == []  # source storage does not decode at build

  real = storage.encode_jpeg
  calls = {"n": 0}

  def truncated_for_c0(rgb, quality):
    data = real(rgb, quality)
    calls["n"] += 1
    return data[:len(data) // 3] if frame_index(rgb) // 64 == 0 else data
  monkeypatch.setattr(storage, "encode_jpeg", truncated_for_c0)
  jpeg = local_config(root, "jpeg", "cut.json", data_dir=str(root / "cache_cut_jpeg"),
                      max_failure_share=0.2)
  registry.ensure_built(jpeg)  # the cut mp4 fails here (it decodes at build): 1 of 8
  monkeypatch.setattr(storage, "encode_jpeg", real)
  for config, bad in ((source, 1), (jpeg, 2)):  # cut.mp4 / both records of clip 0
    rows = [r for b in pipeline.make_iterator(config, "train", process_index=0,
                                              process_count=1, num_epochs=1, shuffle=False)
            for r in zip(b["frames"], b["read_failures"])]
    expected = 8 if config is source else 7  # the jpeg build skipped cut.mp4
    assert len(rows) == expected - expected % 4
    assert sum(int(f) for _, f in rows) == bad - (config is jpeg)  # last row dropped
    if config is jpeg:
      assert all(decoded_ids(frames)[0] != 0 for frames, _ in rows)
  strict = local_config(root, "source", "cut.json", max_read_failure_share=0.05)
  it = pipeline.make_iterator(strict, "train", process_index=0, process_count=1)
  with pytest.raises(storage.ReadFailureError, match="data.max_read_failure_share = 5.0%"):
    for _ in range(12):  # 1 of 8 reads fail: stops once 32 reads are counted
      next(it)


def test_iterator_resume_is_exact_with_workers(root):
  config = local_config(root, "jpeg")
  registry.ensure_built(config)
  config.data.num_workers = 2
  it = pipeline.make_iterator(config, "train", process_index=0, process_count=1, seed=3)
  first = [next(it) for _ in range(2)]
  state = it.get_state()
  rest = [next(it) for _ in range(3)]  # crosses into the next epochs
  it.close()
  restored = pipeline.make_iterator(config, "train", process_index=0, process_count=1, seed=3)
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  restored.close()
  serial_config = config.copy_and_resolve_references()
  serial_config.data.num_workers = 0
  serial = pipeline.make_iterator(serial_config, "train", process_index=0, process_count=1,
                                  seed=3)
  serial_batches = [next(serial) for _ in range(5)]
  for a, b in zip(got + first + rest, rest + serial_batches):  # resumed; with workers
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert len(got + first + rest) == len(rest + serial_batches) == 8


def test_auto_workers_use_grains_performance_config(root, caplog):
  """num_workers="auto": Grain's pick_performance_config over one batch's bytes
  (RAM budget / batch MB, at most one worker per core); logged; same batches."""
  config = local_config(root, "source", ram_budget_mb=1, batch_size=8)
  config.model.vision.image_size = 64  # 8 x 8 x 64 x 64 x 3 bytes: 0.75 MB per batch
  registry.ensure_built(config)
  with config.data.ignore_type():
    config.data.num_workers = "auto"
  with caplog.at_level(logging.INFO, logger="mashvlm.data"):
    it = pipeline.make_iterator(config, "train", process_index=0, process_count=1,
                                shuffle=False)
    batch = next(it)
    it.close()
  batch_mb = sum(np.asarray(v).nbytes for v in batch.values()) / 2 ** 20
  assert 0.5 < batch_mb < 1  # so the budget of 1 MB holds one batch: 1 worker, 1 buffer
  assert "chose 1 worker processes and a prefetch buffer of 1 batches" in caplog.text
  serial = config.copy_and_resolve_references()
  with serial.data.ignore_type():
    serial.data.num_workers = 0
  want = next(pipeline.make_iterator(serial, "train", process_index=0, process_count=1,
                                     shuffle=False))
  assert all(np.array_equal(batch[k], want[k]) for k in want)
  # a 3 MB budget: Grain's rule over the real batch's bytes, at most one worker per core
  import os
  config.data.ram_budget_mb = 3
  chosen = pipeline._with_auto_workers(config, "train", process_index=0, process_count=1,
                                       seed=None, shuffle=False, num_epochs=None,
                                       augment=None).data
  fits = int(3 / batch_mb)
  assert fits == 3 and (chosen.num_workers, chosen.prefetch_buffer_size) == (
      min(fits, len(os.sched_getaffinity(0))), min(fits, config.data.prefetch_buffer_size))


def test_bad_settings_fail_at_start(root):
  config = local_config(root, "source", data_dir="gs://my-bucket/mashvlm/data")
  if not storage.gcs_metadata_backend():
    with pytest.raises(ValueError, match=r"data.data_dir='gs://my-bucket/mashvlm/data'.*"
                                         r"gcsfuse --implicit-dirs my-bucket /mnt/my-bucket"):
      registry.builder(config)
  config = local_config(root, "jpeg", video_root="gs://clips/webvid")
  with pytest.raises(ValueError, match="data.video_root='gs://clips/webvid': PyAV"):
    registry.builder(config)
  with pytest.raises(ValueError, match="data.storage must be one of"):
    registry.builder(local_config(root, "png"))
  with pytest.raises(ValueError, match="data.jpeg has unknown fields \\['qualty'\\]"):
    registry.builder(local_config(root, "jpeg", jpeg=dict(qualty=80)))
  path = root / "videos" / "c0.mp4"
  tiny = storage.StorageSpec("source", source_max_bytes=100)
  with pytest.raises(storage.SourceTooLarge, match=f"{path} has .* data.source_max_mb"):
    storage.source_record(str(path), tiny)
  with pytest.raises(ValueError, match="text_buckets is not supported"):
    pipeline.make_iterator(local_config(root, "source", text_buckets=(8, 32)), "train",
                           process_index=0, process_count=1)


def test_caption_files_and_pretrain_stage(tmp_path, root):
  from mashvlm_jax.data.tasks import caption, families
  from mashvlm_jax.train import optim
  (tmp_path / "webvid.csv").write_text(
      "videoid,contentUrl,duration,page_dir,name\n"
      "1001,http://x/1001.mp4,PT00H00M10S,000001_000050,A dog runs on a beach.\n"
      "1002,http://x/1002.mp4,PT00H00M07S,000001_000050,\n")
  items, failures = annotations.read_items(tmp_path / "webvid.csv", "/videos")
  assert [(i.video, i.qa[0]["a"], i.task) for i in items] == [
      ("/videos/000001_000050/1001.mp4", "A dog runs on a beach.", caption.TASK)]
  assert len(failures) == 1 and "row 1" in failures[0].where and "caption" in failures[0].reason
  (tmp_path / "pairs.jsonl").write_text(
      json.dumps({"video": "a.mp4", "caption": "Snow falls.", "start": 1, "end": 3}) + "\n"
      + "{not json\n")
  items, failures = captions.read_items(tmp_path / "pairs.jsonl", "/v")
  assert (items[0].start, items[0].end, items[0].qa[0]["q"]) == (1.0, 3.0, caption.PROMPTS[0])
  assert "not valid JSON" in failures[0].reason
  (tmp_path / "bad.csv").write_text("url,text\nx,y\n")
  with pytest.raises(ValueError, match="bad.csv: the header \\['url', 'text'\\]"):
    captions.read_items(tmp_path / "bad.csv", "/v")
  seen = {families.render_visit(items[0].qa[0], np.random.default_rng(s))["q"]
          for s in range(40)}
  assert seen == set(caption.PROMPTS)  # a fresh prompt per visit, the answer kept
  # a caption CSV built as jpeg: records of caption.TASK, frames sampled at read time
  (tmp_path / "clips.csv").write_text("video,caption\nc1.mp4,Bands flash.\n"
                                      "c2.mp4,More bands flash.\n")
  config = local_config(root, "jpeg", annotations={"train": str(tmp_path / "clips.csv")},
                        data_dir=str(tmp_path / "cache"))
  registry.ensure_built(config)
  records = pipeline.make_eval_records(config, "train")
  assert [(r["task"], r["qa"][0]["a"], decoded_ids(r["frames"])[0]) for r in records] == [
      (caption.TASK, "Bands flash.", 1), (caption.TASK, "More bands flash.", 2)]

  config = load_config("mashvlm_7b", "stage=pretrain")
  assert config.data.storage == "jpeg" and config.data.text_len == 128
  tree = {"vision_tower": {"w": 0}, "projector": {"fc1": {"kernel": 0}},
          "language_model": {"layers": {"mlp": {"kernel": 0}}}}
  freeze = list(config.optim.freeze) + ["^vision_tower/"]  # model.freeze_vision
  labels = optim.param_labels(tree, dict(config.optim, freeze=freeze))
  assert labels == {"vision_tower": {"w": "frozen"}, "projector": {"fc1": {"kernel": "lr_1.0"}},
                    "language_model": {"layers": {"mlp": {"kernel": "frozen"}}}}
  with pytest.raises(ValueError, match="stage must be"):
    load_config("mashvlm_7b", "stage=finetune")


@pytest.mark.slow  # compiles and runs the tiny train step (about 25 CPU seconds)
def test_trainer_logs_read_failures(root, tmp_path):
  """Two tiny train steps over the source set whose 8th record is a truncated video:
  the skipped visit is in the logged metrics, saved with the checkpoint, and still counted
  after a resume (one more step, which reads no bad record; the first batch held it)."""
  from mashvlm_jax.train import checkpoint, trainer
  config = local_config(root, "source", "cut.json")
  config.model.llm.num_layers = 1
  config.update(total_steps=2, log_every=1, checkpoint_every=2, async_checkpointing=False)
  summary = trainer.train(config, str(tmp_path / "run"))
  assert summary is not None
  saved = tmp_path / "run" / "checkpoints" / "2" / "data" / "process_0-of-1.json"
  assert checkpoint.decode_data_counters(saved.read_text()) == {"read_failures": 1}
  config.update(total_steps=3)
  trainer.train(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
          .splitlines()]
  assert [(r["step"], r.get("read_failures", 0)) for r in rows] == [(1, 1), (2, 1), (3, 1)]


@pytest.mark.slow  # writes two videos and builds and reads them in three formats
def test_video_data_benchmark_runs(tmp_path):
  import subprocess
  out = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "video_data.py"), "--videos=2",
       "--batches=1", "--batch=2", "--workers=1", "--out=bench"],
      cwd=tmp_path, capture_output=True, text=True, timeout=900,
      env=dict(__import__("os").environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "bench" / "results.json").read_text())
  assert [r["format"] for r in results["rows"]] == ["raw", "jpeg", "source"]
  for row in results["rows"]:
    assert row["cores_needed"] == pytest.approx(results["need"] / row["clips_per_cpu_s"])
  assert "7B train step on v5p-64" in out.stdout and "source" in out.stdout
