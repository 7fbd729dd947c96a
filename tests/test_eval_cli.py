"""`mashvlm eval`, `import-judgments` and `attention-plot` end to end on a 2-step
checkpoint of the tiny config. Slow: every command is a fresh process that imports JAX and
compiles the model (4-10 s each on 2 cores), and the checkpoint comes from `mashvlm
train`; the evaluators' values and resumes are checked in-process in test_eval_values.py."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
DATA = ["--config=configs/tiny_synthetic.py", "--config.data.builder_config=tiny",
        "--config.data.test_size=2", "--config.data.batch_size=4"]


# `mashvlm` with the evaluators' work counted (test_eval_values.count_work): the counts
# go to the JSON file named by the first argument.
COUNTED_CLI = """
import json, sys
sys.path.insert(0, "tests")
from test_eval_values import count_work
from mashvlm_jax import cli
with count_work() as work:
  try:
    cli.main(["mashvlm"] + sys.argv[2:])
  finally:
    open(sys.argv[1], "w").write(json.dumps(work))
"""


def run_cli(command, *args, data_dir, timeout=600, counts=None):
  """Runs `mashvlm command args`; with ``counts`` (a path) returns (output, the work the
  evaluators did: model rows and prediction rows written)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MASHVLM_DATA_DIR=str(data_dir))
  env.pop("PYTEST_CURRENT_TEST", None)
  program = ["-m", "mashvlm_jax.cli"] if counts is None else ["-c", COUNTED_CLI, str(counts)]
  out = subprocess.run([sys.executable, *program, command, *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out if counts is None else (out, json.loads(counts.read_text()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(data dir, workdir) of a 2-step run on the tiny synthetic set (2 clips per test split)."""
  data_dir = tmp_path_factory.mktemp("data")
  workdir = tmp_path_factory.mktemp("run")
  run_cli("make-data", *DATA, data_dir=data_dir)
  run_cli("train", *DATA, f"--workdir={workdir}", "--config.total_steps=2",
          "--config.checkpoint_every=2", "--config.log_every=1", data_dir=data_dir)
  return data_dir, workdir


def test_eval_synthetic_and_resume(trained, tmp_path):
  """Default --out <workdir>/eval/step<N>/synthetic; the same command again computes
  nothing and leaves every file as it was."""
  data_dir, workdir = trained
  args = ["eval", *DATA, f"--checkpoint={workdir}", "--benchmark=synthetic"]
  out, work = run_cli(*args, data_dir=data_dir, counts=tmp_path / "first.json")
  eval_dir = workdir / "eval" / "step2" / "synthetic"
  result = json.loads((eval_dir / "result.json").read_text())
  assert result["binary"]["counts"]["Unusual Action"] == 2
  questions = 2 * (4 + 4 + 2)  # 2 clips per split
  assert result["binary"]["questions"] == questions
  assert work["rows_written"] == questions + 2 * 3 * 2  # + action and scene per clip
  assert "| Scene-only Action | Unusual Action | Unusual Scene | Avg." in out.stdout
  files = {p: p.read_text() for p in sorted(eval_dir.rglob("*")) if p.is_file()}
  # binary/ and labels/: predictions.jsonl, result.json, result.md; combined result.{json,md}
  # and checkpoint.json (which checkpoint and step this directory evaluates)
  assert len(files) == 9
  assert json.loads(files[eval_dir / "checkpoint.json"]) == {
      "checkpoint": str(workdir / "checkpoints"), "step": 2}
  out, work = run_cli(*args, data_dir=data_dir, counts=tmp_path / "second.json")
  assert work == {}  # no model call, no prediction row
  assert {p: p.read_text() for p in sorted(eval_dir.rglob("*")) if p.is_file()} == files
  assert "| Scene-only Action | Unusual Action | Unusual Scene | Avg." in out.stdout


def test_eval_generate_mode_and_open_ended_with_judgments(trained, tmp_path):
  data_dir, workdir = trained
  run_cli("eval", *DATA, f"--checkpoint={workdir}", "--benchmark=unscene_binary",
          "--mode=generate", "--max_items=1", f"--out={tmp_path}/binary", data_dir=data_dir)
  rows = [json.loads(line) for line in (tmp_path / "binary" / "predictions.jsonl").open()]
  assert len(rows) == 4 + 4 + 2 and all("prediction" in r for r in rows)
  run_cli("eval", *DATA, f"--checkpoint={workdir}", "--benchmark=unscene_open",
          "--max_items=1", "--max_new_tokens=4", f"--out={tmp_path}/open", data_dir=data_dir)
  requests = [json.loads(line) for line in (tmp_path / "open" / "judge_prompts.jsonl").open()]
  assert len(requests) == 2 + 2 + 1  # action+scene, action+scene, scene-only action
  judgments = tmp_path / "judgments.jsonl"
  judgments.write_text("".join(json.dumps({"key": r["key"], "response": '{"score": 2}'})
                               + "\n" for r in requests))
  out = run_cli("import-judgments", f"--eval_dir={tmp_path}/open",
                f"--judgments={judgments}", data_dir=data_dir)
  assert "| model | 2.00 | 2.00 | 2.00 | 2.00 |" in out.stdout


def test_attention_plot_written(trained, tmp_path):
  data_dir, workdir = trained
  png = tmp_path / "attention.png"
  run_cli("attention-plot", *DATA, f"--checkpoint={workdir},{workdir}",
          "--names=a,b", "--split=test_unusual", "--index=0",
          "--question=Is the person skiing?", f"--out={png}", data_dir=data_dir)
  assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
  numbers = json.loads((tmp_path / "attention.json").read_text())
  assert len(numbers["mass"]["a"]["spatial"]) == 4  # one value per decoder layer
