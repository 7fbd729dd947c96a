"""HACA rows (data/tasks/haca.py): the masking rule measured over many draws, the answer-only
labels of HACA rows through the pipeline, [MASK] as one token in every tokenizer kind, and
the VideoCon / VELOCITI / SSv2 layouts built by `mashvlm make-data` with relative paths."""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_config
from mashvlm_jax.data import builders, pipeline, registry, synthetic
from mashvlm_jax.data import tokenizer as tokenizer_lib
from mashvlm_jax.data.tasks import families, haca
from test_data_video import write_indexed_mp4

# Hand-tagged sentences: the content words (POS not AUX, SYM, DET or PUNCT) by index.
TAGGED = [
    # A/DET person is/AUX skiing on a/DET snowy mountain ./PUNCT
    ("A person is skiing on a snowy mountain.", ["person", "skiing", "on", "snowy",
                                                 "mountain"]),
    # There is/AUX no/DET one in a/DET library ./PUNCT
    ("There is no one in a library.", ["There", "one", "in", "library"]),
    # The/DET man 's/PART... : 's is a clitic of "man's" (AUX in the list), & is SYM
    ("The man's dog was running quickly, and it jumped over 2 fences & a wall!",
     ["man", "dog", "running", "quickly", "and", "it", "jumped", "over", "2", "fences",
      "wall"]),
    ("Yes.", ["Yes"]),
]
# k = max(1, round-half-up(0.45 n)), written out by hand for the n above and a few more.
K_OF_N = {1: 1, 2: 1, 3: 1, 4: 2, 5: 2, 10: 5, 11: 5, 12: 5, 20: 9, 30: 14}


def words_of(text):
  return haca.split_words(text)


@pytest.mark.parametrize("text,content", TAGGED)
def test_content_words_follow_the_closed_class_list(text, content):
  words = words_of(text)
  assert [words[i] for i in haca.content_word_positions(words)] == content


def test_number_masked_is_the_rule():
  assert {n: haca.num_masked(n, 0.45) for n in K_OF_N} == K_OF_N
  assert haca.num_masked(0) == 0


@pytest.mark.parametrize("text,content", TAGGED[:3])
def test_masking_rate_and_masked_words_over_many_draws(text, content):
  """2000 draws: exactly k masks each, only content words masked (each its own [MASK]),
  every other character kept, and each content word masked with frequency k / n."""
  rng = np.random.default_rng(0)
  words = words_of(text)
  n, k = len(content), K_OF_N[len(content)]
  content_index = [i for i, w in enumerate(words) if w in content]
  hits = collections.Counter()
  draws = 2000
  for _ in range(draws):
    masked = haca.mask_caption(text, 0.45, rng)
    got = words_of(masked)
    assert len(got) == len(words)  # one [MASK] per masked word, nothing else changes
    changed = [i for i, (a, b) in enumerate(zip(words, got)) if a != b]
    assert len(changed) == k and all(got[i] == "[MASK]" for i in changed)
    assert set(changed) <= set(content_index)
    hits.update(changed)
    # The text around the masks is the original's, character for character.
    pattern = "".join(w if i not in changed else "\0" for i, w in enumerate(words))
    assert masked.replace(" ", "").replace("[MASK]", "\0") == pattern.replace(" ", "")
  share = np.array([hits[i] / draws for i in content_index])
  # Binomial standard error at p = k/n with 2000 draws is below 0.012; allow 4 of them.
  np.testing.assert_allclose(share, k / n, atol=0.045)


def test_masking_leaves_a_caption_without_content_words_and_checks_the_rate():
  rng = np.random.default_rng(0)
  assert haca.mask_caption("is the a .", 0.45, rng) == "is the a ."
  with pytest.raises(ValueError, match="masking rate"):
    haca.mask_caption("A dog.", 1.5, rng)


def test_a_given_tagger_decides_and_spacy_is_never_required(monkeypatch):
  tags = {"Dogs": "NOUN", "do": "AUX", "run": "VERB", "!": "PUNCT"}
  words = ["Dogs", "do", "run", "!"]
  assert haca.content_word_positions(words, lambda ws: [tags[w] for w in ws]) == [0, 2]
  monkeypatch.setitem(sys.modules, "spacy", None)  # as when spaCy is not installed
  with pytest.raises(ImportError, match="pip install spacy"):
    haca.spacy_tagger()


def test_family_rows_are_one_positive_one_negative_and_one_mask_row():
  ctx = families.BuildContext(num_frames=2, size=8)
  for spec in synthetic.clip_specs("train", 40, scene_only_share=0.2):
    truth = haca.caption(spec.action, spec.scene)
    rows = builders.synthetic_questions(spec, train_tasks=("haca_mask",), ctx=ctx)
    pos, neg, mask = rows[-3:]
    assert pos == {"i": "", "q": f"Does this caption accurately describe the video? "
                   f"Caption: {truth}", "a": "Yes, the caption accurately describes the video.",
                   "task": "haca", "aspect": "", "pair": -1}
    assert neg["a"] == f"No. This caption shall be corrected as: {truth}"
    negative = neg["q"].split("Caption: ", 1)[1]
    assert negative != truth and neg["aspect"] in ("action", "scene", "person")
    if neg["aspect"] == "action":  # the hallucination label: the scene's typical action
      want = synthetic.TYPICAL_ACTION[spec.scene]
      assert want in negative or spec.kind == "typical"
    assert mask["q"] == ("Please correct this caption to accurately describe the video. "
                         f"Caption: {truth}") and mask["a"] == truth
    plain = builders.synthetic_questions(spec, train_tasks=("entailment",), ctx=ctx)[-2:]
    assert [r["a"] for r in plain] == ["Yes", "No"]


# ------------------------------------------------------------------------------ pipeline

@pytest.fixture(scope="module")
def haca_data(tmp_path_factory):
  config = load_config("tiny_synthetic", "recipe=haca_mask")
  config.data.update(data_dir=str(tmp_path_factory.mktemp("data")), builder_config="tiny",
                     train_size=4, test_size=2, stored_frames=2, stored_size=8,
                     scene_only_share=0.25)
  registry.ensure_built(config)
  return config


def encode_reference(path, text):
  """Token ids of ``text`` straight from the stored tokenizer file (tokenizers library)."""
  import tokenizers
  return tokenizers.Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids


def test_haca_row_label_mask_covers_exactly_the_answer_tokens(haca_data):
  transform = pipeline.example_transform(haca_data, "train")
  tok = transform.tok
  raw = registry.data_source(haca_data, "train")[1]
  qa = pipeline.decode_record(raw)["qa"]
  assert [q["task"] for q in qa[-3:]] == ["haca", "haca", "haca_mask"]
  masks = set()
  for k in range(len(qa) - 3, len(qa)):
    for seed in range(3):
      one = {f: list(v[k:k + 1]) for f, v in raw["qa"].items()}
      row = transform(dict(raw, qa=one), np.random.default_rng(seed))
      n = int(row["text_mask"].sum())
      ids = row["text_ids"][:n].tolist()
      answer = encode_reference(tok.path, qa[k]["a"]) + [tok.eos_id]
      # label i is token i + 1: the answer tokens and </s> are the last len(answer) tokens
      want = np.zeros(len(row["label_mask"]))
      want[n - 1 - len(answer):n - 1] = 1
      np.testing.assert_array_equal(row["label_mask"], want)
      assert row["labels"][row["label_mask"] > 0].tolist() == answer
      prompt = tok.decode(ids[:n - len(answer)])
      assert prompt.endswith("assistant :")
      if qa[k]["task"] == "haca_mask":  # masked afresh per visit, the target unmasked
        shown = prompt.split("caption :")[1]
        truth = haca.split_words(qa[k]["a"])
        k_masks = haca.num_masked(len(haca.content_word_positions(truth)))
        assert shown.count("[MASK]") == k_masks
        mask_id = tok.tokens().index("[MASK]")
        assert ids.count(mask_id) == k_masks
        masks.add(shown)
  assert len(masks) > 1


# ------------------------------------------------------------------------------ [MASK]

def test_mask_is_one_token_in_the_word_tokenizer(haca_data):
  tok = registry.load_tokenizer(haca_data)
  mask_id = tok.tokens().index("[MASK]")
  ids = tok.encode("Caption: a [MASK] is [MASK] on a snowy mountain.")
  assert ids.count(mask_id) == 2 and len(ids) == 11
  assert tok.decode(ids) == "caption : a [MASK] is [MASK] on a snowy mountain ."
  assert tok.unk_id not in ids


def write_hf_tokenizer(path, words):
  """A word-level HuggingFace tokenizer.json with <unk> <s> </s> and ``words``."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + list(words))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])
  tok.save(str(path))
  return len(vocab)


def test_mask_is_added_to_a_users_hf_tokenizer_and_the_vocab_size_is_checked(tmp_path):
  size = write_hf_tokenizer(tmp_path / "tok.json", ["a", "dog", "runs", "."])
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "tok.json"), "hf", extra="[MASK]")
  assert tok.encode("a [MASK] runs.") == [3, size, 5, 6] and tok.vocab_size == size + 1
  plain = tokenizer_lib.Tokenizer(str(tmp_path / "tok.json"), "hf")
  assert plain.vocab_size == size and len(plain.encode("a [MASK] runs.")) > 4

  config = load_config("tiny_synthetic")
  config.data.update(name="local_video_qa", annotations={"train": "x.json"},
                     tokenizer=dict(kind="hf", path=str(tmp_path / "tok.json"), bos="<s>",
                                    eos="</s>"), train_tasks=("haca_mask",))
  config.model.llm.vocab_size = size
  with pytest.raises(ValueError, match=rf"has {size + 1} tokens but model.llm.vocab_size is "
                                       rf"{size} after adding the \[MASK\] token"):
    registry.load_tokenizer(config)
  config.model.llm.vocab_size = size + 1
  assert registry.load_tokenizer(config).encode("[MASK]") == [size]
  config.data.train_tasks = ("haca",)  # no masking rows: the file as it is
  config.model.llm.vocab_size = size
  assert registry.load_tokenizer(config).vocab_size == size


def test_mask_is_one_token_in_a_sentencepiece_model(tmp_path):
  sentencepiece = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["a dog runs on a beach", "a person is skiing",
                               "the cat sleeps in a library"] * 50))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
      model_type="word", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "sp.model"), "sentencepiece", extra="[MASK]")
  proc = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  size = proc.get_piece_size()
  ids = tok.encode("a [MASK] runs")
  assert ids == proc.encode("a") + [size] + proc.encode(" runs")
  assert tok.vocab_size == size + 1 and tok.tokens()[-1] == "[MASK]"
  assert tok.decode(ids).replace(" ", "") == "a[MASK]runs"


# ------------------------------------------------------------------------------ layouts

def run_cli(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("MASHVLM_DATA_DIR", None)
  out = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


# A user's config file: the tiny model on their annotations, every path relative.
USER_CONFIG = """
import importlib.util

def get_config(arg=None):
  spec = importlib.util.spec_from_file_location("tiny", "configs/tiny_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.data.update(dict(
      name="local_video_qa", data_dir="cache", video_root="videos", stored_frames=2,
      stored_size=8, max_failure_share=0.5, train_tasks=("haca_mask",),
      tokenizer=dict(kind="hf", path="tok.json", bos="<s>", eos="</s>"),
      annotations={"train": "ann/videocon.json", "velociti": "ann/velociti.json",
                   "ssv2": "ann/ssv2.json"}))
  return config
"""


def test_haca_layouts_build_through_make_data_with_relative_paths(tmp_path):
  (tmp_path / "configs").symlink_to(ROOT / "configs")
  videos = tmp_path / "videos"
  videos.mkdir()
  for k in range(3):
    write_indexed_mp4(videos / f"v{k}.mp4", 12, width=32, height=32)
  ann = tmp_path / "ann"
  ann.mkdir()
  (ann / "videocon.json").write_text(json.dumps([
      {"video": "v0.mp4", "caption": "A dog runs.", "contrast_caption": "A cat runs.",
       "contrast_type": "object"},
      {"video": "v1.mp4", "caption": "A dog sits.", "contrast_caption": "A dog runs."},
      {"video": "v2.mp4", "caption": "A dog runs.", "contrast_caption": ""}]))  # bad
  (ann / "velociti.json").write_text(json.dumps([
      {"video": "v0.mp4", "positive_caption": "A dog runs.",
       "negative_caption": "A dog sits.", "type": "action"},
      {"video": "v1.mp4", "positive_caption": "A dog sits.", "negative_caption": 3}]))  # bad
  (ann / "ssv2.json").write_text(json.dumps([
      {"video": "v0.mp4", "label": "A dog runs."}, {"video": "v1.mp4", "label": "A dog sits."},
      {"video": "v2.mp4", "label": "A dog runs."}]))
  write_hf_tokenizer(tmp_path / "tok.json", ["A", "dog", "runs", "sits", "cat", ".", "USER",
                                             "ASSISTANT", ":"])
  (tmp_path / "haca_data.py").write_text(USER_CONFIG)
  args = ["--config=haca_data.py"]
  out = run_cli("make-data", *args, cwd=tmp_path)
  assert "skipped 1 of 3 records" in out.stdout and "skipped 1 of 2 records" in out.stdout
  assert "videocon.json record 2" in out.stdout and "field 'contrast_caption' is empty" in (
      out.stdout)
  assert ("velociti.json record 1" in out.stdout
          and "field 'negative_caption' should be str, found int" in out.stdout)

  config = load_config("tiny_synthetic")
  config.data.update(name="local_video_qa", data_dir=str(tmp_path / "cache"),
                     video_root=str(videos), stored_frames=2, stored_size=8,
                     max_failure_share=0.5, train_tasks=("haca_mask",),
                     tokenizer=dict(kind="hf", path=str(tmp_path / "tok.json"), bos="<s>",
                                    eos="</s>"),
                     annotations={"train": str(ann / "videocon.json"),
                                  "velociti": str(ann / "velociti.json"),
                                  "ssv2": str(ann / "ssv2.json")})
  b = registry.built_builder(config)
  assert str(b.data_path).startswith(f"{tmp_path}/cache/")  # the relative data_dir
  read = lambda split: sorted((pipeline.decode_record(r) for r in registry.data_source(
      config, split)), key=lambda r: r["id"])  # noqa: E731 (stored order is TFDS's)
  train = read("train")
  assert [r["source"] for r in train] == ["v0.mp4", "v1.mp4"]
  assert [(q["q"], q["a"], q["task"], q["aspect"]) for q in train[0]["qa"]] == [
      ("Does this caption accurately describe the video? Caption: A dog runs.",
       "Yes, the caption accurately describes the video.", "haca", ""),
      ("Does this caption accurately describe the video? Caption: A cat runs.",
       "No. This caption shall be corrected as: A dog runs.", "haca", "object"),
      ("Please correct this caption to accurately describe the video. Caption: A dog runs.",
       "A dog runs.", "haca_mask", "")]
  (pair,) = read("velociti")
  assert [(q["q"], q["a"], q["task"], q["aspect"], q["pair"]) for q in pair["qa"]] == [
      ("A dog runs.", "Yes", "haca_pair", "action", 0),
      ("A dog sits.", "No", "haca_pair", "action", 0)]
  assert [r["qa"][0]["q"] for r in read("ssv2")] == ["A dog runs.", "A dog sits.",
                                                     "A dog runs."]
  # The masking rows train with [MASK] as one token of the user's tokenizer.
  transform = pipeline.example_transform(config, "train")
  mask_id = transform.tok.vocab_size - 1
  assert transform.tok.encode("[MASK]") == [mask_id]
  raw = sorted(registry.data_source(config, "train"), key=lambda r: r["id"])[0]
  one = {f: list(v[2:3]) for f, v in raw["qa"].items()}  # the masking row
  row = transform(dict(raw, qa=one), np.random.default_rng(0))
  ids = row["text_ids"][:int(row["text_mask"].sum())].tolist()
  # "A dog runs." has 2 content words (dog, runs): k = max(1, round(0.9)) = 1 mask
  assert ids.count(mask_id) == 1
  assert row["labels"][row["label_mask"] > 0].tolist() == (
      transform.tok.encode("A dog runs.") + [transform.tok.eos_id])


# ------------------------------------------------------------------------------ recipes

def test_tiny_recipe_sets_the_family_and_every_row_fits_its_text_len(tmp_path):
  from mashvlm_jax.data import chat
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(builders.vocabulary_texts()),
                            tmp_path / "words.json")
  tok = tokenizer_lib.Tokenizer(str(tmp_path / "words.json"), "hf")
  for recipe in ("entailment", "haca", "haca_mask"):
    config = load_config("tiny_synthetic", f"recipe={recipe}")
    assert tuple(config.data.train_tasks) == (recipe,) and config.data.text_len == 48
    ctx = families.BuildContext(num_frames=2, size=8)
    for spec in synthetic.clip_specs("train", 48, scene_only_share=0.2):
      rows = builders.synthetic_questions(spec, train_tasks=(recipe,), ctx=ctx)
      for row in rows:
        _, _, report = chat.fit(*chat.encode_turns(tok, chat.ChatTemplate(), [row]),
                                config.data.text_len)
        assert not any(report.values()), row  # nothing of a HACA row is truncated
  assert load_config("tiny_synthetic").data.train_tasks == ()
  with pytest.raises(ValueError, match="recipe must be one of"):
    load_config("tiny_synthetic", "recipe=lora")


def test_7b_recipe_is_the_papers_two_lora_settings():
  base = load_config("mashvlm_7b")
  assert base.model.lora.rank == 0 and base.optim.lr == 2e-5  # LoRA off by default
  small = load_config("mashvlm_7b", "haca=lora16")
  assert dict(small.model.lora)["rank"] == 16 and dict(small.model.lora)["alpha"] == 32.0
  assert small.optim.lr == 2e-5 and small.model.freeze_vision
  assert tuple(small.data.train_tasks) == ("haca",)
  large = load_config("mashvlm_7b", "haca=lora128,haca_family=haca_mask,train_examples=1000")
  assert (large.model.lora.rank, large.model.lora.alpha, large.optim.lr) == (128, 256.0, 2e-4)
  assert tuple(large.data.train_tasks) == ("haca_mask",)
  assert large.total_steps == 24  # 3 epochs of 1000 records at batch 128: ceil(23.4)
  assert all(p in large.model.lora.targets for p in ("q_proj", "v_proj", "down_proj"))
  with pytest.raises(ValueError, match="haca must be one of"):
    load_config("mashvlm_7b", "haca=lora8")


def test_users_data_takes_one_haca_family():
  assert builders.local_haca_family(()) == "haca"
  assert builders.local_haca_family(("haca_mask",)) == "haca_mask"
  with pytest.raises(ValueError, match=r"names 2 HACA families \['haca', 'entailment'\]"):
    builders.local_haca_family(("haca", "entailment"))
