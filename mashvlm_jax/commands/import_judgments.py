"""Turn an external LLM judge's replies into the open-ended results table.

``mashvlm import-judgments --eval_dir=DIR --judgments=FILE``: DIR is the output of
``mashvlm eval --benchmark=unscene_open|open_qa`` (it holds judge_prompts.jsonl); FILE is
JSONL with one {"key": <the request's key>, "response": <the judge's reply text>} per
judged request. Writes result.json and result.md into DIR and prints the table. Nothing
here calls a network service.
"""
from __future__ import annotations

from mashvlm_jax import paths

_EVAL_DIR = paths.DEFINE_path("eval_dir", None, "The open-ended evaluation directory.")
_JUDGMENTS = paths.DEFINE_path("judgments", None, "JSONL of {key, response} lines.")


def main(argv):
  del argv
  if not _EVAL_DIR.value or not _JUDGMENTS.value:
    raise SystemExit("mashvlm import-judgments: --eval_dir and --judgments are required")
  from mashvlm_jax.eval import open_ended
  result = open_ended.import_judgments(_EVAL_DIR.value, _JUDGMENTS.value)
  print(open(result["files"]["markdown"]).read())
  if result["missing"]:
    print(f"warning: {result['missing']} requests have no judgment yet (left out)")
  print(f"results: {result['files']['json']}")
