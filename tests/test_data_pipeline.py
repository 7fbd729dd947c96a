"""The Grain pipeline: batch contract, answer-only labels, chat truncation, checkpointable
iterator state (0 and 2 workers), per-process shards, evaluation records."""
import hashlib

import numpy as np
import pytest

from conftest import load_config
from mashvlm_jax.data import chat, pipeline, registry, synthetic
from mashvlm_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = load_config("tiny_synthetic")
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  config.data.builder_config = "tiny"
  config.data.batch_size = 8
  registry.ensure_built(config)
  return config


@pytest.fixture(scope="module")
def tok(config):
  return registry.load_tokenizer(config)


def take(it, n):
  return [next(it) for _ in range(n)]


def same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def digest(frames):
  return hashlib.sha1(np.ascontiguousarray(frames).tobytes()).hexdigest()


def test_batch_contract(config, tok):
  it = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
  batch = next(it)
  t, size, length = config.model.num_frames, config.model.vision.image_size, config.data.text_len
  assert sorted(batch) == sorted(pipeline.BATCH_KEYS)
  expected = {"frames": (np.uint8, (8, t, size, size, 3)), "text_ids": (np.int32, (8, length)),
              "text_mask": (np.bool_, (8, length)), "labels": (np.int32, (8, length)),
              "label_mask": (np.float32, (8, length))}
  for key, (dtype, shape) in expected.items():
    assert batch[key].dtype == dtype and batch[key].shape == shape, key
  answers = {a.lower() for spec in synthetic.clip_specs("train", 64)
             for a in (q["a"] for q in pipeline_questions(spec))}
  for row in range(8):
    ids, mask = batch["text_ids"][row], batch["text_mask"][row]
    n = int(mask.sum())
    assert mask[:n].all() and not mask[n:].any()  # right padding
    assert ids[0] == tok.bos_id and ids[n - 1] == tok.eos_id and (ids[n:] == tok.pad_id).all()
    np.testing.assert_array_equal(batch["labels"][row][:n - 1], ids[1:n])
    assert (batch["labels"][row][n - 1:] == 0).all()
    # The answer: every token after the last "assistant :" marker, up to </s> inclusive.
    marker = tok.encode("ASSISTANT:")
    starts = [i for i in range(n) if list(ids[i:i + len(marker)]) == marker]
    first_answer = starts[-1] + len(marker)
    want = np.zeros(length, np.float32)
    want[first_answer - 1:n - 1] = 1.0  # position i predicts token i + 1
    np.testing.assert_array_equal(batch["label_mask"][row], want)
    answer = tok.decode(batch["labels"][row][batch["label_mask"][row] > 0])
    assert answer.endswith(" </s>") and answer[:-5] in {
        " ".join(tokenizer_lib.split_words(a)) for a in answers}
  it.close()


def pipeline_questions(spec):
  from mashvlm_jax.data import builders
  return builders.synthetic_questions(spec)


def test_labels_cover_exactly_the_answers_multi_turn(tok):
  turns = [{"q": "What is the person doing?", "a": "Boxing.", "i": ""},
           {"q": "Is the person running?", "a": "No", "i": ""}]
  row, report = chat.encode_example(tok, chat.ChatTemplate(), turns, 40)
  assert report == {"dropped_turns": 0, "cut_head_tokens": 0, "cut_question_tokens": 0}
  ids = row["text_ids"][row["text_mask"]].tolist()
  # Reference built by hand from the pieces of the template.
  u, q1, a1 = tok.encode("USER:"), tok.encode(turns[0]["q"]), tok.encode("Boxing.")
  q2, a2, asst = tok.encode(turns[1]["q"]), tok.encode("No"), tok.encode("ASSISTANT:")
  eos = [tok.eos_id]
  assert ids == [tok.bos_id] + u + q1 + asst + a1 + eos + u + q2 + asst + a2 + eos
  answer_positions = set()
  start = 1 + len(u + q1 + asst)
  answer_positions |= set(range(start, start + len(a1) + 1))
  start += len(a1) + 1 + len(u + q2 + asst)
  answer_positions |= set(range(start, start + len(a2) + 1))
  assert set(np.nonzero(row["label_mask"])[0] + 1) == answer_positions


def test_truncation_never_cuts_an_answer(tok):
  template = chat.ChatTemplate(system="Describe the video in detail.")
  turns = [{"q": "Is there only a beach, with no one in it?", "a": "No", "i": ""},
           {"q": "What is the person doing?", "a": "Swimming.", "i": ""}]
  full, report = chat.encode_example(tok, template, turns, 64)
  n_full = int(full["text_mask"].sum())
  row, report = chat.encode_example(tok, template, turns, n_full - 1)
  assert report["dropped_turns"] == 1 and report["cut_head_tokens"] == 0
  one_turn = int(row["text_mask"].sum())
  row, report = chat.encode_example(tok, template, turns, one_turn - 3)
  assert report["dropped_turns"] == 1 and report["cut_head_tokens"] == 3
  head_len = 1 + len(tok.encode(template.system))
  row, report = chat.encode_example(tok, template, turns, one_turn - head_len - 2)
  assert report["cut_head_tokens"] == head_len - 1 and report["cut_question_tokens"] == 3
  ids = row["text_ids"][row["text_mask"]].tolist()
  assert ids[-2:] == tok.encode("No") + [tok.eos_id]  # the answer is whole
  user, assistant = tok.encode("USER:"), tok.encode("ASSISTANT:")
  assert ids[-2 - len(assistant):-2] == assistant
  assert ids[:1 + len(user)] == [tok.bos_id] + user
  question = ids[1 + len(user):-2 - len(assistant)]
  assert question == tok.encode(turns[0]["q"])[3:]  # cut from its start, its end kept
  with pytest.raises(chat.TooLongError, match="data.text_len=5"):
    chat.encode_example(tok, template, turns, 5)


def test_iterator_state_restores_the_next_batches(config):
  it = pipeline.make_iterator(config, "train", process_index=0, process_count=1, seed=7)
  take(it, 5)  # 8 train batches per epoch: the next ones cross into epoch 2
  state = it.get_state()
  expected = take(it, 6)
  restored = pipeline.make_iterator(config, "train", process_index=0, process_count=1, seed=7)
  restored.set_state(state)
  assert same(take(restored, 6), expected)
  other = pipeline.make_iterator(config, "train", process_index=0, process_count=1, seed=8)
  assert not same(take(other, 1), take(pipeline.make_iterator(
      config, "train", process_index=0, process_count=1, seed=7), 1))
  for i in (it, restored, other):
    i.close()


def test_epochs_are_reshuffled_and_complete(config):
  it = pipeline.make_iterator(config, "test_unusual", process_index=0, process_count=1,
                              num_epochs=2, augment=False)
  batches = list(it)
  assert len(batches) == 14  # 56 clips, batch 8, two epochs
  epochs = [[digest(f) for b in batches[k * 7:(k + 1) * 7] for f in b["frames"]]
            for k in range(2)]
  assert len(set(epochs[0])) == 56 and set(epochs[0]) == set(epochs[1])
  assert epochs[0] != epochs[1]


def test_two_workers_match_zero_workers_and_restore(config):
  config = config.copy_and_resolve_references()
  config.data.num_workers = 2
  it = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
  first = take(it, 3)
  state = it.get_state()
  rest = take(it, 3)
  it.close()
  restored = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
  restored.set_state(state)
  got = take(restored, 3)
  restored.close()
  assert same(got, rest)
  config.data.num_workers = 0
  serial = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
  assert same(take(serial, 6), first + rest)
  serial.close()


def test_processes_read_disjoint_shards_covering_the_split(config):
  stored = {digest(r["video"]) for r in map(pipeline.decode_record,
                                            registry.data_source(config, "test_unusual"))}
  seen = []
  for index in range(2):
    it = pipeline.make_iterator(config, "test_unusual", process_index=index, process_count=2,
                                num_epochs=1, augment=False)
    batches = list(it)
    assert all(b["frames"].shape[0] == 4 for b in batches)  # 8 global / 2 processes
    seen.append([digest(f) for b in batches for f in b["frames"]])
  assert len(seen[0]) == len(seen[1]) == 28
  assert not set(seen[0]) & set(seen[1])
  assert set(seen[0]) | set(seen[1]) == stored
  with pytest.raises(ValueError, match="not divisible by the process count 3"):
    pipeline.make_iterator(config, "train", process_index=0, process_count=3)


def test_augmentation_and_eval_records(config):
  aug = next(pipeline.make_iterator(config, "test_typical", process_index=0, process_count=1,
                                    shuffle=False, augment=True))
  plain = next(pipeline.make_iterator(config, "test_typical", process_index=0,
                                      process_count=1, shuffle=False))
  records = pipeline.make_eval_records(config, "test_typical")
  assert len(records) == 16
  np.testing.assert_array_equal(plain["frames"][0], records[0]["frames"])
  assert not np.array_equal(aug["frames"], plain["frames"])  # crops differ
  record = records[3]
  assert record["frames"].shape == (8, 64, 64, 3) and record["kind"] == "typical"
  binary = [q for q in record["qa"] if q["task"] == "unscene_binary"]
  assert [q["pair"] for q in binary] == [0, 0, 1, 1]
  assert record["action"] in synthetic.ACTIONS and record["scene"] in synthetic.SCENES


def test_crop_resize_matches_pointwise_bilinear_reference():
  from mashvlm_jax.data import frames
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
  np.testing.assert_array_equal(frames.crop_resize(video, (0, 0, 7, 9), 7, 9), video)
  box, out_h, out_w = (1.5, 2.25, 4.0, 5.5), 3, 4
  got = frames.crop_resize(video, box, out_h, out_w)

  def sample(frame, y, x):  # bilinear at continuous pixel coordinates, edge-clamped
    y, x = min(max(y, 0), 6), min(max(x, 0), 8)
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, 6), min(x0 + 1, 8)
    fy, fx = y - y0, x - x0
    top = frame[y0, x0] * (1 - fx) + frame[y0, x1] * fx
    bottom = frame[y1, x0] * (1 - fx) + frame[y1, x1] * fx
    return top * (1 - fy) + bottom * fy

  for t in range(2):
    for i in range(out_h):
      for j in range(out_w):
        y = box[0] + (i + 0.5) * box[2] / out_h - 0.5
        x = box[1] + (j + 0.5) * box[3] / out_w - 0.5
        want = sample(video[t].astype(float), y, x)
        assert np.abs(got[t, i, j] - want).max() <= 0.5 + 1e-3
  assert frames.resize(np.zeros((3, 20, 30, 3), np.uint8), 10).shape == (3, 10, 10, 3)


def test_sentencepiece_and_missing_tokenizers(tmp_path, config):
  import pickle

  import sentencepiece
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["A person is skiing on a snowy mountain.",
                               "Is the person boxing? No", "USER: ASSISTANT: Yes"] * 50))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                           vocab_size=60, hard_vocab_limit=False,
                                           minloglevel=2)
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "sp.model"), "sentencepiece")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  tok = pickle.loads(pickle.dumps(tok))  # what Grain workers receive
  assert tok.decode(tok.encode("Is the person skiing?")) == "Is the person skiing?"
  row, _ = chat.encode_example(tok, chat.ChatTemplate(), [{"q": "Is the person boxing?",
                                                          "a": "No", "i": ""}], 40)
  answer = row["labels"][row["label_mask"] > 0].tolist()
  assert answer == tok.encode("No") + [tok.eos_id]
  with pytest.raises(FileNotFoundError, match="nothing.json"):
    tokenizer_lib.Tokenizer(str(tmp_path / "nothing.json"), "hf")
  small = config.copy_and_resolve_references()
  small.model.llm.vocab_size = 16
  with pytest.raises(ValueError, match="vocab_size is 16"):
    registry.load_tokenizer(small)


def test_process_shares_make_up_the_single_process_global_batches(config):
  """Multi-host runs train on the single-host batches: each global batch is the union
  of the processes' local batches."""
  def rows(it, n):
    return [sorted(digest(f) for f in next(it)["frames"]) for _ in range(n)]
  single = rows(pipeline.make_iterator(config, "train", process_index=0, process_count=1), 3)
  parts = [rows(pipeline.make_iterator(config, "train", process_index=i, process_count=2), 3)
           for i in range(2)]
  for k in range(3):
    assert sorted(parts[0][k] + parts[1][k]) == single[k]
    assert not set(parts[0][k]) & set(parts[1][k])
