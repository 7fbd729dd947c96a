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
  mqa             LLaVAction multiple choice on the synthetic test splits, by likelihood and
                  by generation (--mqa_options=recognizer|random|recognizer,random,
                  --prior=none|gt|self; eval/mqa.py); on a local_video_qa config the
                  EPIC-KITCHENS-layout segments of --splits (default data.eval_splits),
                  options from data.mqa_predictions, action/verb/noun accuracy
  entailment      caption pairs (HACA): P(yes | true caption) > P(yes | contrast caption)
  retrieval       text-to-video retrieval mAP, each clip scored by P(yes | query caption)
A rerun with the same --out resumes from predictions.jsonl (--noresume starts over); the
output directory records the checkpoint and step it evaluates and refuses another's.
Judged benchmarks are completed with ``mashvlm import-judgments``.

``--rve=heads.json`` (``mashvlm rve-heads``) enhances attention at inference in every
benchmark (analysis/rve.py), with --rve_k, --rve_alpha, --rve_beta, --rve_layers,
--rve_scope, --rve_denoise overriding the defaults; the default output directory is then
``<benchmark>-rve-<settings hash>`` and checkpoint.json records the settings.
"""
from __future__ import annotations


from absl import flags
from ml_collections import config_flags

from mashvlm_jax import paths

BENCHMARKS = ("unscene_binary", "unscene_open", "open_qa", "mvbench", "synthetic", "mqa",
              "entailment", "retrieval")

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
_MQA_OPTIONS = flags.DEFINE_list("mqa_options", ["recognizer"], "mqa: option sources, "
                                  "recognizer (B's top 5) and/or random; two: both, compared")
_PRIOR = flags.DEFINE_enum("prior", "none", ["none", "gt", "self"], "mqa: prompts state no "
                           "previous actions, the ground truth or the model's own answers.")
_RESUME = flags.DEFINE_bool("resume", True, "Skip predictions already in predictions.jsonl.")
_RVE = paths.DEFINE_path("rve", None, "RVE heads file (mashvlm rve-heads): enhance attention "
                         "to the action-relevant visual tokens (off without it).")
_RVE_K = flags.DEFINE_integer("rve_k", None, "RVE: heads per set (default: the file's K).")
_RVE_ALPHA = flags.DEFINE_float("rve_alpha", 0.05, "RVE: share of visual keys selected.")
_RVE_BETA = flags.DEFINE_float("rve_beta", 1.0, "RVE: enhancement coefficient.")
_RVE_LAYERS = flags.DEFINE_string("rve_layers", None, "RVE: middle, auto or 0-based layer "
                                  "indices (default: the file's layers).")
_RVE_SCOPE = flags.DEFINE_enum("rve_scope", "global", ["global", "sensitive"],
                               "RVE: enhance every head of a layer or its sensitive heads.")
_RVE_DENOISE = flags.DEFINE_bool("rve_denoise", True, "RVE: leave out the insensitive "
                                 "heads' top keys (denoising mask).")


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
  if benchmark == "mqa":
    from mashvlm_jax.eval import mqa
    options = dict(prior=_PRIOR.value, splits=splits, batch_size=_BATCH.value,
                   max_new_tokens=_MAX_NEW.value or 12, **common)
    sources = mqa_sources()
    if len(sources) == 1:
      return mqa.evaluate(config, params, out, source=sources[0], **options)
    return mqa.compare(config, params, out, sources=sources, **options)
  if benchmark in ("entailment", "retrieval"):
    from mashvlm_jax.eval import entailment
    evaluate = (entailment.evaluate_pairs if benchmark == "entailment"
                else entailment.evaluate_retrieval)
    return evaluate(config, params, out, splits=splits, clips_per_batch=_BATCH.value,
                    **common)
  return synthetic.evaluate(config, params, out, **common)


def mqa_sources() -> list[str]:
  """--mqa_options checked: distinct names of eval/mqa.py OPTION_SOURCES."""
  from mashvlm_jax.eval import mqa
  sources = list(_MQA_OPTIONS.value)
  if not sources or any(s not in mqa.OPTION_SOURCES for s in sources) or (
      len(set(sources)) != len(sources)):
    raise SystemExit(f"mashvlm eval: --mqa_options must name distinct sources of "
                     f"{list(mqa.OPTION_SOURCES)}, found {sources}")
  return sources


def rve_option(config):
  """(RveConfig, its settings with the heads file) from the --rve flags; (None, None)
  without --rve."""
  if not _RVE.value:
    given = [f"--{f.name}" for f in (_RVE_K, _RVE_ALPHA, _RVE_BETA, _RVE_LAYERS, _RVE_SCOPE,
                                     _RVE_DENOISE) if flags.FLAGS[f.name].present]
    if given:
      raise SystemExit(f"mashvlm eval: {', '.join(given)} set RVE options but no --rve "
                       f"heads file was given (write one with `mashvlm rve-heads`)")
    return None, None
  from mashvlm_jax.analysis import rve
  from mashvlm_jax.model.config import ModelConfig
  option = rve.load(_RVE.value, ModelConfig.from_dict(config.model), k=_RVE_K.value,
                    alpha=_RVE_ALPHA.value, beta=_RVE_BETA.value, layers=_RVE_LAYERS.value,
                    scope=_RVE_SCOPE.value, denoise=_RVE_DENOISE.value)
  return option, dict(option.describe(), heads_file=_RVE.value,
                      heads_file_digest=rve.file_digest(_RVE.value))


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _CHECKPOINT.value or not _BENCHMARK.value:
    raise SystemExit("mashvlm eval: --config, --checkpoint and --benchmark are required, "
                     "e.g. --config=configs/tiny_synthetic.py --checkpoint=/tmp/run "
                     f"--benchmark=synthetic (benchmarks: {', '.join(BENCHMARKS)})")
  from mashvlm_jax.eval import common
  checkpoint = _CHECKPOINT.value
  rve, record = rve_option(config)
  name = _BENCHMARK.value if rve is None else f"{_BENCHMARK.value}-rve-{rve.tag()}"
  if _BENCHMARK.value == "mqa":  # one directory per option source(s) and prior mode
    name = name.replace("mqa", f"mqa-{'+'.join(mqa_sources())}-prior_{_PRIOR.value}", 1)
  out = _OUT.value or str(common.default_out_dir(checkpoint, _STEP.value, name))
  common.claim_out_dir(out, checkpoint, _STEP.value, resume=_RESUME.value, rve=record)
  params = common.load_params(config, checkpoint, _STEP.value)
  if rve is not None:
    print(f"RVE from {_RVE.value}: layers {list(rve.layers)}, K={len(rve.sensitive[0])}, "
          f"alpha={rve.alpha} (m={rve.m} of {rve.num_visual} visual keys), beta={rve.beta}, "
          f"{rve.scope}, denoise {'on' if rve.denoise else 'off'}; results in {out}")
  with common.attention_enhancement(rve):
    result = run(config, params, _BENCHMARK.value, out)
  print(open(result["files"]["markdown"]).read())
  print(f"results: {result['files']['json']}")
