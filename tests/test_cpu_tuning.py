"""train/cpu_tuning.py: with glibc kept from unmapping freed memory, a jitted step whose
temporaries exceed glibc's mmap limits stops page-faulting them in again on every call."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# One 64 MiB temporary per call (the optimization barrier keeps XLA from fusing it away):
# above glibc's 32 MiB mmap threshold and the 64 MiB heaps of its thread arenas.
SCRIPT = """
import resource, statistics, sys
from mashvlm_jax.train import cpu_tuning
applied = cpu_tuning.keep_freed_host_memory() if sys.argv[1] == "tuned" else None
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(x * 2.0)[::-1] * x))
faults = []
for _ in range(25):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, statistics.median(faults[-10:]))
"""
TEMP_PAGES = 64 * 2 ** 20 // 4096


def faults_per_call(mode: str) -> tuple[str, float]:
  """(whether the tuning was applied, the median page faults of the last 10 of 25 calls:
  the heap takes a few calls to hold enough freed blocks for every temporary)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  applied, faults = out.stdout.split()[-2:]
  return applied, float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_tuned_host_keeps_step_temporaries_mapped():
  applied, tuned = faults_per_call("tuned")
  assert applied == "True"
  _, default = faults_per_call("default")
  assert tuned < 0.05 * TEMP_PAGES, (
      f"{tuned:.0f} page faults per call with the tuning, {default:.0f} without; the 64 MiB "
      f"temporary is {TEMP_PAGES} pages")



def test_runs_on_cpu_follows_jax_platforms_then_device_files(monkeypatch):
  from mashvlm_jax.train import cpu_tuning
  assert cpu_tuning.runs_on_cpu("cpu") and cpu_tuning.runs_on_cpu(" CPU ,tpu")
  assert not cpu_tuning.runs_on_cpu("tpu") and not cpu_tuning.runs_on_cpu("cuda,cpu")
  present = {"/dev/accel*": ["/dev/accel0"]}
  monkeypatch.setattr(cpu_tuning.glob, "glob", lambda pattern: present.get(pattern, []))
  assert not cpu_tuning.runs_on_cpu("")  # a TPU host with JAX_PLATFORMS unset
  present.clear()
  assert cpu_tuning.runs_on_cpu("")
