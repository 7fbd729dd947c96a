"""The bucket planner's reads with and without the text index (data/text_index.py): the
token-count pass over one split (buckets.TextLength on every record, what each process
runs), timed on the data set's own records read without decoding their video, and on the
index, side by side; with the bytes each reads per record.

    python benchmarks/text_index.py [--config=configs/tiny_synthetic.py] [--split=train]
        [--data_dir=DIR] [--records=N] [--repeats=3]

The data set is built (and its index written) when missing. Bytes per record: the
split's shard files and the index file, divided by the record count (an ArrayRecord
record is read whole, so these are the bytes each pass reads). On a pod every process
runs this pass over the global stream.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from mashvlm_jax.data import buckets, pipeline, registry, text_index  # noqa: E402


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def counts_per_second(source, records: int, transform, repeats: int) -> tuple[float, list]:
  """Records/s of the token-count pass over the first ``records`` items (best of
  ``repeats``, after one pass that warms the page cache), and the counts."""
  length = buckets.TextLength(transform, pipeline.decode_record)
  best, counts = float("inf"), []
  for i in range(repeats + 1):
    start = time.perf_counter()
    counts = [length(source[k], np.random.default_rng(k)) for k in range(records)]
    if i:
      best = min(best, time.perf_counter() - start)
  return records / best, counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny_synthetic.py")
  parser.add_argument("--split", default="train")
  parser.add_argument("--data_dir", default="")
  parser.add_argument("--records", type=int, default=0, help="0: the whole split")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = load_config(args.config)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  b = registry.ensure_built(config)
  transform = pipeline.example_transform(config, args.split, augment=False)
  plain = registry.data_source(config, args.split, video=False)
  index = registry.text_source(config, args.split)
  if not isinstance(index, text_index.TextIndexSource):
    raise SystemExit(f"no usable text index for {args.split}: "
                     f"{text_index.stale_reason(b, args.split)}")
  records = args.records or len(plain)
  shard_bytes = sum(size for _, size in text_index.shards(b, args.split))
  index_bytes = epath.Path(text_index.index_path(b.data_path, args.split)).stat().length
  without, want = counts_per_second(plain, records, transform, args.repeats)
  with_index, got = counts_per_second(index, records, transform, args.repeats)
  if got != want:
    raise SystemExit("the token counts from the index differ from the data set's")
  n = len(plain)
  print(f"{b.name}/{b.builder_config.name} split {args.split}: {records} of {n} records, "
        f"token counts identical both ways; {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}")
  print(f"{'source':<30} {'bytes/record':>13} {'records/s':>10}")
  print(f"{'data set (video undecoded)':<30} {shard_bytes / n:>13.0f} {without:>10.0f}")
  print(f"{'text index':<30} {index_bytes / n:>13.0f} {with_index:>10.0f}")
  print(f"the index reads {shard_bytes / index_bytes:.1f}x fewer bytes per record and runs "
        f"the pass {with_index / without:.2f}x as fast")


if __name__ == "__main__":
  main()
