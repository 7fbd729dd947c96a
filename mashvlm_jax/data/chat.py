"""Chat template, tokenisation, answer-only labels and truncation for one example.

The text row follows the video block (docs/design.md: ``[temporal M][spatial N][text L]``):

    <s> {system} {instruction} USER: {q1} ASSISTANT: {a1}</s> USER: {q2} ASSISTANT: {a2}</s>

Each piece is tokenised on its own (so answer boundaries are exact whatever the
tokenizer); ``instruction`` is the first turn's ``i`` field (VideoChat2-IT puts one
instruction per record). Answer tokens are each answer plus its ``</s>``.

Truncation to ``text_len`` never cuts an answer, and never drops one silently:
  1. trailing turns that do not fit are dropped whole (reported in ``dropped_turns``; the
     pipeline logs a warning naming the example);
  2. then the system/instruction text is cut from its end (``<s>`` stays);
  3. then the first question is cut from its start (its end, next to the answer, stays);
  4. if the first answer and the USER/ASSISTANT markers still do not fit, ``TooLongError``
     names the example and the lengths: raise ``data.text_len``.
"""
from __future__ import annotations

import dataclasses

import numpy as np


class TooLongError(ValueError):
  """An example whose first answer cannot fit in ``text_len`` tokens."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  system: str = ""
  user: str = "USER:"
  assistant: str = "ASSISTANT:"

  def head_text(self, instruction: str = "") -> str:
    return " ".join(t for t in (self.system.strip(), instruction.strip()) if t)


@dataclasses.dataclass
class Turn:
  """Token ids of one exchange: USER marker, question, ASSISTANT marker, answer + EOS."""
  user: list
  question: list
  assistant: list
  answer: list

  def __len__(self):
    return len(self.user) + len(self.question) + len(self.assistant) + len(self.answer)


def encode_turns(tok, template: ChatTemplate, turns: list[dict]) -> tuple[list, list[Turn]]:
  """(head ids = <s> + system/instruction, one Turn per QA dict with "q", "a", "i")."""
  head = [tok.bos_id] + tok.encode(template.head_text(turns[0].get("i", "") if turns else ""))
  user, assistant = tok.encode(template.user), tok.encode(template.assistant)
  return head, [Turn(user, tok.encode(t["q"]), assistant, tok.encode(t["a"]) + [tok.eos_id])
                for t in turns]


def fit(head: list, turns: list[Turn], text_len: int, example_id: str = ""):
  """Applies the truncation rules; returns (head, turns, report dict)."""
  if not turns:
    raise ValueError(f"example {example_id!r} has no question/answer turns")
  report = {"dropped_turns": 0, "cut_head_tokens": 0, "cut_question_tokens": 0}
  total = lambda: len(head) + sum(len(t) for t in turns)  # noqa: E731
  while total() > text_len and len(turns) > 1:
    turns = turns[:-1]
    report["dropped_turns"] += 1
  excess = total() - text_len
  if excess > 0:
    cut = min(excess, len(head) - 1)
    head = head[:len(head) - cut]
    report["cut_head_tokens"] = cut
    excess -= cut
  if excess > 0:
    first = turns[0]
    cut = min(excess, len(first.question))
    turns = [dataclasses.replace(first, question=first.question[cut:])]
    report["cut_question_tokens"] = cut
    excess -= cut
  if excess > 0:
    need = 1 + len(first.user) + len(first.assistant) + len(first.answer)
    raise TooLongError(
        f"example {example_id!r}: the first answer ({len(first.answer)} tokens with </s>) "
        f"plus <s> and the USER/ASSISTANT markers need {need} tokens, more than "
        f"data.text_len={text_len}; raise data.text_len")
  return head, turns, report


def to_arrays(head: list, turns: list[Turn], text_len: int, pad_id: int) -> dict:
  """The batch-contract arrays for one row (see pipeline.py).

  text_ids int32 [L] right-padded with ``pad_id``; text_mask bool [L]; labels int32 [L]
  with labels[i] = text_ids[i + 1] (0 past the end); label_mask float32 [L] = 1 where
  labels[i] is an answer token (answers and their </s>).
  """
  ids, is_answer = list(head), [False] * len(head)
  for t in turns:
    prompt = t.user + t.question + t.assistant
    ids += prompt + t.answer
    is_answer += [False] * len(prompt) + [True] * len(t.answer)
  n = len(ids)
  if n > text_len:
    raise ValueError(f"{n} tokens do not fit text_len={text_len}; call fit() first")
  text_ids = np.full(text_len, pad_id, np.int32)
  text_ids[:n] = ids
  labels = np.zeros(text_len, np.int32)
  labels[:n - 1] = ids[1:]
  label_mask = np.zeros(text_len, np.float32)
  label_mask[:n - 1] = is_answer[1:]
  return {"text_ids": text_ids, "text_mask": np.arange(text_len) < n, "labels": labels,
          "label_mask": label_mask}


def encode_example(tok, template: ChatTemplate, turns: list[dict], text_len: int,
                   example_id: str = "") -> tuple[dict, dict]:
  """(batch-contract arrays, truncation report) for one example's QA turns."""
  head, encoded = encode_turns(tok, template, turns)
  head, encoded, report = fit(head, encoded, text_len, example_id)
  return to_arrays(head, encoded, text_len, tok.pad_id), report


def encode_prompt(tok, template: ChatTemplate, question: str, instruction: str = "") -> list:
  """Ids of ``<s> {system} {instruction} USER: {question} ASSISTANT:``, for generation."""
  head, (turn,) = encode_turns(tok, template, [{"q": question, "a": "", "i": instruction}])
  return head + turn.user + turn.question + turn.assistant
