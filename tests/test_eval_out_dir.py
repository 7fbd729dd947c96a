"""Where `mashvlm eval` writes by default, and that an output directory is never shared
by two checkpoints' predictions (a resumed run would mix them)."""
import pytest

from mashvlm_jax.eval import common


def trainer_workdir(root, steps):
  """The directory layout the trainer leaves: checkpoints/<step>/state for each step."""
  (root / "checkpoints").mkdir(parents=True)
  for step in steps:
    (root / "checkpoints" / str(step) / "state").mkdir(parents=True)
  return root


def test_default_out_dir_is_per_step_and_outside_the_checkpoints(tmp_path):
  run = trainer_workdir(tmp_path / "run", (500, 1000))
  assert common.default_out_dir(run, None, "synthetic") == run / "eval/step1000/synthetic"
  assert common.default_out_dir(run, 500, "synthetic") == run / "eval/step500/synthetic"
  step_dir = run / "checkpoints" / "500"
  assert common.default_out_dir(step_dir, None, "mvbench") == run / "eval/step500/mvbench"
  imported = tmp_path / "imported"
  (imported / "params").mkdir(parents=True)
  assert common.default_out_dir(imported, None, "mvbench") == imported / "eval/mvbench"
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    common.default_out_dir(trainer_workdir(tmp_path / "empty", ()), None, "synthetic")


def test_an_out_dir_refuses_another_checkpoint(tmp_path):
  run = trainer_workdir(tmp_path / "run", (500, 1000))
  out = tmp_path / "out"
  common.claim_out_dir(out, run, 500)
  common.claim_out_dir(out, run / "checkpoints" / "500", None)  # the same checkpoint
  with pytest.raises(ValueError, match="'step': 500.*'step': 1000"):
    common.claim_out_dir(out, run, None)  # the latest step, 1000
  common.claim_out_dir(out, run, None, resume=False)  # starting over is allowed
  assert '"step": 1000' in (out / "checkpoint.json").read_text()
