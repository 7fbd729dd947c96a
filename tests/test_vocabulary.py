"""The synthetic word vocabulary as the union of the task modules' registered texts: a
deterministic order, a fingerprint in the builder's config name, stale stored tokenizers
refused, every generated text covered, and the record stored with checkpoints."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from mashvlm_jax.data import builders, pipeline, registry, synthetic
from mashvlm_jax.data import tokenizer as tokenizer_lib
from mashvlm_jax.data.tasks import vocabulary

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
# A new task's text: "zebra" is a word no existing task writes.
NEW_TEXT = "Is the person riding a zebra?"


def words(text):
  """Independent reference of the word tokenizer's split: lower-cased runs of word
  characters and runs of punctuation (the Whitespace pre-tokenizer's documented rule)."""
  return re.findall(r"\w+|[^\w\s]+", text.lower())


def with_new_task(monkeypatch):
  monkeypatch.setitem(vocabulary.REGISTRY, "tests.new_task.texts", lambda: [NEW_TEXT])


def tiny_config(data_dir):
  """The tiny synthetic set at 2 frames of 8x8, 8 clips per split (2 scene-only in train)."""
  config = load_config("tiny_synthetic")
  config.data.update(data_dir=str(data_dir), builder_config="tiny", train_size=8,
                     test_size=8, stored_frames=2, stored_size=8, scene_only_share=0.25)
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp("data"))
  registry.ensure_built(config)
  return config


# ------------------------------------------------------------------------------ the union

def test_every_task_module_registers_its_texts():
  infrastructure = (".vocabulary", ".families")  # registries, not tasks
  modules = [m for m in vocabulary.task_modules() if not m.endswith(infrastructure)]
  assert {m.rsplit(".", 1)[1] for m in modules} >= {"train_mix", "unscene_binary",
                                                     "open_ended", "mvbench"}
  for module in modules:
    assert any(key.startswith(module + ".") for key in vocabulary.REGISTRY), module
  texts = builders.vocabulary_texts()
  assert texts == sorted(set(texts))
  for key, fn in vocabulary.REGISTRY.items():
    assert set(fn()) <= set(texts), key
  assert {"USER:", "ASSISTANT:"} <= set(texts)


_PRINT_VOCABULARY = """
import importlib, json, sys
for name in sys.argv[1:]:
  importlib.import_module("mashvlm_jax.data.tasks." + name)
from mashvlm_jax.data import builders
from mashvlm_jax.data.tasks import vocabulary
print(json.dumps([vocabulary.texts(), builders.vocabulary_texts(), builders.vocabulary_tokens(),
                  builders.vocabulary_fingerprint()]))
"""


@pytest.mark.parametrize("order,hash_seed", [
    (["vocabulary", "unscene_binary", "train_mix", "open_ended", "mvbench"], "1"),
    (["mvbench", "open_ended", "train_mix", "unscene_binary"], "2")])
def test_union_order_does_not_depend_on_import_order(order, hash_seed):
  env = dict(os.environ, PYTHONHASHSEED=hash_seed, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PRINT_VOCABULARY, *order], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  registered, texts, tokens, fingerprint = json.loads(out.stdout)
  assert registered == vocabulary.texts()
  assert texts == builders.vocabulary_texts()
  assert tokens == builders.vocabulary_tokens()
  assert fingerprint == builders.vocabulary_fingerprint()


def test_a_new_task_word_changes_fingerprint_config_name_and_directory(monkeypatch, tmp_path):
  config = tiny_config(tmp_path)
  old_tokens, old_fp = builders.vocabulary_tokens(), builders.vocabulary_fingerprint()
  old_name = builders.synthetic_config("tiny", 2, 8).name
  old_dir = str(registry.builder(config).data_path)
  assert old_name.endswith(f"_v{old_fp}") and len(old_fp) == 12
  # Texts whose words are all known already change nothing (the union has no duplicates).
  monkeypatch.setitem(vocabulary.REGISTRY, "tests.known.texts",
                      lambda: ["Is the person skiing?", "Yes"])
  assert builders.vocabulary_fingerprint() == old_fp
  with_new_task(monkeypatch)
  tokens = builders.vocabulary_tokens()
  # Hand-computed: the old words plus "zebra" and "riding", sorted after the specials.
  assert tokens == SPECIALS + sorted(old_tokens[4:] + ["riding", "zebra"])
  fp = builders.vocabulary_fingerprint()
  assert fp != old_fp
  name = builders.synthetic_config("tiny", 2, 8).name
  assert name == old_name.replace(f"_v{old_fp}", f"_v{fp}")
  assert builders.synthetic_config("tiny", 2, 8).vocabulary == fp
  assert str(registry.builder(config).data_path) != old_dir


def test_registered_texts_must_be_strings(monkeypatch):
  monkeypatch.setitem(vocabulary.REGISTRY, "tests.bad.texts", lambda: ["ok", 3])
  with pytest.raises(TypeError, match=r"tests\.bad\.texts.*strings.*3"):
    vocabulary.texts()


# ------------------------------------------------------------------------------ coverage

def assert_known(tok, text):
  """Every word of ``text`` has its own id (no <unk>) and reads back as that word."""
  ids = tok.encode(text)
  assert tok.unk_id not in ids, text
  assert [tok.impl.id_to_token(i) for i in ids] == words(text), text


def test_every_text_of_the_built_splits_tokenizes_without_unk(built):
  tok = registry.load_tokenizer(built)
  seen = set()
  for split in synthetic.SPLITS:
    source = registry.data_source(built, split)
    assert len(source) == 8
    for k in range(len(source)):
      record = pipeline.decode_record(source[k])
      seen.add((split, record["kind"]))
      for qa in record["qa"]:
        assert_known(tok, qa["q"])
        assert_known(tok, qa["a"])
  assert ("train", "scene_only") in seen and ("test_unusual", "unusual") in seen
  for marker in ("USER:", "ASSISTANT:"):
    assert_known(tok, marker)


def test_every_label_pair_and_question_draw_tokenizes_without_unk(built):
  """Beyond the built clips: every (action, scene) pair and every scene-only scene, with
  several question draws, in every split's question set."""
  tok = registry.load_tokenizer(built)
  labels = [(a, s) for a in synthetic.ACTIONS for s in synthetic.SCENES]
  labels += [("", s) for s in synthetic.SCENES]
  texts = set()
  for split in synthetic.SPLITS:
    for index in range(4):
      for action, scene in labels:
        spec = synthetic.ClipSpec(split, index, action, scene,
                                  synthetic.kind_of(action, scene), seed=0)
        texts |= {t for qa in builders.synthetic_questions(spec) for t in (qa["q"], qa["a"])}
  assert len(texts) > 100
  for text in sorted(texts):
    assert_known(tok, text)


# ------------------------------------------------------------------------------ stored tokenizer

def test_stored_tokenizer_matches_the_registered_vocabulary(built):
  tok = registry.load_tokenizer(built)
  stored = json.loads(pathlib.Path(tok.path).read_text())["model"]["vocab"]  # the file itself
  tokens = [t for t, _ in sorted(stored.items(), key=lambda kv: kv[1])]
  assert tokens == builders.vocabulary_tokens()
  assert sorted(stored.values()) == list(range(len(tokens)))
  assert tok.fingerprint == builders.vocabulary_fingerprint()
  assert f"_v{tok.fingerprint}" in tok.path


def test_stale_stored_tokenizer_is_refused(tmp_path):
  config = tiny_config(tmp_path)
  registry.ensure_built(config)
  path = registry.load_tokenizer(config).path
  expected = builders.vocabulary_fingerprint()
  stale = tokenizer_lib.build_word_tokenizer(builders.vocabulary_texts() + [NEW_TEXT])
  tokenizer_lib.save_atomic(stale, path)
  stale_fp = tokenizer_lib.vocabulary_fingerprint(
      tokenizer_lib.word_vocabulary(builders.vocabulary_texts() + [NEW_TEXT]))
  with pytest.raises(ValueError) as e:
    registry.load_tokenizer(config)
  message = str(e.value)
  assert path in message and stale_fp in message and expected in message
  assert "shift" in message
  os.remove(path)  # a lost file is rebuilt, with the data set's vocabulary
  assert registry.load_tokenizer(config).fingerprint == expected


def test_data_built_with_another_vocabulary_is_not_found(built, monkeypatch):
  with_new_task(monkeypatch)
  with pytest.raises(FileNotFoundError, match="is not built"):
    registry.load_tokenizer(built)


def test_template_words_outside_the_vocabulary_are_refused(built):
  config = built.copy_and_resolve_references()
  config.data.template.system = "You are a helpful assistant."
  with pytest.raises(ValueError, match=r"data\.template\.system.*'helpful'"):
    registry.load_tokenizer(config)


# ------------------------------------------------------------------------------ checkpoints

def test_vocabulary_record_and_check(built, monkeypatch, tmp_path):
  record = registry.vocabulary_record(built)
  tok = registry.load_tokenizer(built)
  assert record["kind"] == "word"
  assert (record["fingerprint"], record["size"]) == (tok.fingerprint, tok.vocab_size)
  registry.check_vocabulary(built, record, "ckpt/vocabulary.json")
  with_new_task(monkeypatch)
  other = registry.vocabulary_record(built)
  assert other["size"] == record["size"] + 2  # "riding", "zebra"
  with pytest.raises(ValueError) as e:
    registry.check_vocabulary(built, record, "/ckpt/vocabulary.json")
  message = str(e.value)
  assert message.startswith("/ckpt/vocabulary.json: field 'fingerprint'")
  assert record["fingerprint"] in message and other["fingerprint"] in message
  with pytest.raises(ValueError, match=r"ckpt: expected .* 'fingerprint'"):
    registry.check_vocabulary(built, {"size": 3}, "ckpt")


def test_vocabulary_file_check(built, tmp_path):
  path = tmp_path / registry.VOCABULARY_FILE
  registry.check_vocabulary_file(built, path)  # none stored: nothing to check
  path.write_text(json.dumps(registry.vocabulary_record(built)))
  registry.check_vocabulary_file(built, path)
  path.write_text(json.dumps({"fingerprint": "000000000000", "size": 9, "kind": "word"}))
  with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: field 'fingerprint' is "
                                       rf"000000000000"):
    registry.check_vocabulary_file(built, path)
  path.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    registry.check_vocabulary_file(built, path)


def test_file_tokenizer_records(tmp_path):
  """hf and sentencepiece records: fingerprints of the token lists read from the files
  themselves (tokenizer.json's vocab, SentencePiece's .vocab listing)."""
  import sentencepiece
  config = load_config("tiny_synthetic")
  hf = tmp_path / "hf.json"
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(["Yes, no."]), hf)
  config.data.tokenizer.update(kind="hf", path=str(hf))
  record = registry.vocabulary_record(config)
  assert record == {"kind": "hf", "size": 9, "tokenizer": str(hf),
                    "fingerprint": tokenizer_lib.vocabulary_fingerprint(
                        SPECIALS + [",", ".", "[MASK]", "no", "yes"])}  # [MASK]: HACA
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(["A person is skiing on a snowy mountain.",
                               "Is the person boxing? No"] * 50))
  sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                           vocab_size=40, hard_vocab_limit=False,
                                           minloglevel=2)
  pieces = [line.split("\t")[0] for line in (tmp_path / "sp.vocab").read_text().splitlines()]
  config.data.tokenizer.update(kind="sentencepiece", path=str(tmp_path / "sp.model"))
  record = registry.vocabulary_record(config)
  assert record["size"] == len(pieces)
  assert record["fingerprint"] == tokenizer_lib.vocabulary_fingerprint(pieces)
  with pytest.raises(ValueError, match="field 'fingerprint'"):
    registry.check_vocabulary(config, registry.vocabulary_record(load_config("tiny_synthetic")),
                              "workdir/vocabulary.json")
