"""Input-pipeline throughput (samples/s) on the synthetic default data set.

  python benchmarks/pipeline.py [--config=configs/tiny_synthetic.py] [--batches=60]

Builds the data set if needed (data.data_dir, $MASHVLM_DATA_DIR), then times the train
iterator with 0 and 2 Grain worker processes: start-up (iterator creation + first batch)
is reported apart from the steady rate measured over the next ``--batches`` batches.
``pipeline_figures`` returns the numbers for other benchmark scripts (e.g. beside the
training step rate).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def pipeline_throughput(config, num_workers: int, num_batches: int = 60) -> dict:
  """{"workers", "startup_s", "samples_per_s"} for the train split of ``config``."""
  from mashvlm_jax.data import pipeline
  config = config.copy_and_resolve_references()
  with config.data.ignore_type():  # configs/mashvlm_7b.py holds the string "auto"
    config.data.num_workers = num_workers
  t0 = time.perf_counter()
  it = pipeline.make_iterator(config, config.data.train_split, process_index=0,
                              process_count=1)
  next(it)
  t1 = time.perf_counter()
  for _ in range(num_batches):
    batch = next(it)
  t2 = time.perf_counter()
  del batch
  it.close()
  return {"workers": num_workers, "startup_s": t1 - t0,
          "samples_per_s": num_batches * config.data.batch_size / (t2 - t1)}


def pipeline_figures(config, workers=(0, 2), num_batches: int = 60) -> list[dict]:
  """Builds the data set if needed, then ``pipeline_throughput`` for each worker count."""
  from mashvlm_jax.data import registry
  registry.ensure_built(config)
  return [pipeline_throughput(config, w, num_batches) for w in workers]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny_synthetic.py")
  parser.add_argument("--batches", type=int, default=60)
  args = parser.parse_args()
  path, _, arg = args.config.partition(":")
  config = load_config(path, arg or None)
  d = config.data
  print(f"pipeline: {d.name}/{d.builder_config}, batch {d.batch_size}, "
        f"{config.model.num_frames}x{config.model.vision.image_size}px, text_len "
        f"{d.text_len}, augment {dict(d.augment)}")
  for fig in pipeline_figures(config, num_batches=args.batches):
    print(f"  workers={fig['workers']}: {fig['samples_per_s']:8.0f} samples/s "
          f"(start-up {fig['startup_s']:.1f}s)")
  print(f"  train step:  {train_samples_per_s(config):8.0f} samples/s (jitted tiny step, "
        f"same batch; the pipeline must stay above this)")


def train_samples_per_s(config, steps: int = 5) -> float:
  """Samples/s of the jitted train step of ``config`` at data.batch_size (random data)."""
  import sys
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import train_step
  from mashvlm_jax.model.config import ModelConfig
  cfg = ModelConfig.from_dict(config.model)
  batch, text_len = int(config.data.batch_size), int(config.data.text_len)
  return batch / train_step.ours(cfg, batch, text_len, steps)


if __name__ == "__main__":
  main()
