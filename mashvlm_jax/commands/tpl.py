"""Score UTR's temporal perplexity (TPL) of every QA row of a split; tpl.jsonl + summary.

``mashvlm tpl --config=configs/NAME.py[:ARGS] --checkpoint=DIR --out=DIR [--split=train]
[--keyframe=random|first|middle|last] [--seed=0] [--limit=N] [--batch_size=8]``.
TPL = NLL(answer | one keyframe tiled T times) - NLL(answer | full video), mean nats per
answer token (mashvlm_jax/analysis/tpl.py). DIR is a trainer workdir, its
``checkpoints/`` or ``checkpoints/<step>/`` directory, or an ``import-hf`` output. Writes
tpl.jsonl, summary.md, summary.json and one histogram PNG per task in --out; a rerun with
the same --out resumes (rows already in tpl.jsonl are skipped). Batches are split over
all local devices. ``data.row_filter`` then trains on the rows with the highest TPL.

On a pod every host runs the same command with the multi-host flags of ``mashvlm train``
(mashvlm_jax/distributed.py), e.g. on every worker of a Cloud TPU slice
``mashvlm tpl --config=configs/NAME.py --checkpoint=/ckpt/run --out=/shared/tpl
--distributed=auto`` (or ``--distributed=explicit --coordinator_address=HOST:PORT
--num_processes=N --process_id=I``). ``--checkpoint`` is a local path on every host (a
copy each, or a shared mount); ``--out`` is one directory all hosts share (NFS). Host i
scores records i, i + N, ... on its own chips into tpl.process_<i>-of-<N>.jsonl; host 0
then merges them into tpl.jsonl (record order) and writes the summary. A rerun resumes,
also with another host count.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mashvlm_jax import distributed, paths

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_CHECKPOINT = paths.DEFINE_path("checkpoint", None, "Checkpoint directory (see above).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SPLIT = flags.DEFINE_string("split", None, "Data split (default: config.data.train_split).")
_OUT = paths.DEFINE_path("out", None, "Output directory.")
_KEYFRAME = flags.DEFINE_enum("keyframe", "random", ["random", "first", "middle", "last"],
                              "The keyframe: uniform per clip from (--seed, clip id), or "
                              "the first, middle (T // 2) or last frame.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random keyframes.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Records of the split to score (0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Videos per batch (over all devices).")
_RESUME = flags.DEFINE_bool("resume", True, "Skip rows already in tpl.jsonl (or the part "
                            "files of a multi-host run).")
flags.adopt_module_key_flags(distributed)  # --distributed, --coordinator_address, ...


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _CHECKPOINT.value or not _OUT.value:
    raise SystemExit("mashvlm tpl: --config, --checkpoint and --out are required, e.g. "
                     "--config=configs/tiny_synthetic.py --checkpoint=workdir/tiny "
                     "--out=workdir/tiny/tpl")
  distributed.initialize("tpl")
  import jax
  from mashvlm_jax.analysis import tpl
  from mashvlm_jax.eval import common
  split = _SPLIT.value or str(config.data.train_split)
  common.claim_out_dir(_OUT.value, _CHECKPOINT.value, _STEP.value, resume=_RESUME.value)
  params = common.load_params(config, _CHECKPOINT.value, _STEP.value)
  summary = tpl.run_with_params(config, params, split, _OUT.value, keyframe=_KEYFRAME.value,
                                seed=_SEED.value, limit=_LIMIT.value, batch_size=_BATCH.value,
                                resume=_RESUME.value)
  if jax.process_index() != 0:
    print(f"process {jax.process_index()}: {summary['rows']} rows in "
          f"{summary['files']['part']}; process 0 merges them into tpl.jsonl")
    return
  print(open(summary["files"]["markdown"]).read())
  print(f"rows: {summary['files']['jsonl']}")
