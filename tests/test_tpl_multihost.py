"""`mashvlm tpl` over many processes (analysis/tpl.py, docs/design.md "UTR temporal
perplexity", multi-host):

- the pass itself, every process played in turn here with the stub scorer of
  tests/test_tpl.py: each part holds exactly its process's records (i, i + n, ...), the
  merged tpl.jsonl is byte for byte the one-process file, a part cut short (torn line) is
  completed without a duplicate, a rerun with 3 processes over an interrupted 2-process
  run scores only the missing rows, and --noresume clears the other runs' rows;
- the command: 2 processes on 127.0.0.1 (jax.distributed, gloo) from relative paths score
  a trainer checkpoint restored onto a mesh sharded over both processes (so every host
  gathers its parameters) and give the rows of one process (same keys and order, values
  within 1e-5); resumed after process 1's part was cut short, the same rows, no
  duplicate.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mashvlm_jax.analysis import tpl
from test_tpl import CLI_CONFIG, bench, stub_score_fn  # noqa: F401 (bench: a fixture)
from test_train_run import free_port

LIMIT = 5  # records 0..4 of the tiny train split, 8 QA rows each


def lines(path):
  return path.read_text().splitlines()


def keys_of(path):
  return [json.loads(line)["key"] for line in lines(path)]


def record_keys(bench, indices):
  return {f"train:{bench['records'][i]['id']}:{k}" for i in indices for k in range(8)}


class Counting:
  """The stub scorer, counting the answer rows it is asked to score (2 per QA row: full
  and keyframe)."""

  def __init__(self):
    self.stub, self.rows = stub_score_fn(1), 0

  def __call__(self, frames, clip_index, text_ids, text_mask):
    self.rows += int((text_mask.sum(-1) > 1).sum())
    return self.stub(frames, clip_index, text_ids, text_mask)


def play(bench, out, process_count, order, scorer=None, **kwargs):
  """Runs the pass as each process of ``order`` in turn (the last is process 0, which
  merges after the barrier); returns (process 0's summary, the barrier names seen)."""
  names = []
  for index in order:
    summary = tpl.run(bench["config"], "train", out, scorer or stub_score_fn(1), 1, seed=5,
                      limit=LIMIT, batch_size=2, show_progress=False, process_index=index,
                      process_count=process_count, barrier=names.append, **kwargs)
  return summary, names


def test_shares_merge_resume_and_another_process_count(bench, tmp_path):
  one = tmp_path / "one"
  tpl.run(bench["config"], "train", one, stub_score_fn(1), 1, seed=5, limit=LIMIT,
          batch_size=2, show_progress=False)
  pod = tmp_path / "pod"
  summary, names = play(bench, pod, 2, [1, 0])
  assert names == ["mashvlm tpl: every share scored"] * 2
  part0, part1 = pod / tpl.part_name(0, 2), pod / tpl.part_name(1, 2)
  assert set(keys_of(part0)) == record_keys(bench, [0, 2, 4]) and len(lines(part0)) == 24
  assert set(keys_of(part1)) == record_keys(bench, [1, 3]) and len(lines(part1)) == 16
  assert (pod / "tpl.jsonl").read_text() == (one / "tpl.jsonl").read_text()
  assert summary["rows"] == 40 and summary["records"] == LIMIT
  assert json.loads((pod / "summary.json").read_text())["tasks"] == json.loads(
      (one / "summary.json").read_text())["tasks"]

  # Process 1 was stopped mid-line before the merge: its rerun scores the other 13 rows
  # once; process 0 scores nothing; the merge is the one-process file again.
  kept = lines(part1)
  part1.write_text("\n".join(kept[:3]) + "\n" + kept[3][:25])
  (pod / "tpl.jsonl").unlink()
  counting = Counting()
  play(bench, pod, 2, [1, 0], counting)
  assert counting.rows == 2 * 13
  again = lines(part1)
  assert again[:3] == kept[:3] and len(again) == 16 and len(set(keys_of(part1))) == 16
  assert (pod / "tpl.jsonl").read_text() == (one / "tpl.jsonl").read_text()

  # A 2-process run stopped before record 4 (process 0's) and before its merge, resumed
  # with 3 processes: only record 4 is scored, by process 4 % 3 = 1, into its part.
  part0.write_text("".join(line + "\n" for line in lines(part0)[:16]))
  (pod / "tpl.jsonl").unlink()
  counting = Counting()
  play(bench, pod, 3, [2, 1, 0], counting)
  assert counting.rows == 2 * 8
  assert [n for n, _, _ in tpl.part_files(pod)] == [2, 2, 3]
  assert set(keys_of(pod / tpl.part_name(1, 3))) == record_keys(bench, [4])
  assert (pod / "tpl.jsonl").read_text() == (one / "tpl.jsonl").read_text()
  # One process over the same directory: nothing left to score, the same tpl.jsonl.
  counting = Counting()
  tpl.run(bench["config"], "train", pod, counting, 1, seed=5, limit=LIMIT, batch_size=2,
          show_progress=False)
  assert counting.rows == 0
  assert (pod / "tpl.jsonl").read_text() == (one / "tpl.jsonl").read_text()

  # --noresume with 2 processes: the 3-process part and the old merge go.
  play(bench, pod, 2, [1, 0], resume=False)
  assert [(n, i) for n, i, _ in tpl.part_files(pod)] == [(2, 0), (2, 1)]
  assert keys_of(pod / "tpl.jsonl") == keys_of(one / "tpl.jsonl")
  tpl.run(bench["config"], "train", pod, stub_score_fn(1), 1, seed=5, limit=1,
          batch_size=2, show_progress=False, process_index=1, process_count=2, resume=False)
  assert not part1.exists()  # --noresume, and its share of one record is empty
  with pytest.raises(ValueError, match=r"process_index=2 is outside \[0, 2\)"):
    tpl.run(bench["config"], "train", pod, stub_score_fn(1), 1, process_index=2,
            process_count=2)


def pod_env(devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("PYTEST_CURRENT_TEST", None)
  env.pop("MASHVLM_DATA_DIR", None)
  return env


def run_pod(cwd, *args, processes=2):
  """``mashvlm tpl`` as ``processes`` processes of one jax.distributed run, from ``cwd``."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "mashvlm_jax.cli", "tpl", *CLI_CONFIG, *args,
       "--distributed=explicit", f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={processes}", f"--process_id={i}"],
      cwd=cwd, env=pod_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def trainer_workdir(config, params, workdir):
  """A trainer workdir holding ``params`` as its checkpoint of step 1, with the files
  ``mashvlm train`` writes beside it (model_config.json, vocabulary.json), untrained."""
  import jax
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.data import registry
  from mashvlm_jax.train import checkpoint, trainer
  setup = trainer.build(config)
  state = jax.tree.map(lambda a, where: jax.device_put(np.zeros(a.shape, a.dtype), where),
                       setup.abstract_state, setup.state_shardings)  # zero moments
  state = state.replace(params=jax.device_put(params, setup.state_shardings.params))
  saver = checkpoint.Checkpointer(workdir / "checkpoints", use_async=False)
  saver.save(1, state, {})
  saver.wait()
  saver.close()
  (workdir / params_io.CONFIG_FILE).write_text(json.dumps(setup.model_cfg.to_dict()) + "\n")
  (workdir / registry.VOCABULARY_FILE).write_text(
      json.dumps(registry.vocabulary_record(config)) + "\n")


@pytest.mark.slow  # two jax.distributed processes over gloo (about 60 s on 2 cores)
def test_two_processes_score_a_sharded_checkpoint_like_one(bench, tmp_path):
  """The checkpoint is restored onto --config.mesh.fsdp=2, one device per process: its
  parameters are sharded over both processes and each must gather them."""
  cwd = tmp_path
  trainer_workdir(bench["config"], bench["params"], cwd / "run")
  (cwd / "data").symlink_to(bench["cwd"] / "data")
  args = ["--checkpoint=run", "--out=pod", f"--limit={LIMIT}", "--batch_size=2", "--seed=1",
          "--config.mesh.fsdp=2"]
  (out0, err0), (out1, err1) = run_pod(cwd, *args)
  assert "process 1: 16 rows in" in out1 and "| action |" in out0
  for err in (err0, err1):
    gathered = re.search(r"gathered (\d+) of (\d+) arrays sharded", err)
    assert gathered and 0 < int(gathered[1]) <= int(gathered[2]), err[-2000:]
  tpl.run_with_params(bench["config"], bench["params"], "train", cwd / "one", seed=1,
                      limit=LIMIT, batch_size=2, show_progress=False)
  one = [json.loads(line) for line in lines(cwd / "one" / "tpl.jsonl")]
  pod = cwd / "pod"

  def assert_same_rows():
    rows = [json.loads(line) for line in lines(pod / "tpl.jsonl")]
    assert [r["key"] for r in rows] == [r["key"] for r in one] and len(rows) == 40
    for got, want in zip(rows, one):
      assert got.keys() == want.keys()
      for field in ("nll_full", "nll_keyframe", "tpl"):
        assert got[field] == pytest.approx(want[field], abs=1e-5), (got["key"], field)
      assert {k: v for k, v in got.items() if k not in ("nll_full", "nll_keyframe", "tpl")} \
          == {k: v for k, v in want.items() if k not in ("nll_full", "nll_keyframe", "tpl")}

  assert_same_rows()
  part0, part1 = pod / tpl.part_name(0, 2), pod / tpl.part_name(1, 2)
  assert set(keys_of(part0)) == record_keys(bench, [0, 2, 4])
  assert set(keys_of(part1)) == record_keys(bench, [1, 3])
  # Process 1 stopped mid-line before the merge: the rerun completes its part, once.
  kept = lines(part1)
  part1.write_text("\n".join(kept[:5]) + "\n" + kept[5][:30])
  (pod / "tpl.jsonl").unlink()
  run_pod(cwd, *args)
  again = lines(part1)
  assert again[:5] == kept[:5] and len(again) == 16 and len(set(keys_of(part1))) == 16
  assert_same_rows()
