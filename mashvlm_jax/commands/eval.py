"""Evaluate a checkpoint on a benchmark; writes predictions.jsonl, result.json, result.md.

``mashvlm eval --config=configs/NAME.py[:ARGS] --checkpoint=DIR --benchmark=NAME
[--out=DIR] [--splits=a,b] [--max_items=N]``. DIR is a trainer workdir, its
``checkpoints/`` or ``checkpoints/<step>/`` directory, or an ``import-hf`` output.
Benchmarks:
  unscene_binary  dual yes/no questions, Table 2 columns (--mode=generate|likelihood)
  unscene_open    UNSCENE descriptions -> predictions + judge prompts (0-5 judge scale)
  open_qa         free-form questions with reference answers -> predictions + judge prompts
  mvbench         multiple choice, official prompt and first-token answer extraction
  synthetic       the synthetic test splits: UNSCENE binary (likelihood) + label probe
A rerun with the same --out resumes from predictions.jsonl (--noresume starts over); the
output directory records the checkpoint and step it evaluates and refuses another's.
Judged benchmarks are completed with ``mashvlm import-judgments``.
"""
from __future__ import annotations


from absl import flags
from ml_collections import config_flags

from mashvlm_jax import paths

BENCHMARKS = ("unscene_binary", "unscene_open", "open_qa", "mvbench", "synthetic")

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_CHECKPOINT = paths.DEFINE_path("checkpoint", None, "Checkpoint directory (see above).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BENCHMARK = flags.DEFINE_enum("benchmark", None, BENCHMARKS, "What to evaluate.")
_OUT = paths.DEFINE_path("out", None, "Output directory (default: <workdir>/eval/step<N>/"
                         "<benchmark>; <dir>/eval/<benchmark> for an import-hf output).")
_SPLITS = flags.DEFINE_list("splits", None, "Data splits (default: config.data.eval_splits;"
                                            " mvbench: the first of them).")
_MAX_ITEMS = flags.DEFINE_integer("max_items", 0, "Videos per split (0 = all).")
_MODE = flags.DEFINE_enum("mode", "generate", ["generate", "likelihood"],
                          "unscene_binary: answer by generation or by P(Yes) vs P(No).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Videos per batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Generated tokens per answer "
                                                     "(0: 8 for yes/no and MVBench, 64 "
                                                     "for open-ended).")
_RESUME = flags.DEFINE_bool("resume", True, "Skip predictions already in predictions.jsonl.")


def run(config, params, benchmark: str, out: str) -> dict:
  """Dispatches to the evaluator of ``benchmark``; returns its result dict."""
  from mashvlm_jax.eval import mvbench, open_ended, synthetic, unscene
  common = dict(max_items=_MAX_ITEMS.value, resume=_RESUME.value)
  splits = _SPLITS.value
  short = _MAX_NEW.value or 8
  if benchmark == "unscene_binary":
    return unscene.evaluate_binary(config, params, out, splits=splits, mode=_MODE.value,
                                   clips_per_batch=_BATCH.value, max_new_tokens=short, **common)
  if benchmark in ("unscene_open", "open_qa"):
    kind = "unscene" if benchmark == "unscene_open" else "qa"
    return open_ended.evaluate(config, params, out, kind=kind, splits=splits,
                               batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value or 64,
                               **common)
  if benchmark == "mvbench":
    split = (splits or list(config.data.eval_splits))[0]
    return mvbench.evaluate(config, params, out, split=split, batch_size=_BATCH.value,
                            max_new_tokens=short, **common)
  return synthetic.evaluate(config, params, out, **common)


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _CHECKPOINT.value or not _BENCHMARK.value:
    raise SystemExit("mashvlm eval: --config, --checkpoint and --benchmark are required, "
                     "e.g. --config=configs/tiny_synthetic.py --checkpoint=/tmp/run "
                     f"--benchmark=synthetic (benchmarks: {', '.join(BENCHMARKS)})")
  from mashvlm_jax.eval import common
  checkpoint = _CHECKPOINT.value
  out = _OUT.value or str(common.default_out_dir(checkpoint, _STEP.value, _BENCHMARK.value))
  common.claim_out_dir(out, checkpoint, _STEP.value, resume=_RESUME.value)
  params = common.load_params(config, checkpoint, _STEP.value)
  result = run(config, params, _BENCHMARK.value, out)
  print(open(result["files"]["markdown"]).read())
  print(f"results: {result['files']['json']}")
