"""Compile a config's full train step for a TPU slice here (AOT) and check it fits in HBM.

``mashvlm compile --config=configs/mashvlm_7b.py --topology=v5p-64 [--mesh=fsdp=-1,tensor=1]
[--config.data.batch_size=128] [--config.data.text_len=512] [--json=report.json]``
lowers and compiles the trainer's step (frozen vision forward, LLM forward and backward,
optimizer update) for the slice's TPU devices on this machine, from abstract inputs only,
and prints the per-chip memory (arguments, outputs, temporaries, generated code, total)
against the chip's HBM, the analytic TFLOPs per step and the step time at ``--mfu``.
Exit status: 0 fits, 1 does not fit, 2 bad arguments. The attention backend is "splash"
unless the command line sets ``--config.model.attention_backend``; missing training keys
come from ``mashvlm_jax/train/defaults.py``. Needs libtpu (``pip install -e '.[tpu]'``),
no TPU. Topology names: docs/compile.md, ``mashvlm_jax/train/compile_check.py``.

``--sweep=KEY=V1,V2,...`` (e.g. ``model.remat_policy=none,dots,full``, ``data.batch_size=..``,
``mesh.tensor=..``; repeat the flag for a grid) compiles every variant and prints a markdown
table: per-chip memory, XLA's per-chip FLOPs and bytes accessed, the roofline step time and
the MFU it implies, the fastest variant that fits marked. Exit status: 0 one fits, 1 none
fits, 2 bad arguments or a variant that failed to build.
"""
from __future__ import annotations

import os
import sys

# The compile targets libtpu's compile-only devices; the local backend stays the CPU, so a
# TPU VM busy with training is not touched and a machine with libtpu but no TPU is quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mashvlm_jax import paths  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mashvlm_7b.py",
                                lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice: v5p-64, v4-32, v5e-256, "
                                "v6e-64, or a torus shape such as v5p:2x4x4.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh axes overriding config.mesh, e.g. "
                            "'data=1,fsdp=-1,tensor=1' (-1: the remaining chips).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation for the step-time estimate.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,...: compile each value of the "
                                    "config key (repeat for a grid), e.g. "
                                    "model.remat_policy=none,dots,full.")
_JSON = paths.DEFINE_path("json", None, "Also write the report as JSON to this path.")

BACKEND_KEY = "model.attention_backend"


def main(argv):
  del argv
  config = flags.FLAGS.config
  if config is None or not _TOPOLOGY.value:
    raise SystemExit("mashvlm compile: --config and --topology are required, e.g. "
                     "--config=configs/mashvlm_7b.py --topology=v5p-64")
  from mashvlm_jax.train import compile_check
  overridden = BACKEND_KEY in config_flags.get_override_values(flags.FLAGS["config"])
  run = compile_check.run_sweep if _SWEEP.value else compile_check.run
  extra = dict(sweep_texts=_SWEEP.value) if _SWEEP.value else {}
  code = run(config, _TOPOLOGY.value, mesh_text=_MESH.value,
             attention_backend=None if overridden else "splash", mfu=_MFU.value,
             json_path=_JSON.value, echo=lambda line: print(line, flush=True), **extra)
  sys.exit(code)
