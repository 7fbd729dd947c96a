"""Tokenizers behind one small interface: a local HuggingFace ``tokenizer.json``, a
SentencePiece ``.model``, or the word-level tokenizer of the synthetic set.

The word-level tokenizer is built with the ``tokenizers`` library from every string the
synthetic generator can emit (plus the chat markers), lower-cased and split on
whitespace/punctuation; it is saved as ``tokenizer.json`` next to the data it belongs to.

A vocabulary's fingerprint (``vocabulary_fingerprint``) hashes its tokens in id order: two
tokenizers with the same fingerprint give every token the same id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable

from mashvlm_jax import paths

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MASK = "[MASK]"  # one token in every kind (HACA masking rows, data/tasks/haca.py)
KINDS = ("word", "hf", "sentencepiece")


@dataclasses.dataclass
class Tokenizer:
  """encode(text) -> ids without special tokens; special ids as attributes.

  Pickles as its file path (loaded lazily), so Grain worker processes can receive it.
  """
  path: str
  kind: str = "hf"
  bos: str = BOS
  eos: str = EOS
  # A token that must be one token (e.g. MASK); added after the file's vocabulary when the
  # file lacks it (hf: a special token; sentencepiece: the id after the last piece).
  extra: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"tokenizer kind must be one of {KINDS}, found {self.kind!r}")
    if not os.path.exists(self.path):
      raise FileNotFoundError(f"tokenizer file {self.path} ({self.kind}) does not exist")
    self._impl = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_impl"} | {"_impl": None}

  @property
  def impl(self):
    if self._impl is None:
      if self.kind == "sentencepiece":
        import sentencepiece
        self._impl = sentencepiece.SentencePieceProcessor(model_file=self.path)
      else:
        import tokenizers
        impl = tokenizers.Tokenizer.from_file(self.path)
        if self.extra:
          impl.add_special_tokens([tokenizers.AddedToken(self.extra, special=True,
                                                         normalized=False)])
        self._impl = impl
    return self._impl

  @property
  def extra_id(self) -> int | None:
    """The id of ``extra`` (None without one): the file's own, else the one appended."""
    if not self.extra:
      return None
    if self.kind == "sentencepiece":
      found = self.impl.piece_to_id(self.extra)
      known = found != self.impl.unk_id() or self.extra == self.impl.id_to_piece(found)
      return found if known else self.impl.get_piece_size()
    return self.impl.token_to_id(self.extra)

  def encode(self, text: str) -> list[int]:
    if self.kind == "sentencepiece":
      if not self.extra:
        return list(self.impl.encode(text))
      pieces = text.split(self.extra)  # the extra token is one id wherever it occurs
      out = list(self.impl.encode(pieces[0])) if pieces[0] else []
      for piece in pieces[1:]:
        out += [self.extra_id] + (list(self.impl.encode(piece)) if piece else [])
      return out
    return list(self.impl.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    if self.kind == "sentencepiece":
      if self.extra_id is None or self.extra_id not in ids:
        return self.impl.decode(ids)
      runs, current = [], []
      for i in ids:
        if i == self.extra_id:
          runs += [self.impl.decode(current), self.extra]
          current = []
        else:
          current.append(i)
      return "".join(runs + [self.impl.decode(current)])
    return self.impl.decode(ids, skip_special_tokens=False)

  def _special(self, token: str, sp_attr: str) -> int:
    if self.kind == "sentencepiece":
      value = getattr(self.impl, sp_attr)()
      if value < 0:
        raise ValueError(f"SentencePiece model {self.path} has no {sp_attr[:-3]} token")
      return value
    value = self.impl.token_to_id(token)
    if value is None:
      raise ValueError(f"tokenizer {self.path} has no token {token!r}; set "
                       f"data.tokenizer.bos/eos to its special tokens")
    return value

  @property
  def bos_id(self) -> int:
    return self._special(self.bos, "bos_id")

  @property
  def eos_id(self) -> int:
    return self._special(self.eos, "eos_id")

  @property
  def pad_id(self) -> int:
    """The padding id (labels and padded text positions); 0 where the model has none."""
    if self.kind == "sentencepiece":
      return max(0, self.impl.pad_id())
    value = self.impl.token_to_id(PAD)
    return 0 if value is None else value

  @property
  def unk_id(self) -> int | None:
    if self.kind == "sentencepiece":
      return self.impl.unk_id()
    return self.impl.token_to_id(UNK)

  @property
  def vocab_size(self) -> int:
    if self.kind == "sentencepiece":
      return len(self.tokens())
    return self.impl.get_vocab_size(with_added_tokens=True)

  def tokens(self) -> list:
    """Every token in id order (None for an id no token has)."""
    if self.kind == "sentencepiece":
      pieces = [self.impl.id_to_piece(i) for i in range(self.impl.get_piece_size())]
      return pieces + [self.extra] if self.extra_id == len(pieces) else pieces
    vocab = self.impl.get_vocab(with_added_tokens=True)
    out = [None] * (max(vocab.values()) + 1 if vocab else 0)
    for token, index in vocab.items():
      out[index] = token
    return out

  @property
  def fingerprint(self) -> str:
    return vocabulary_fingerprint(self.tokens())


def vocabulary_fingerprint(tokens: list) -> str:
  """12 hex digits of the sha256 of the tokens in id order (JSON-encoded)."""
  return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()[:12]


def split_words(text: str) -> list[str]:
  """The word-level tokenizer's words: lower-cased, whitespace/punctuation split."""
  import tokenizers
  return [w for w, _ in tokenizers.pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def word_vocabulary(texts: Iterable[str]) -> list[str]:
  """The word-level tokenizer's tokens in id order: <pad> <unk> <s> </s>, then the words
  of ``texts`` and [MASK] sorted."""
  return [PAD, UNK, BOS, EOS] + sorted({w for text in texts for w in split_words(text)}
                                       | {MASK})


def build_word_tokenizer(texts: Iterable[str]):
  """A ``tokenizers.Tokenizer`` (WordLevel) over the words of ``texts``.

  Ids: <pad>=0, <unk>=1, <s>=2, </s>=3, then the words and [MASK] in sorted order
  (word_vocabulary); [MASK] is a special token, so it is one token wherever it occurs.
  """
  import tokenizers
  from tokenizers import models, normalizers, pre_tokenizers
  vocab = {tok: i for i, tok in enumerate(word_vocabulary(texts))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([PAD, UNK, BOS, EOS, MASK])
  return tok


def save_atomic(tok, path: str | os.PathLike) -> None:
  """Writes a ``tokenizers.Tokenizer`` to ``path`` via a temporary file and a rename."""
  paths.write_atomically(path, tok.save)
