"""TFDS ArrayRecord builders: synthetic round trip, users' annotations in the three
layouts, bad input (missing/corrupt videos, records without a field), atomic builds and
the make-data command."""
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from mashvlm_jax.data import builders, pipeline, registry, synthetic
from test_data_video import frame_index, write_indexed_mp4


def tiny_config(data_dir, **data):
  config = load_config("tiny_synthetic")
  config.data.data_dir = str(data_dir)
  config.data.builder_config = "tiny"
  config.data.update(data)
  return config


def finished_dirs(root):
  """Directories a reader would take for a finished TFDS data set."""
  return [p.parent for p in pathlib.Path(root).rglob("dataset_info.json")]


def test_synthetic_round_trip(tmp_path):
  config = tiny_config(tmp_path, stored_frames=4, stored_size=32)
  b = registry.ensure_built(config)
  assert b.builder_config.num_frames == 4 and b.builder_config.size == 32
  assert {s: b.info.splits[s].num_examples for s in synthetic.SPLITS} == \
      builders.SYNTHETIC_PRESETS["tiny"]
  assert not [p for p in tmp_path.rglob("*") if "incomplete" in p.name]
  specs = {s.id: s for s in synthetic.clip_specs("test_unusual", 56)}
  source = registry.data_source(config, "test_unusual")
  for k in (0, 17, 55):
    record = pipeline.decode_record(source[k])
    spec = specs[record["id"]]
    np.testing.assert_array_equal(record["video"], synthetic.render_clip(spec, 4, 32, 32))
    assert (record["action"], record["scene"], record["kind"]) == (spec.action, spec.scene,
                                                                   "unusual")
    assert record["qa"] == builders.synthetic_questions(spec)
  tok = registry.load_tokenizer(config)
  assert pathlib.Path(tok.path).parent == pathlib.Path(str(b.data_path))
  assert tok.vocab_size <= config.model.llm.vocab_size
  assert registry.ensure_built(config).data_path == b.data_path  # no rebuild


def _annotations(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  for k in range(4):
    write_indexed_mp4(videos / f"v{k}.mp4", 20 + k, width=32, height=32)
  (videos / "broken.mp4").write_bytes(b"\x00not a video" * 100)
  instruct = [{"video": f"v{k}.mp4", "QA": [{"i": "", "q": f"Question {k}?", "a": "An answer."}]}
              for k in range(4)]
  instruct[1]["start"], instruct[1]["end"] = 0.5, 1.5
  instruct += [{"video": "missing.mp4", "QA": [{"q": "q", "a": "a"}]},
               {"video": "broken.mp4", "QA": [{"q": "q", "a": "a"}]},
               {"video": "v0.mp4"}]  # no QA field
  (tmp_path / "it.json").write_text(json.dumps(instruct))
  bench = tmp_path / "mvbench"
  bench.mkdir()
  (bench / "action_sequence.json").write_text(json.dumps([
      {"video": "v2.mp4", "question": "What happened?", "candidates": ["sat", "ran"],
       "answer": "ran"}]))
  (tmp_path / "unscene.json").write_text(json.dumps([
      {"video": "v3.mp4", "kind": "unusual", "action": "skiing", "scene": "library"},
      {"video": "v1.mp4", "kind": "scene_only", "scene": "beach",
       "binary": [{"q": "Is the person running?", "a": "No", "aspect": "action", "pair": 0},
                  {"q": "Is there only a beach?", "a": "Yes", "aspect": "action",
                   "pair": 0}]}]))
  return videos


def local_config(tmp_path, share):
  videos = _annotations(tmp_path)
  return tiny_config(tmp_path / "cache", name="local_video_qa", stored_frames=4,
                     stored_size=32, video_root=str(videos), max_failure_share=share,
                     annotations={"train": str(tmp_path / "it.json"),
                                  "mvbench": str(tmp_path / "mvbench"),
                                  "unscene": str(tmp_path / "unscene.json")})


def test_users_data_bad_records_are_skipped_and_named(tmp_path, caplog):
  config = local_config(tmp_path, share=0.5)
  with caplog.at_level(logging.WARNING):
    b = registry.ensure_built(config)
  assert b.info.splits["train"].num_examples == 4
  failed = b.report["train"]["failed"]
  assert len(failed) == 3 and b.report["train"]["total"] == 7
  assert any("missing.mp4" in f and "does not exist" in f for f in failed)
  assert any("broken.mp4" in f and "cannot" in f for f in failed)
  assert any("it.json record 6" in f and "missing field 'QA'" in f for f in failed)
  assert all(name in caplog.text for name in ("missing.mp4", "broken.mp4", "it.json record 6"))
  source = registry.data_source(config, "train")
  records = {r["id"]: r for r in map(pipeline.decode_record, source)}
  # Frames were sampled at build time with the "middle" rule, start/end honoured.
  assert [frame_index(f) for f in records["it/000000"]["video"]] == [2, 7, 12, 17]
  # 0.5 s <= t < 1.5 s at 10 fps: frames 5..14; linspace(0, 10, 5) -> 0 2 5 7 10, so
  # segments [0,1] [2,4] [5,6] [7,9] with middles 0 3 5 8.
  assert [frame_index(f) for f in records["it/000001"]["video"]] == [5, 8, 10, 13]
  assert records["it/000003"]["qa"][0]["q"] == "Question 3?"
  (mv,) = map(pipeline.decode_record, registry.data_source(config, "mvbench"))
  assert mv["task"] == "mvbench/action_sequence" and mv["candidates"] == ["sat", "ran"]
  assert mv["qa"][0]["a"] == "(B) ran" and "(A) sat" in mv["qa"][0]["q"]
  unscene = {r["source"]: r for r in map(pipeline.decode_record,
                                         registry.data_source(config, "unscene"))}
  generated = unscene["v3.mp4"]["qa"]
  assert [q["a"] for q in generated] == ["Yes", "No", "Yes", "No"]  # duals from the rules
  assert unscene["v3.mp4"]["kind"] == "unusual" and unscene["v1.mp4"]["kind"] == "scene_only"
  assert [q["a"] for q in unscene["v1.mp4"]["qa"]] == ["No", "Yes"]


def test_too_many_failures_leave_nothing_behind(tmp_path):
  config = local_config(tmp_path, share=0.2)
  with pytest.raises(builders.BuildError, match=r"3 of 7 records skipped.*max_failure_share"):
    registry.ensure_built(config)
  cache = tmp_path / "cache"
  assert finished_dirs(cache) == []
  assert not [p for p in cache.rglob("*") if "incomplete" in p.name]
  assert not registry.builder(config).is_prepared()


def test_make_data_command(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", MASHVLM_DATA_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", "make-data",
                        "--config=configs/tiny_synthetic.py", "--config.data.builder_config=tiny",
                        "--config.data.stored_size=16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "train" in out.stdout and "64 examples" in out.stdout and "tokenizer" in out.stdout
  (found,) = finished_dirs(tmp_path)
  assert "tiny_t8_s16" in str(found) and (found / "tokenizer.json").exists()


def test_mvbench_records_with_more_options_than_letters_are_refused():
  from mashvlm_jax.data import annotations
  from mashvlm_jax.data.tasks import mvbench
  record = {"video": "v.mp4", "question": "Which?", "answer": "c3",
            "candidates": [f"c{k}" for k in range(27)]}
  with pytest.raises(annotations.RecordError, match="holds 27 options, at most 26"):
    annotations.parse_record(record, key="k", task="t", video_root=".",
                             rng=np.random.default_rng(0), layout="mvbench")
  record["candidates"] = record["candidates"][:26]
  item = annotations.parse_record(record, key="k", task="t", video_root=".",
                                  rng=np.random.default_rng(0), layout="mvbench")
  assert "(Z) c25" in item.qa[0]["q"] and item.qa[0]["a"] == "(D) c3"
  with pytest.raises(ValueError, match="index 26 has no letter"):
    mvbench.option_letter(26)
