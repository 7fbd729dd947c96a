"""Build the data sets a config names (TFDS ArrayRecord files under data.data_dir).

``mashvlm make-data --config=configs/NAME.py[:ARGS] [--overwrite]`` builds
``config.data.name`` (the synthetic UNSCENE set, or users' annotated videos) unless it is
already complete (and writes each split's text index if missing), then prints where it
is, the split sizes, the tokenizer and any skipped records. A build that fails leaves
nothing behind.
"""
from __future__ import annotations

import sys
import time

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Rebuild even if the data set exists.")


def main(argv):
  del argv
  from mashvlm_jax.data import builders, registry, text_index

  config = flags.FLAGS.config
  if config is None:
    raise SystemExit("mashvlm make-data: --config is required, e.g. "
                     "--config=configs/tiny_synthetic.py")
  if "data" not in config:
    raise SystemExit("mashvlm make-data: the config has no `data` section")
  t0 = time.perf_counter()
  try:
    b = registry.ensure_built(config, overwrite=_OVERWRITE.value)
  except builders.BuildError as e:
    print(f"mashvlm make-data: build failed: {e}", file=sys.stderr)
    raise SystemExit(1)
  print(f"{b.name}/{b.builder_config.name}: {b.data_path} "
        f"({time.perf_counter() - t0:.1f}s)")
  for split, info in sorted(b.info.splits.items()):
    print(f"  {split:<16} {info.num_examples:>7} examples")
  print(f"  text index (records without video, read by the bucket planner): "
        f"{text_index.index_path(b.data_path, '<split>').name}")
  for split, rep in sorted(getattr(b, "report", {}).items()):
    if rep.get("tracks"):  # UTR query rows (tasks/utr.py): their share of the records
      share, target = rep["tracks"] / max(1, rep["written"]), float(
          config.data.get("utr_share", 0.0))
      aim = f" (data.utr_share target {target:.0%})" if target else ""
      print(f"  {split}: {rep['tracks']} of {rep['written']} records hold UTR track "
            f"queries: {share:.1%}{aim}")
    if rep["failed"]:
      print(f"  {split}: skipped {len(rep['failed'])} of {rep['total']} records:")
      for line in rep["failed"][:20]:
        print(f"    {line}")
  tok = registry.load_tokenizer(config)
  print(f"  tokenizer {tok.path} ({tok.vocab_size} tokens)")
