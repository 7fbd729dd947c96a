"""UTR trajectory queries (issue 16 items 3-4; data/tasks/utr.py): exact actor boxes from
the renderer, uniform query draws, the box answer round trip, the small-subject rule,
users' tracks through make-data, the augmentation rule and the 7B recipe (Table 9)."""
import collections
import json
import re
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import load_config, run_cli, user_config_file
from mashvlm_jax.data import builders, chat, pipeline, registry, synthetic, tokenizer
from mashvlm_jax.data.tasks import families, utr
from mashvlm_jax.train import optim
from test_data_video import frame_index, write_indexed_mp4

CTX = families.BuildContext(num_frames=8, size=64)


def painted_mask(spec, num_frames, height, width):
  """bool [T, H, W]: pixels where the clip differs from its scene alone (same scene rng)."""
  scene_only = synthetic.ClipSpec(spec.split, spec.index, "", spec.scene, "scene_only",
                                  spec.seed)
  return (synthetic.render_clip(spec, num_frames, height, width)
          != synthetic.render_clip(scene_only, num_frames, height, width)).any(-1)


@pytest.mark.parametrize("num_frames,height,width", [(8, 64, 64), (5, 32, 32), (8, 48, 80)])
def test_every_painted_actor_pixel_lies_in_its_quantised_box(num_frames, height, width):
  specs = synthetic.clip_specs("train", 40) + synthetic.clip_specs("test_unusual", 16)
  specs = [s for s in specs if s.action]
  assert set(s.action for s in specs) == set(synthetic.ACTIONS)
  bins, tight = utr.BINS, 0
  for spec in specs:
    mask = painted_mask(spec, num_frames, height, width)
    exact = synthetic.actor_boxes(spec, num_frames, height, width)
    q = utr.quantize(exact, height, width)
    for t in range(num_frames):
      rows, cols = np.nonzero(mask[t])
      assert rows.size, (spec, t)
      # Pixel c lies in bins [q1, q2] iff q1 * W / bins <= c and c + 1 <= (q2 + 1) * W /
      # bins; integer arithmetic, no rounding.
      assert (q[t, 0] * width <= cols * bins).all() and (q[t, 1] * height <= rows * bins).all()
      assert ((cols + 1) * bins <= (q[t, 2] + 1) * width).all(), (spec, t)
      assert ((rows + 1) * bins <= (q[t, 3] + 1) * height).all(), (spec, t)
      seen = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
      assert (exact[t, :2] <= seen[:2]).all() and (exact[t, 2:] >= seen[2:]).all()
      tight += tuple(exact[t]) == seen
  # The exact box is the painted pixels' box unless an edge pixel was painted in a
  # colour equal to the scene's: the box is tight, not just large.
  assert tight >= 0.95 * len(specs) * num_frames


def test_scene_only_clips_have_no_box_and_no_rows():
  spec = synthetic.clip_specs("train", 40)[0]
  assert spec.kind == "scene_only"
  assert np.isnan(synthetic.actor_boxes(spec, 8, 64, 64)).all()
  for name in ("utr", "utr_notask", "more"):
    assert families.TRAIN_FAMILIES[name](spec, np.random.default_rng(0), CTX) == []


def test_query_frames_and_types_are_uniform():
  specs = [s for s in synthetic.clip_specs("train", 500) if s.action]
  kinds, frames = collections.Counter(), collections.Counter()
  for spec in specs:
    rows = builders.synthetic_questions(spec, train_tasks=("utr",), ctx=CTX)
    utr_rows = [r for r in rows if r["task"] == utr.TASK]
    assert len(utr_rows) == utr.rows_per_clip(spec) == 3 + spec.index % 2
    assert len(rows) == 8 + len(utr_rows)
    boxes = utr.quantize(synthetic.actor_boxes(spec, 8, 64, 64), 64, 64)
    for row in utr_rows:
      t = int(re.search(r"in frame (\d+)\.$", row["q"]).group(1)) - 1
      kinds[row["aspect"]] += 1
      frames[t] += 1
      if row["aspect"] == "location":  # the query box is the box of the query frame
        assert f"at {utr.box_text(boxes[t])} in" in row["q"]
  n = sum(kinds.values())
  assert set(kinds) == set(utr.QUERY_TYPES) and set(frames) == set(range(8))
  # Chi-square goodness of fit against uniform, rejected only at p < 0.001.
  for counts, k in ((kinds, 3), (frames, 8)):
    observed = np.array([counts[c] for c in sorted(counts)])
    chi2 = ((observed - n / k) ** 2 / (n / k)).sum()
    assert chi2 < stats.chi2.ppf(0.999, k - 1), (counts, chi2)


def test_box_answer_parses_back_to_the_stored_boxes():
  for spec in [s for s in synthetic.clip_specs("test_unusual", 24)]:
    ctx = families.BuildContext(num_frames=6, size=48)
    stored = utr.quantize(synthetic.actor_boxes(spec, 6, 48, 48), 48, 48)
    rows = utr.query_rows(spec, np.random.default_rng(spec.index), ctx)
    rows += utr.notask_rows(spec, None, ctx)
    for row in rows:
      np.testing.assert_array_equal(utr.parse_boxes(row["a"], num_frames=6), stored)
    # Dequantising gives the bins' pixel span, which quantises back to the same bins.
    np.testing.assert_array_equal(utr.quantize(utr.dequantize(stored, 48, 48), 48, 48), stored)
  # A hand case: 64 px and 100 bins, so bin k spans [0.64 k, 0.64 (k + 1)).
  assert utr.quantize(np.array([[0, 0.64, 64, 32]]), 64, 64).tolist() == [[0, 1, 99, 49]]
  assert utr.quantize(np.array([[0.65, 1.27, 1.28, 1.29]]), 64, 64).tolist() == [[1, 1, 1, 2]]
  for bad, why in (("12 30 45 80", "no 'Boxes:'"), ("Boxes: 1 2 3", "3 numbers"),
                   ("Boxes: 1 2 x 4", "non-numbers"), ("Boxes: 1 2 3 100", "outside 0..99"),
                   ("Boxes: 5 2 3 4", "x2 < x1")):
    with pytest.raises(ValueError, match=re.escape(why)):
      utr.parse_boxes(bad)
  with pytest.raises(ValueError, match="2 frames, expected 3"):
    utr.parse_boxes("Boxes: 1 2 3 4 1 2 3 4", num_frames=3)


def test_small_or_absent_subjects_are_dropped():
  h = w = 64  # 1/32 of the frame = 128 px
  big = np.array([[0, 0, 16, 8], [10, 10, 26, 18]], float)  # exactly 128 px: kept
  small = big.copy()
  small[1, 2] -= 0.5  # 124 px in the second frame only
  absent = big.copy()
  absent[0] = np.nan
  subjects = [utr.Subject("person", "in a red shirt", "walking", b) for b in (big, small, absent)]
  assert [utr.large_enough(s.boxes, h, w) for s in subjects] == [True, False, False]
  rows = utr.subject_rows(subjects, h, w, np.random.default_rng(0), rows_per_subject=2)
  assert len(rows) == 2
  for row in rows:
    np.testing.assert_array_equal(utr.parse_boxes(row["a"]), utr.quantize(big, h, w))


def test_train_samples_share_and_token_lengths(tmp_path):
  """UTR rows are ~29% of the training samples (one row drawn per visit, so a clip's
  rows count as its share); every row tokenizes without <unk>; UTR rows of 8 frames
  need at most 64 tokens, ordinary rows still fit the tiny config's 32."""
  path = tmp_path / "tokenizer.json"
  builders.save_word_tokenizer(str(path), builders.vocabulary_fingerprint())
  tok = tokenizer.Tokenizer(str(path), "hf")
  template = chat.ChatTemplate()
  specs = synthetic.clip_specs("train", 400)
  shares, lengths = [], collections.defaultdict(list)
  for spec in specs:
    rows = builders.synthetic_questions(spec, train_tasks=("utr",), ctx=CTX)
    shares.append(np.mean([r["task"] == utr.TASK for r in rows]))
    for row in rows:
      ids, _ = chat.encode_example(tok, template, [row], 256)
      assert tok.unk_id not in tok.encode(row["q"] + " " + row["a"]), row
      lengths[row["task"] == utr.TASK].append(int(ids["text_mask"].sum()))
  assert 0.27 < np.mean(shares) < 0.31
  assert max(lengths[False]) <= load_config("tiny_synthetic").data.text_len
  assert 32 < max(lengths[True]) <= 64


def test_more_rows_are_ordinary_rows_of_the_same_clips():
  for spec in synthetic.clip_specs("train", 30):
    rows = utr.more_rows(spec, np.random.default_rng(spec.index), CTX)
    if not spec.action:
      assert rows == []
      continue
    assert len(rows) == utr.rows_per_clip(spec)
    assert {r["task"] for r in rows} <= {"caption", "action", "scene", "yes_no"}


# ------------------------------------------------------------------------------ users' tracks

TRACKS_CONFIG = """
def get_config():
  config = tiny.get_config()
  config.data.update(dict(name="local_video_qa", annotations={"train": "tracks.json"},
                          video_root="videos", stored_frames=4, stored_size=32,
                          max_failure_share=0.8, data_dir="cache",
                          tokenizer=dict(kind="hf", path="tokenizer.json", bos="<s>",
                                         eos="</s>")))
  return config
"""


def write_tracks(tmp_path):
  """A 48x32 video of 20 frames at 10 fps and four records: one good (a walking person
  annotated on even frames, a dog by times, a subject too small), a bad box, a track
  that leaves after frame 5, a track without an appearance."""
  (tmp_path / "videos").mkdir()
  write_indexed_mp4(tmp_path / "videos" / "v.mp4", 20, width=48, height=32)
  walker = {"label": "person", "appearance": "in a red shirt", "action": "walking",
            "boxes": [{"frame": f, "box": [10 + f, 4, 30 + f, 24]} for f in range(0, 20, 2)]}
  dog = {"label": "dog", "appearance": "with a blue collar",
         "boxes": [{"time": 0.0, "box": [0, 0, 48, 32]}, {"time": 1.9, "box": [0, 0, 48, 32]}]}
  tiny = {"label": "ball", "appearance": "red", "boxes": [{"frame": 0, "box": [20, 10, 24, 14]},
                                                        {"frame": 19, "box": [20, 10, 24, 14]}]}
  bad = {"label": "person", "appearance": "tall",
         "boxes": [{"frame": 0, "box": [1, 1, 9, 9]}, {"frame": 3, "box": [9, 1, 2, 9]}]}
  leaves = {"label": "person", "appearance": "tall",
            "boxes": [{"frame": f, "box": [0, 0, 30, 30]} for f in range(6)]}
  records = [{"video": "v.mp4", "tracks": [walker, dog, tiny]},
             {"video": "v.mp4", "tracks": [bad]},
             {"video": "v.mp4", "tracks": [leaves]},
             {"video": "v.mp4", "tracks": [{"label": "cat", "boxes": walker["boxes"]}]}]
  (tmp_path / "tracks.json").write_text(json.dumps(records))
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tracks.py").write_text(user_config_file(TRACKS_CONFIG))
  builders.save_word_tokenizer(str(tmp_path / "tokenizer.json"),
                               builders.vocabulary_fingerprint())


def test_tracks_layout_builds_utr_rows_through_make_data(tmp_path, monkeypatch):
  write_tracks(tmp_path)
  out = run_cli("make-data", "--config=configs/tracks.py", cwd=tmp_path, timeout=300)
  assert "1 of 1 records hold UTR track queries: 100.0%" in out.stdout
  assert "skipped 3 of 4 records" in out.stdout
  assert re.search(r"tracks.json record 1 .*tracks\[0\]\.boxes\[1\]\.box should have "
                   r"x2 > x1", out.stdout), out.stdout
  assert re.search(r"tracks/000002 .*no track is in every sampled frame", out.stdout)
  assert re.search(r"tracks.json record 3 .*tracks\[0\]: missing field 'appearance'",
                   out.stdout)

  monkeypatch.chdir(tmp_path)
  sys.path.insert(0, str(tmp_path / "configs"))
  try:
    import tracks
    config = tracks.get_config()
  finally:
    sys.path.remove(str(tmp_path / "configs"))
    sys.modules.pop("tracks", None)
  (record,) = map(pipeline.decode_record, registry.data_source(config, "train"))
  # 20 frames, 4 stored, "middle" rule: frames 2 7 12 17 (test_data_video).
  assert [frame_index(f) for f in record["video"]] == [2, 7, 12, 17]
  rows = {r["a"].split(".")[0]: r for r in record["qa"]}
  assert len(record["qa"]) == 2 and all(r["task"] == "utr" for r in record["qa"])
  # The person at frame f: [10 + f, 4, 30 + f, 24] (frame 7 interpolated between 6 and 8).
  # Resize 48x32 -> 32: scale 1, centre crop drops 8 px left, so x -> x - 8. Frame 2:
  # [4, 4, 24, 24] px -> bins floor(4 * 100 / 32) = 12, ceil(24 * 100 / 32) - 1 = 74; x2
  # past the frame's right edge (frames 12, 17) is clipped to 32 px, bin 99.
  expected = [[(2 + f) * 100 // 32, 12, -(-min(22 + f, 32) * 100 // 32) - 1, 74]
              for f in (2, 7, 12, 17)]
  assert expected[0] == [12, 12, 74, 74] and expected[3] == [59, 12, 99, 74]
  person = [r for a, r in rows.items() if a.startswith("The person")]
  dog = [r for a, r in rows.items() if a.startswith("The dog")]
  assert len(person) == len(dog) == 1
  np.testing.assert_array_equal(utr.parse_boxes(person[0]["a"], 4), expected)
  # The dog fills the 48x32 frame: the crop keeps the full 32x32 frame, bins 0..99.
  np.testing.assert_array_equal(utr.parse_boxes(dog[0]["a"], 4), [[0, 0, 99, 99]] * 4)
  assert dog[0]["aspect"] in ("location", "appearance")  # the dog has no action


# ------------------------------------------------------------------------------ augmentation

def test_crop_or_flip_with_utr_rows_is_rejected_at_start(tmp_path):
  config = load_config("tiny_synthetic")
  config.data.train_tasks = ("utr",)
  assert config.data.augment.random_resized_crop  # the tiny default
  with pytest.raises(ValueError, match=r"data.train_tasks=\('utr',\).*"
                                       r"data.augment.random_resized_crop move the frames"):
    pipeline.example_transform(config, "train")  # the trainer's start (make_dataset)
  config.data.augment.random_resized_crop = False
  utr.augment_rule(config)  # no crop, no flip: allowed
  config.data.augment.flip = True
  with pytest.raises(ValueError, match=r"set data.augment.flip=False"):
    utr.augment_rule(config)
  config.data.train_tasks = ("more",)  # no boxes in its answers
  utr.augment_rule(config)

  write_tracks(tmp_path)
  local = load_config("tiny_synthetic")
  local.data.update(dict(name="local_video_qa", video_root=str(tmp_path / "videos"),
                         annotations={"train": str(tmp_path / "tracks.json")}))
  with pytest.raises(ValueError, match=r"tracks records in \[.*tracks.json"):
    utr.augment_rule(local)
  (tmp_path / "it.json").write_text(json.dumps([{"video": "v.mp4", "QA": [{"q": "q",
                                                                          "a": "a"}]}]))
  local.data.annotations = {"train": str(tmp_path / "it.json")}
  utr.augment_rule(local)


# ------------------------------------------------------------------------------ 7B recipe

def test_7b_utr_recipe_is_table_9():
  config = load_config("mashvlm_7b", "recipe=utr")
  o = config.optim
  assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (1e-5, 0.9, 0.95, 1e-8,
                                                                    0.05, 1.0)
  assert config.total_steps == 5000 and o.warmup_steps == 15  # ratio 0.003 of 5k steps
  assert config.data.batch_size == 256 and config.grad_accum_steps == 4
  assert not config.model.freeze_vision
  assert abs(config.data.utr_share - 365 / 1255) < 0.01  # Table 8: UTR-Data in stage II
  assert not config.data.augment.random_resized_crop and not config.data.augment.flip
  # Per-parameter peak rates as the trainer builds them (vision tower not frozen).
  params = {"vision_tower": {"layers": {"fc1": {"kernel": 0}}},
            "projector": {"kernel": 0}, "llm": {"embed": {"embedding": 0}}}
  labels = optim.param_labels(params, dict(o))
  schedule = optim.learning_rate_schedule(dict(o), config.total_steps)
  peak = float(schedule(o.warmup_steps))
  factor = lambda label: float(label[3:])
  assert abs(peak * factor(labels["vision_tower"]["layers"]["fc1"]["kernel"]) - 2e-6) < 1e-12
  assert abs(peak * factor(labels["llm"]["embed"]["embedding"]) - 1e-5) < 1e-12
  assert labels["projector"]["kernel"] == "lr_1.0"
  assert float(schedule(0)) == 0.0 and abs(float(schedule(config.total_steps))) < 1e-12
  mid = float(schedule((o.warmup_steps + config.total_steps) // 2))
  assert abs(mid - 0.5e-5) < 2e-8  # cosine: half the peak half way through the decay
  base = load_config("mashvlm_7b")
  assert base.optim.lr == 2e-5 and base.model.freeze_vision  # no recipe: unchanged
  with pytest.raises(ValueError, match="unknown recipe 'nope'"):
    load_config("mashvlm_7b", "recipe=nope")


def test_synthetic_build_stores_utr_rows_and_the_start_rules(tmp_path):
  """A tiny build with data.train_tasks=("utr",): the stored rows hold the renderer's
  boxes at the stored size; training refuses a text_len that cuts them, crop, and stored
  frames the pipeline would resample."""
  config = load_config("tiny_synthetic")
  config.data.update(dict(data_dir=str(tmp_path), builder_config="tiny", train_size=16,
                          test_size=2, stored_size=32, train_tasks=("utr",)))
  registry.ensure_built(config)
  specs = {s.id: s for s in synthetic.clip_specs("train", 16)}
  for raw in registry.data_source(config, "train"):
    record = pipeline.decode_record(raw)
    spec = specs[record["id"]]
    rows = [r for r in record["qa"] if r["task"] == utr.TASK]
    assert len(rows) == (utr.rows_per_clip(spec) if spec.action else 0)
    if rows:
      stored = utr.quantize(synthetic.actor_boxes(spec, 8, 32, 32), 32, 32)
      for row in rows:
        np.testing.assert_array_equal(utr.parse_boxes(row["a"], 8), stored)
  # Longest row, 8 frames, word tokenizer: <s> user : + "track the person at b b b b in
  # frame 8 ." (12) + assistant : + "the person in a <colour> shirt <action> . boxes :" (10)
  # + 32 numbers + </s> = 60.
  tok = registry.load_tokenizer(config)
  assert utr.longest_text(tok, chat.ChatTemplate(), 8) == 60
  with pytest.raises(ValueError, match=r"rows of up to 60 tokens .* data.text_len=32"):
    pipeline.example_transform(config, "train", augment=False)
  config.data.text_len = 64
  with pytest.raises(ValueError, match="random_resized_crop"):
    pipeline.example_transform(config, "train")
  config.data.augment.random_resized_crop = False
  batch = next(pipeline.make_iterator(config, "train"))
  assert batch["text_ids"].shape == (16, 64)
  pipeline.example_transform(config, "test_unusual")  # evaluation splits: no UTR rules
  config.data.stored_frames = 4
  with pytest.raises(ValueError, match=r"data.stored_frames=4 differs from "
                                       r"model.num_frames=8"):
    utr.check_config(config, augment=False)
  config.data.stored_frames = 0
  config.data.train_tasks = ("utr", "temporal")  # temporal redraws clips held still
  with pytest.raises(ValueError, match=r"also names \['temporal'\], which redraw"):
    utr.check_config(config, augment=False)
