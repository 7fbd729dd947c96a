"""UTR temporal perplexity (analysis/tpl.py, `mashvlm tpl`) and training on the rows it
keeps (data/row_filter.py), against hand-computed cases and independent references:

- mean NLL and TPL by hand; the answer span is the training label mask's (the tokens
  ExampleTransform marks, and tok.encode(answer) + </s> counted by hand: no off-by-one);
- a stub scorer whose log-probabilities follow from the row's tokens and its video gives
  the NLL and TPL computed here from the frames, on 1 and 2 devices (packing and the
  device-local clip index);
- the real model: a clip whose frames are all equal has |TPL| < 1e-5 for any parameters,
  and every NLL equals a full forward of the ``[video][text]`` row (test_eval_values);
- the command end to end with relative paths on 2 host devices, resumed after a torn
  tpl.jsonl on 1 device (same rows, no duplicate);
- the filter keeps exactly the rows counted by hand, and the pipeline yields exactly the
  kept (record, QA row) pairs.
"""
import collections
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import ROOT
from mashvlm_jax.analysis import tpl
from mashvlm_jax.convert import params_io
from mashvlm_jax.data import chat, pipeline, registry, row_filter
from mashvlm_jax.eval.scoring import Scorer
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.train import sharding
from test_eval_values import FullForward, sharpened, tiny_eval_config

TRAIN_SIZE = 6
# The tiny_eval_config model and data on the command line (the data dir relative).
CLI_CONFIG = [f"--config={ROOT}/configs/tiny_synthetic.py",
              "--config.model.vision.image_size=32", "--config.model.llm.num_layers=2",
              "--config.model.llm.vocab_size=256", "--config.data.builder_config=tiny",
              f"--config.data.train_size={TRAIN_SIZE}", "--config.data.test_size=2",
              "--config.data.data_dir=data"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A working directory holding the tiny data set (``data/``), the config, tokenizer,
  train records, and random sharpened parameters."""
  cwd = tmp_path_factory.mktemp("tpl")
  config = tiny_eval_config(cwd / "data")
  config.data.train_size = TRAIN_SIZE
  registry.ensure_built(config)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  records = pipeline.make_eval_records(config, "train")
  return dict(cwd=cwd, config=config, cfg=cfg, params=params,
              tok=registry.load_tokenizer(config), records=[records[i] for i in
                                                             range(len(records))],
              template=chat.ChatTemplate(**dict(config.data.template)))


def one_device_score_fn(bench, params):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  return tpl.make_score_fn(Scorer(bench["cfg"], params, bench["tok"].pad_id), mesh)


def clip_of(bench, record, keyframe):
  rows = tpl.encode_rows(bench["tok"], bench["template"], record["qa"],
                         bench["config"].data.text_len, record["id"])
  return tpl.Clip(record["frames"], keyframe, rows)


# ------------------------------------------------------------------------------ pieces

def test_keyframe_index_is_stable_uniform_and_has_fixed_modes():
  ids = [f"train/{i:06d}" for i in range(8000)]
  counts = collections.Counter(tpl.keyframe_index(3, c, 8) for c in ids)
  assert sorted(counts) == list(range(8))
  chi2 = sum((n - 1000) ** 2 / 1000 for n in counts.values())
  assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
  assert [tpl.keyframe_index(0, ids[0], 8, m) for m in ("first", "middle", "last")] == [0, 4, 7]
  assert tpl.keyframe_index(0, ids[0], 1) == 0
  # Another seed draws other frames; a fresh interpreter with another hash salt the same.
  assert [tpl.keyframe_index(4, c, 8) for c in ids[:50]] != [
      tpl.keyframe_index(3, c, 8) for c in ids[:50]]
  code = ("from mashvlm_jax.analysis import tpl; print([tpl.keyframe_index(3, f'train/{i:06d}',"
          " 8) for i in range(50)])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONHASHSEED="12345"), timeout=60)
  assert out.stdout.strip() == str([tpl.keyframe_index(3, c, 8) for c in ids[:50]])
  with pytest.raises(ValueError, match="keyframe mode"):
    tpl.keyframe_index(0, "x", 8, "centre")


def test_keyframe_video_tiles_one_frame():
  frames = np.arange(4 * 2 * 3 * 3, dtype=np.uint8).reshape(4, 2, 3, 3)
  tiled = tpl.keyframe_video(frames, 2)
  assert tiled.shape == frames.shape and tiled.dtype == np.uint8
  for t in range(4):
    np.testing.assert_array_equal(tiled[t], frames[2])
  with pytest.raises(ValueError, match="0 <= index < T"):
    tpl.keyframe_video(frames, 4)


def test_mean_answer_nll_and_tpl_by_hand():
  logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -1.5, -4.0]])
  mask = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], np.float32)  # [R, L] with L = W + 1
  np.testing.assert_allclose(tpl.mean_answer_nll(logp, mask), [2.5, 0.5])
  np.testing.assert_allclose(tpl.mean_answer_nll(logp, mask[:, :3]), [2.5, 0.5])
  np.testing.assert_allclose(tpl.tpl([3.0, 0.25], [2.5, 0.5]), [0.5, -0.25])
  with pytest.raises(ValueError, match="past the scored positions"):
    tpl.mean_answer_nll(logp, np.array([[0, 0, 0, 1], [1, 0, 0, 0]]))
  with pytest.raises(ValueError, match=r"rows \[1\] have no answer token"):
    tpl.mean_answer_nll(logp, np.array([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_answer_span_is_the_training_label_mask(bench):
  """Every row's ids and label mask are the training pipeline's for that QA alone; the
  scored tokens are the answer's words and </s>, and no token before or after."""
  config, tok = bench["config"], bench["tok"]
  transform = pipeline.example_transform(config, "train", augment=False)
  source = registry.data_source(config, "train")
  raw = source[0]
  record = pipeline.decode_record(raw)
  rows = tpl.encode_rows(tok, bench["template"], record["qa"], config.data.text_len,
                         record["id"])
  assert len(rows) == len(record["qa"]) == 8
  for k, (ids, mask) in enumerate(rows):
    one = dict(raw, qa={f: list(v[k:k + 1]) for f, v in raw["qa"].items()})
    train = transform(one, np.random.default_rng(0))
    n = int(train["text_mask"].sum())
    assert ids == train["text_ids"][:n].tolist()
    np.testing.assert_array_equal(mask, train["label_mask"])
    # By hand: the answer is the last len(answer) tokens; token_logprobs[i] scores ids[i+1].
    answer = tok.encode(record["qa"][k]["a"]) + [tok.eos_id]
    assert ids[-len(answer):] == answer
    width = len(mask) - 1
    logp_is_token = -np.array([[ids[i + 1] if i + 1 < n else 0 for i in range(width)]], float)
    assert tpl.mean_answer_nll(logp_is_token, mask[None]) == pytest.approx(np.mean(answer))
    prompt = n - len(answer)  # answer tokens sit at text positions prompt..n-1
    logp_is_position = -np.arange(1, width + 1, dtype=float)[None]  # [i] = -(i + 1)
    assert tpl.mean_answer_nll(logp_is_position, mask[None]) == pytest.approx(
        prompt + (len(answer) - 1) / 2)


# ------------------------------------------------------------------------------ stub scorer

def motion(frames) -> float:
  """Mean absolute frame-to-frame change / 255 (0 for a tiled keyframe)."""
  return float(np.abs(np.diff(frames.astype(np.float64), axis=0)).mean() / 255)


def stub_score_fn(devices):
  """A scorer whose log p(text[i+1]) = -(1 + motion of the row's clip) * (text[i+1] + 1)
  / 100, reading its clip through the device-local index of the packed batch."""
  def score(frames, clip_index, text_ids, text_mask):
    clips, rows = len(frames) // devices, len(clip_index) // devices
    out = np.zeros((len(text_ids), text_ids.shape[1] - 1))
    for r in range(len(text_ids)):
      clip = frames[(r // rows) * clips + clip_index[r]]
      out[r] = -(1 + motion(clip)) * (text_ids[r, 1:] + 1) / 100
    return out
  return score


@pytest.mark.parametrize("devices", [1, 2])
def test_stub_scorer_gives_the_hand_computed_nll_and_tpl(bench, tmp_path, devices):
  summary = tpl.run(bench["config"], "train", tmp_path, stub_score_fn(devices), devices,
                    seed=5, limit=3, batch_size=2, show_progress=False)
  rows = [json.loads(line) for line in (tmp_path / "tpl.jsonl").read_text().splitlines()]
  assert len(rows) == 3 * 8 and summary["rows"] == 24
  tok = bench["tok"]
  for row in rows:
    record = bench["records"][row["index"]]
    assert row["id"] == record["id"] and row["key"] == f"train:{record['id']}:{row['qa']}"
    qa = record["qa"][row["qa"]]
    assert (row["task"], row["kind"]) == (qa["task"], record["kind"])
    assert row["keyframe"] == tpl.keyframe_index(5, record["id"], 8)
    answer = np.array(tok.encode(qa["a"]) + [tok.eos_id], float)
    full = (1 + motion(record["frames"])) * np.mean(answer + 1) / 100
    key = np.mean(answer + 1) / 100
    assert row["nll_full"] == pytest.approx(full, rel=1e-12)
    assert row["nll_keyframe"] == pytest.approx(key, rel=1e-12)
    assert row["tpl"] == pytest.approx(key - full, rel=1e-12)
    assert row["tpl"] < 0  # this stub is more sure without motion


# ------------------------------------------------------------------------------ the model

def test_constant_clip_has_zero_tpl_and_nll_matches_a_full_forward(bench):
  """A clip of one repeated frame, batched beside a moving clip, has TPL 0 under any
  parameters; every NLL equals the mean over the answer of a full forward's -log p."""
  records, tok = bench["records"], bench["tok"]
  moving = clip_of(bench, records[1], keyframe=3)
  still = clip_of(bench, dict(records[0], frames=tpl.keyframe_video(records[0]["frames"], 5)),
                  keyframe=2)
  reference_rows = [(moving.frames, ids, mask) for ids, mask in moving.rows]
  reference_rows += [(tpl.keyframe_video(moving.frames, 3), ids, mask)
                     for ids, mask in moving.rows]
  for params in (bench["params"], nn.unbox(mashvlm.init_params(bench["cfg"],
                                                               jax.random.PRNGKey(7)))):
    (still_full, still_key), (full, key) = tpl.score_clips(
        one_device_score_fn(bench, params), [still, moving], 1,
        bench["config"].data.text_len, tok.pad_id)
    assert np.abs(tpl.tpl(still_key, still_full)).max() < 1e-5
    reference = FullForward(bench["cfg"], params, width=32)
    logp = reference.logprobs([f for f, _, _ in reference_rows],
                              [ids for _, ids, _ in reference_rows])
    expected = [-np.mean([lp[i, ids[i + 1]] for i in np.flatnonzero(mask[:len(ids) - 1])])
                for lp, (_, ids, mask) in zip(logp, reference_rows)]
    np.testing.assert_allclose(np.concatenate([full, key]), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(tpl.tpl(key, full)).max() > 1e-3  # the moving clip does differ


# ------------------------------------------------------------------------------ command

def run_tpl(cwd, *args, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("PYTEST_CURRENT_TEST", None)
  out = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", "tpl", *CLI_CONFIG, *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def test_command_relative_paths_two_devices_then_resume(bench):
  cwd = bench["cwd"]
  params_io.save_params(cwd / "ckpt", bench["params"], bench["cfg"])
  args = ["--checkpoint=ckpt", "--out=scores", "--limit=4", "--batch_size=3", "--seed=1"]
  out = run_tpl(cwd, *args, devices=2)
  scores = cwd / "scores"
  lines = (scores / "tpl.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert len(rows) == 4 * 8 and len({r["key"] for r in rows}) == 32
  # The same rows scored here on one device (a 2-device mesh splits each batch).
  clips = [clip_of(bench, r, tpl.keyframe_index(1, r["id"], 8)) for r in bench["records"][:4]]
  expected = tpl.score_clips(one_device_score_fn(bench, bench["params"]), clips, 1,
                             bench["config"].data.text_len, bench["tok"].pad_id)
  by_key = {r["key"]: r for r in rows}
  for record, (full, key) in zip(bench["records"][:4], expected):
    for k in range(8):
      row = by_key[f"train:{record['id']}:{k}"]
      assert row["nll_full"] == pytest.approx(full[k], abs=1e-5)
      assert row["nll_keyframe"] == pytest.approx(key[k], abs=1e-5)
  summary = json.loads((scores / "summary.json").read_text())
  for task, t in summary["tasks"].items():
    mine = [r["tpl"] for r in rows if r["task"] == task]
    assert t["rows"] == len(mine) and t["mean_tpl"] == pytest.approx(np.mean(mine))
    ordered = sorted(mine)  # quantiles by hand: linear interpolation at (n - 1) * q
    for cut, q in zip(t["tertiles"], (1 / 3, 2 / 3)):
      pos = (len(ordered) - 1) * q
      low = int(np.floor(pos))
      high = min(low + 1, len(ordered) - 1)
      assert cut == pytest.approx(ordered[low] + (pos - low) * (ordered[high] - ordered[low]))
    for kind, k in t["kinds"].items():
      assert k["mean_tpl"] == pytest.approx(np.mean([r["tpl"] for r in rows if r["task"] ==
                                                     task and r["kind"] == kind]))
      assert f"| {task} | {kind} | {k['rows']} | {k['mean_tpl']:.4f} |" in out.stdout
    assert (scores / f"tpl_{task}.png").read_bytes()[:4] == b"\x89PNG"
  assert set(summary["tasks"]) == {"action", "caption", "scene", "yes_no"}
  # Torn: five whole lines and half of the sixth; the rerun (one device) adds the rest.
  (scores / "tpl.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
  run_tpl(cwd, *args, devices=1)
  again = (scores / "tpl.jsonl").read_text().splitlines()
  assert again[:5] == lines[:5] and len(again) == 32
  resumed = {r["key"]: r for r in map(json.loads, again)}
  assert resumed.keys() == by_key.keys()
  for k, row in resumed.items():
    assert row["nll_full"] == pytest.approx(by_key[k]["nll_full"], abs=1e-5)
    assert row["tpl"] == pytest.approx(by_key[k]["tpl"], abs=1e-5)


# ------------------------------------------------------------------------------ the filter

def hand_rows():
  """9 action rows and 3 scene rows with hand-picked TPL (two ties at 0.5)."""
  values = {"a": 0.9, "b": 0.1, "c": 0.5, "d": -0.2, "e": 0.7, "f": 0.5, "g": 0.0,
            "h": 0.3, "i": 0.8, "s1": 2.0, "s2": -1.0, "s3": 0.4}
  return [{"key": k, "task": "scene" if k.startswith("s") else "action", "tpl": v}
          for k, v in values.items()]


def kept(**rule):
  return sorted(r["key"] for r in row_filter.select(hand_rows(), **rule))


def test_select_keeps_exactly_the_rows_counted_by_hand():
  # 12 rows, a third is 4: by TPL 2.0 s1, 0.9 a, 0.8 i, 0.7 e | 0.5 c, 0.5 f, ...
  assert kept() == ["a", "e", "i", "s1"]
  # the bottom 4: -1.0 s2, -0.2 d, 0.0 g, 0.1 b
  assert kept(rule="bottom") == ["b", "d", "g", "s2"]
  # per task: 9 action rows -> 3 (a, i, e); 3 scene rows -> 1 (s1)
  assert kept(per_task=True) == ["a", "e", "i", "s1"]
  assert kept(rule="bottom", per_task=True) == ["b", "d", "g", "s2"]
  # 0.4 of 9 action rows is 3.6 -> 4: a, i, e, then of the tie 0.5 c, f the first key (c);
  # 0.4 of 3 scene rows is 1.2 -> 1 (s1). Half: 4.5 -> 5 (c and f) and 1.5 -> 2 (s1, s3).
  assert kept(fraction=0.4, per_task=True) == ["a", "c", "e", "i", "s1"]
  assert kept(fraction=0.5, per_task=True) == ["a", "c", "e", "f", "i", "s1", "s3"]
  assert kept(rule="above", threshold=0.5) == ["a", "e", "i", "s1"]  # strictly above
  assert kept(rule="above", threshold=-0.1) == sorted(
      k for k in "abcdefghi" if k != "d") + ["s1", "s3"]


def write_tpl(config, path):
  """A tpl.jsonl over every QA row of the train split with arbitrary distinct TPL."""
  source = registry.data_source(config, "train")
  rows = []
  for index in range(len(source)):
    record = pipeline.decode_record(source[index])
    for k, qa in enumerate(record["qa"]):
      rows.append({"key": f"train:{record['id']}:{k}", "split": "train", "id": record["id"],
                   "index": index, "qa": k, "task": qa["task"], "kind": record["kind"],
                   "tpl": float((index * 37 + k * 11) % 53) / 10})
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def filtered_config(bench, path, **rule):
  config = tiny_eval_config(bench["config"].data.data_dir)
  config.data.train_size = TRAIN_SIZE
  config.data.batch_size = 1
  config.data.row_filter = dict(path=str(path), **rule)
  return config


def test_pipeline_yields_only_the_kept_pairs(bench, tmp_path, caplog):
  rows = write_tpl(bench["config"], tmp_path / "tpl.jsonl")
  config = filtered_config(bench, tmp_path / "tpl.jsonl")
  top = sorted(rows, key=lambda r: -r["tpl"])[:16]  # a third of 48 rows
  assert top[-1]["tpl"] > sorted(r["tpl"] for r in rows)[-17]  # no tie at the cut
  tok, template = bench["tok"], bench["template"]
  records = {r["id"]: r for r in bench["records"]}
  want = collections.Counter(
      tuple(chat.encode_example(tok, template, [records[r["id"]]["qa"][r["qa"]]],
                                config.data.text_len)[0]["text_ids"]) for r in top)
  with caplog.at_level("INFO", logger="mashvlm.data"):
    it = pipeline.make_iterator(config, "train", process_index=0, process_count=1,
                                shuffle=False, num_epochs=1, augment=False)
    got = collections.Counter(tuple(b["text_ids"][0]) for b in it)
  assert got == want
  assert "kept 16 of the 48 QA rows of split 'train'" in caplog.text
  # qa_mode "all": one example per record holding its kept rows, in QA order.
  config.data.qa_mode = "all"
  source = grain_source(config)
  ds = row_filter.apply(source, config, "train")
  per_record = collections.defaultdict(list)
  for r in top:
    per_record[r["index"]].append(r["qa"])
  assert len(ds) == len(per_record)
  for position, (index, ks) in enumerate(sorted(per_record.items())):
    item = ds[position]
    expected = [bench["records"][index]["qa"][k]["q"] for k in sorted(ks)]
    assert [q.decode() if isinstance(q, bytes) else q for q in item["qa"]["q"]] == expected


def grain_source(config):
  import grain
  return grain.MapDataset.source(registry.data_source(config, "train"))


def test_filter_errors_name_the_problem(bench, tmp_path):
  rows = write_tpl(bench["config"], tmp_path / "tpl.jsonl")
  source = grain_source(bench["config"])
  with pytest.raises(FileNotFoundError, match="mashvlm tpl"):
    row_filter.apply(source, filtered_config(bench, tmp_path / "none.jsonl"), "train")
  with pytest.raises(ValueError, match="rule must be one of"):
    row_filter.apply(source, filtered_config(bench, tmp_path / "tpl.jsonl", rule="best"),
                     "train")
  with pytest.raises(ValueError, match=r"unknown fields \['top'\]"):
    row_filter.apply(source, filtered_config(bench, tmp_path / "tpl.jsonl", top=0.3), "train")
  torn = tmp_path / "torn.jsonl"
  torn.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:15])
  with pytest.raises(ValueError, match="torn.jsonl line 2 is not JSON"):
    row_filter.apply(source, filtered_config(bench, torn), "train")
  other = tmp_path / "other.jsonl"  # scored on another build: the ids moved
  other.write_text("".join(json.dumps(dict(r, index=(r["index"] + 1) % TRAIN_SIZE)) + "\n"
                           for r in rows))
  ds = row_filter.apply(source, filtered_config(bench, other), "train")
  with pytest.raises(ValueError, match="score this build again"):
    ds[0]
  # Other splits and an empty path are untouched.
  assert row_filter.apply(source, filtered_config(bench, other), "test_typical") is source
  assert row_filter.apply(source, filtered_config(bench, ""), "train") is source
