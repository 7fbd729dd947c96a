"""Train a config in a workdir, resuming from its latest checkpoint (multi-host aware).

``mashvlm train --config=configs/NAME.py[:ARGS] --workdir=DIR [--config.KEY=VALUE ...]``.
Multi-host: every process runs the same command; ``jax.distributed`` is initialised from
``--coordinator_address/--num_processes/--process_id``, or from the environment
(``MASHVLM_COORDINATOR_ADDRESS``, ``MASHVLM_NUM_PROCESSES``, ``MASHVLM_PROCESS_ID``), or
by JAX's own cluster detection on TPU pods with ``--distributed=auto``
(mashvlm_jax/distributed.py, shared with ``mashvlm tpl``).
"""
from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from mashvlm_jax import distributed, paths
from mashvlm_jax.train import cpu_tuning

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_WORKDIR = paths.DEFINE_path("workdir", None, "Where checkpoints, metrics and plots go.")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_freed_host_memory", True,
    "When training on the CPU, make glibc keep freed memory for the next step instead of "
    "unmapping it (train/cpu_tuning.py: no per-step page faults; keeps the peak heap).")
flags.adopt_module_key_flags(distributed)  # --distributed, --coordinator_address, ...


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _WORKDIR.value:
    raise SystemExit("mashvlm train: --config and --workdir are required, e.g. "
                     "--config=configs/tiny_synthetic.py --workdir=/tmp/mashvlm_tiny")
  # before anything starts JAX's CPU client: its threads keep the malloc arena they got
  if _KEEP_HOST_MEMORY.value and cpu_tuning.runs_on_cpu() and \
      cpu_tuning.keep_freed_host_memory():
    logging.getLogger("mashvlm").info("CPU training: glibc keeps freed host memory "
                                      "(--nokeep_freed_host_memory to turn off)")
  distributed.initialize("train")
  import jax
  # Persistent XLA cache: resumed and repeated runs skip recompiling the train step.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "MASHVLM_COMPILATION_CACHE", os.path.expanduser("~/.cache/mashvlm_jax/xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from mashvlm_jax.train import checkpoint, trainer
  try:
    summary = trainer.train(config, _WORKDIR.value)
  except (checkpoint.CheckpointSaveError, trainer.NonFiniteLossError) as e:
    logging.getLogger("mashvlm").error("training stopped: %s", e)
    sys.exit(1)
  if jax.process_index() != 0:
    return
  metrics = summary["metrics"]
  status = "preempted, resume with the same command" if summary["preempted"] else "done"
  print(f"\n{status}: step {summary['step']}" + (
      f", loss {metrics['loss']:.4f}, answer-token accuracy {metrics['accuracy']:.3f}"
      if metrics else ""))
  print(f"  checkpoints: {summary['checkpoints']}")
  print(f"  metrics:     {summary['metrics_file']}  (TensorBoard: {summary['tensorboard']})")
  print(f"  loss curve:  {summary['plot']}")
  if summary.get("eval"):
    print(f"  eval:        {summary['eval']}")
