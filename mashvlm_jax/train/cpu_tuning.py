"""Host settings for training on CPU: the one place the project sets them.

XLA's CPU runtime allocates each step's temporaries (activations kept for the backward
pass, gradients, optimizer updates) as one buffer per execution: 80 MB for the tiny
config's train step, 1.6 GB for the 100M one of benchmarks/train_step.py. glibc serves
an allocation that large with a fresh ``mmap`` (above its 32 MB mmap threshold, and
always from the per-thread arena of XLA's worker thread, whose heaps stop at 64 MB) and
unmaps it when the step ends, so every step page-faults its temporaries in again: 19.5k
faults and ~30 ms of kernel time per 100-130 ms tiny step on 2 cores, 390k faults and
0.75 s per 100M step.

``keep_freed_host_memory`` makes glibc keep that memory for the next step: one malloc
arena for every thread (M_ARENA_MAX=1), no mmap-backed allocations (M_MMAP_MAX=0, so
large blocks come from the main heap) and no trimming of the heap top below 2 GiB
(M_TRIM_THRESHOLD). After a few steps the heap holds a free block for every temporary and
steps stop faulting (tiny step: 18k faults to 0 on most steps, about 25% less time per
step on one core; tests/test_cpu_tuning.py). The cost: the process keeps its peak heap
plus some fragmentation (+176 MB resident for the tiny config), and threads share one
arena lock (nothing on a 2-core host). It must run before JAX creates its CPU client
(the first ``jax.devices()``, jit or array), since threads that already have an arena
keep it.

Nothing here changes numerics. No XLA flags are set: none of the CPU flags tried
(YNN/XNN fusion types, oneDNN, the concurrency-optimized scheduler, fast math) changed the
tiny step beyond noise.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform

# glibc <malloc.h> mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_THRESHOLD_BYTES = 2 ** 31 - 1  # mallopt takes an int
# Device files of the accelerators JAX would pick over the CPU: TPU (v4+ /dev/accel*, older
# VMs /dev/vfio groups) and NVIDIA GPUs.
ACCELERATOR_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def runs_on_cpu(platforms: str | None = None) -> bool:
  """Whether JAX will compute on the CPU, decided before JAX starts a backend.

  ``platforms`` is JAX_PLATFORMS (default: the environment variable): its first entry
  decides when set. Unset, JAX takes an accelerator when the host has one, so the answer
  is whether none of ``ACCELERATOR_DEVICE_FILES`` exists (libtpu alone, installed by the
  ``tpu`` extra on any host, does not make a TPU)."""
  if platforms is None:
    platforms = os.environ.get("JAX_PLATFORMS", "")
  first = platforms.split(",")[0].strip().lower()
  if first:
    return first == "cpu"
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def keep_freed_host_memory() -> bool:
  """Tunes glibc malloc as described in the module docstring. Returns True when applied,
  False where it does not apply (not Linux/glibc); raises if glibc rejects a setting."""
  if platform.system() != "Linux":
    return False
  name = ctypes.util.find_library("c")
  if not name:
    return False
  libc = ctypes.CDLL(name)
  if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
    return False  # musl and other C libraries: no mallopt semantics to rely on
  settings = {"M_ARENA_MAX": (M_ARENA_MAX, 1), "M_MMAP_MAX": (M_MMAP_MAX, 0),
              "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)}
  for label, (param, value) in settings.items():
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f"glibc mallopt({label}, {value}) failed")
  return True
