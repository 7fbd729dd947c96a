"""The synthetic word vocabulary's sources: every task module registers the texts it can
write into the synthetic set, and ``texts()`` is their union.

A task module declares its texts once, beside the templates that write them:

    @vocabulary.register
    def texts() -> list[str]:
      return [QUESTION] + [ANSWER.format(label=x) for x in LABELS]

``texts()`` first imports every module of this package, so a task is never missed because
nothing had imported it yet, and returns the sorted union without duplicates: the same list
whatever the import order or the hash seed, hence the same token ids
(tokenizer.build_word_tokenizer) and the same fingerprint (builders.vocabulary_fingerprint).
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable

# "<module>.<function>" -> function returning the texts that module can write.
REGISTRY: dict[str, Callable[[], Iterable[str]]] = {}


def register(fn: Callable[[], Iterable[str]]) -> Callable[[], Iterable[str]]:
  """Decorator: ``fn()`` returns strings its module can write (questions, answers,
  instructions); their words join the synthetic vocabulary."""
  REGISTRY[f"{fn.__module__}.{fn.__qualname__}"] = fn
  return fn


def task_modules() -> list[str]:
  """Imports and returns (sorted) the full names of every module of the tasks package."""
  from mashvlm_jax.data import tasks
  names = sorted(f"{tasks.__name__}.{m.name}" for m in pkgutil.iter_modules(tasks.__path__))
  for name in names:
    importlib.import_module(name)
  return names


def texts() -> list[str]:
  """Sorted union of every registered module's texts (TypeError naming the function that
  returns something other than strings)."""
  task_modules()
  out = set()
  for key in sorted(REGISTRY):
    for text in REGISTRY[key]():
      if not isinstance(text, str):
        raise TypeError(f"vocabulary texts of {key} must be strings, found {text!r}")
      out.add(text)
  return sorted(out)
