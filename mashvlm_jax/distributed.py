"""Multi-host flags and ``jax.distributed`` start-up shared by the commands every host runs.

A command that runs on every host of a pod (``mashvlm train``, ``mashvlm tpl``) imports
this module, which defines ``--distributed=off|auto|explicit``, ``--coordinator_address``,
``--num_processes``, ``--process_id`` and ``--cpu_collectives``, adopts them as its own
(``flags.adopt_module_key_flags(distributed)``: they show in its ``--help``), and calls
``initialize(command)`` before anything else starts JAX's backends. Explicit mode reads
the flags, else the environment (``MASHVLM_COORDINATOR_ADDRESS``,
``MASHVLM_NUM_PROCESSES``, ``MASHVLM_PROCESS_ID``); ``auto`` is JAX's own cluster
detection (Cloud TPU, GKE, SLURM). A coordinator address alone switches ``off`` to
explicit.
"""
from __future__ import annotations

import os

from absl import flags

_DISTRIBUTED = flags.DEFINE_enum("distributed", "off", ["off", "auto", "explicit"],
                                 "jax.distributed: off, auto (TPU/cluster detection), or "
                                 "explicit (coordinator flags or environment).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo",
                                       "Collectives for multi-process CPU runs.")


def initialize(command: str) -> None:
  """Initialises jax.distributed per the flags/environment; no-op when off. ``command``
  (e.g. "train") names the command in the error for missing explicit settings."""
  import jax
  env = os.environ
  address = _COORDINATOR.value or env.get("MASHVLM_COORDINATOR_ADDRESS")
  mode = _DISTRIBUTED.value
  if mode == "off" and address:
    mode = "explicit"
  if mode == "off":
    return
  if mode == "auto":
    jax.distributed.initialize()
    return
  num = _NUM_PROCESSES.value or env.get("MASHVLM_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env.get("MASHVLM_PROCESS_ID")
  if not address or num is None or pid is None:
    raise SystemExit(f"mashvlm {command}: explicit distributed mode needs "
                     "--coordinator_address, --num_processes and --process_id (or "
                     "MASHVLM_COORDINATOR_ADDRESS, MASHVLM_NUM_PROCESSES, MASHVLM_PROCESS_ID)")
  if jax.config.jax_platforms in ("cpu",) or env.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                             process_id=int(pid))
