"""Trainer paths through `mashvlm train` in subprocesses, from an `mashvlm import-hf` output
of tiny random HuggingFace LLaMA + CLIP checkpoints (safetensors, made here):

- init_from: the frozen vision tower comes out of training bit for bit as imported, the
  LLM within one Adam step of the imported weights (a fresh init is ~0.1 away);
- grad_accum_steps=2 equals grad_accum_steps=1 over the same global batch;
- nan_policy: a real non-finite step, from a checkpoint whose embedding row of one token
  is +inf (every batch holding that token before an answer token has a NaN loss). "stop"
  exits non-zero with the last good checkpoint intact; resuming it with "skip" skips that
  step (params unchanged, counted in the metrics' nonfinite) and trains on;
- keep_checkpoints: only the newest ones remain.
"""
import json
import shutil

import numpy as np
import pytest

from conftest import load_config, require
from test_train_run import (data_dir, fingerprints, run_cli,  # noqa: F401  (data_dir)
                            train_args)
from mashvlm_jax.convert import param_map, params_io
from mashvlm_jax.data import pipeline
from mashvlm_jax.train import trainer

torch = require("torch")
transformers = require("transformers")
from test_convert_hf import _perturb, make_clip  # noqa: E402  (needs torch)

BATCH = 4  # tests/test_train_run.py SMALL: 4 rows of 24 text tokens, tiny data build
TEXT_LEN = 24
LR = 2e-3  # configs/tiny_synthetic.py optim.lr; warmup_steps=0 below: every step at LR
NO_WARMUP = "--config.optim.warmup_steps=0"


def make_llama(directory, inf_token=None):
  """A random HF LlamaForCausalLM shaped as configs/tiny_synthetic.py's LLM, saved as
  safetensors; ``inf_token``: that token's embedding row set to +inf."""
  llm = load_config("tiny_synthetic").model.llm
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      rope_theta=llm.rope_theta, rms_norm_eps=llm.rms_norm_eps, tie_word_embeddings=False)
  model = _perturb(transformers.LlamaForCausalLM(cfg))
  if inf_token is not None:
    with torch.no_grad():
      model.model.embed_tokens.weight[inf_token] = float("inf")
  model.save_pretrained(directory)


def answered_tokens(batch) -> set[int]:
  """Text tokens of a batch that stand at or before an answer token of their row (their
  hidden state reaches a loss term)."""
  ids, real, labels = (np.asarray(batch[k]) for k in ("text_ids", "text_mask", "label_mask"))
  out = set()
  for row in range(ids.shape[0]):
    if labels[row].any():
      last = np.flatnonzero(labels[row]).max()
      out |= {int(t) for t in ids[row, :last + 1][real[row, :last + 1]]}
  return out


def train_batches(data_dir, steps):
  """The first ``steps`` training batches of SMALL, from the pipeline the trainer uses."""
  config = load_config("tiny_synthetic")
  config.data.update(batch_size=BATCH, text_len=TEXT_LEN, builder_config="tiny",
                     data_dir=str(data_dir))
  iterator = pipeline.make_iterator(config, "train", seed=int(config.seed))
  return [{k: np.asarray(v) for k, v in next(iterator).items()} for _ in range(steps)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, data_dir):
  """import-hf outputs: "clean", and "poisoned" (one token's embedding row +inf, a token
  absent from the batches of steps 1, 2 and 4 and present in step 3's); the batches."""
  root = tmp_path_factory.mktemp("hf")
  batches = train_batches(data_dir, 5)
  seen = [answered_tokens(b) for b in batches]
  specials = 4  # <pad> <unk> <s> </s>
  candidates = sorted(t for t in seen[2] - seen[0] - seen[1] - seen[3] if t >= specials)
  assert candidates, f"no token first answered at step 3 and absent at step 4: {seen}"
  token = candidates[0]
  make_clip(root / "clip", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, image_size=64, patch_size=8)
  out = {}
  for name, inf_token in (("clean", None), ("poisoned", token)):
    make_llama(root / name, inf_token)
    out[name] = root / f"{name}_ckpt"
    run = run_cli("import-hf", f"--llm={root / name}", f"--vision={root / 'clip'}",
                  "--config=configs/tiny_synthetic.py", f"--out={out[name]}",
                  "--allow_nonfinite", data_dir=data_dir)
    assert run.returncode == 0, run.stderr[-3000:]
  return dict(out, token=token, batches=batches,
              bad_steps=[s for s in range(1, 6) if token in seen[s - 1]])


def ckpt_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def metrics(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory, data_dir, imported):
  """One step at the full LR from the clean import over the same 8 rows: accum 1 and 2.

  Adam's eps is 1e-3 here: its first step is lr * g / (|g| + eps), whose slope lr / eps
  multiplies any rounding difference of a gradient entry; with eps = 1e-8 entries whose
  gradient nearly cancels (|g| ~ 1e-8) swing by up to lr, with 1e-3 by 2 x the difference."""
  runs = {}
  for accum in (1, 2):
    workdir = tmp_path_factory.mktemp(f"accum{accum}")
    out = run_cli("train", *train_args(workdir, 1, 1), "--config.data.batch_size=8",
                  f"--config.grad_accum_steps={accum}", NO_WARMUP, "--config.optim.eps=1e-3",
                  f"--config.init_from={imported['clean']}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    runs[accum] = workdir
  return runs


def test_init_from_import_hf(accum_runs, imported):
  start, _ = params_io.load_params(imported["clean"])
  assert set(start) == {"language_model", "projector", "vision_tower"}  # projector: init
  trained, _ = params_io.load_params(accum_runs[1])
  for path, want in param_map.leaves(start["vision_tower"]).items():  # frozen
    np.testing.assert_array_equal(param_map.get_path(trained["vision_tower"], path), want,
                                  err_msg=str(path))
  # One AdamW step from the imported LLM and projector: bias-corrected, the step is lr * g/(|g|+eps)
  # plus decay lr * wd * p, so |change| <= lr * (1 + wd |p|); a fresh init is ~0.1 away.
  config = load_config("tiny_synthetic")
  wd = config.optim.weight_decay
  moved = []
  for path, want in param_map.leaves(start).items():
    if path[0] == "vision_tower":
      continue
    got = param_map.get_path(trained, path)
    change = np.abs(got - want)
    assert (change <= LR * (1 + wd * np.abs(want)) + 1e-7).all(), (path, change.max())
    moved.append(change.max())
  assert max(moved) > LR / 2  # and it did train


def test_grad_accum_2_equals_accum_1(accum_runs):
  one, two = accum_runs[1], accum_runs[2]
  assert [r["batch"] for r in fingerprints(one)] == [r["batch"] for r in fingerprints(two)]
  (m1,), (m2,) = metrics(one), metrics(two)
  assert m1["answer_tokens"] == m2["answer_tokens"] > 0
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  a, _ = params_io.load_params(one)
  b, _ = params_io.load_params(two)
  for path, want in param_map.leaves(a).items():
    # updates are up to LR = 2e-3; accumulation may only change float32 rounding: 1e-7
    # and 2 float32 ulps of the parameter
    np.testing.assert_allclose(param_map.get_path(b, path), want, atol=1e-7, rtol=2.4e-7,
                               err_msg=str(path))


def test_nan_policy_stop_then_resume_with_skip(tmp_path, data_dir, imported):
  token, bad = imported["token"], imported["bad_steps"]
  assert bad[0] == 3 and 4 not in bad
  workdir = tmp_path / "run"
  # No weight decay: decaying the +inf row makes every update non-finite (and is refused),
  # so only the steps whose batch holds the token may be.
  args = train_args(workdir, 5, 1) + [NO_WARMUP, f"--config.init_from={imported['poisoned']}",
                                      "--config.keep_checkpoints=3",
                                      "--config.optim.weight_decay=0.0"]
  out = run_cli("train", *args, "--config.nan_policy=stop", data_dir=data_dir)
  assert out.returncode != 0
  assert "non-finite loss or gradient at or before step 3" in out.stderr, out.stderr[-3000:]
  assert "latest good: 2" in out.stderr
  assert ckpt_steps(workdir) == [1, 2]
  assert [r["step"] for r in metrics(workdir)] == [1, 2]
  assert [r["nonfinite"] for r in metrics(workdir)] == [0, 0]
  good, _ = params_io.load_params(workdir)  # the last good checkpoint, step 2
  embed = good["language_model"]["embed_tokens"]["embedding"]
  assert not np.isfinite(embed[token]).any()  # the poisoned row (decayed to NaN)
  finite = {p: np.isfinite(x).all() for p, x in param_map.leaves(good).items()}
  assert [p for p, ok in finite.items() if not ok] == [("language_model", "embed_tokens",
                                                        "embedding")]
  assert np.isfinite(np.delete(embed, token, axis=0)).all()

  out = run_cli("train", *args, "--config.nan_policy=skip", data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
  assert [r["nonfinite"] for r in rows] == [sum(b <= s for b in bad) for s in range(1, 6)]
  assert not np.isfinite(rows[2]["loss"]) and np.isfinite(rows[3]["loss"])
  # the batches the trainer saw (the stopped step 3 again after the resume) are the
  # pipeline's, in order: the resumed iterator state is intact too
  want = [trainer.batch_fingerprint(b) for b in imported["batches"]]
  assert [(r["step"], r["batch"]) for r in fingerprints(workdir)] == [
      (s, want[s - 1]) for s in (1, 2, 3, 3, 4, 5)]
  assert ckpt_steps(workdir) == [3, 4, 5]  # keep_checkpoints=3
  after = {s: params_io.load_params(workdir / "checkpoints" / str(s))[0] for s in (3, 4)}
  for path, value in param_map.leaves(good).items():  # step 3 skipped: nothing applied
    np.testing.assert_array_equal(param_map.get_path(after[3], path), value,
                                  err_msg=str(path))
  head = ("language_model", "lm_head", "kernel")  # step 4 trained on
  change = np.abs(param_map.get_path(after[4], head) - param_map.get_path(after[3], head))
  assert change.max() > LR / 2


def test_init_from_a_trainer_run_takes_parameters_only(tmp_path, data_dir, accum_runs):
  """A fine-tuning run from a trainer workdir or step directory: the parameters of that
  step, a fresh optimizer state and a step counter from 0 (with lr 0 the parameters come
  out unchanged and Adam's moments hold one step's gradients only)."""
  stage1 = accum_runs[1]  # a workdir trained for 1 step
  start, _ = params_io.load_params(stage1)
  for source in (stage1, stage1 / "checkpoints" / "1"):
    workdir = tmp_path / source.name
    out = run_cli("train", *train_args(workdir, 2, 2), "--config.optim.lr=0.0",
                  f"--config.init_from={source}", data_dir=data_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ckpt_steps(workdir) == [2], "the step counter did not start at 0"
    assert [m["step"] for m in metrics(workdir)] == [1, 2]
    tuned, _ = params_io.load_params(workdir)
    for path, want in param_map.leaves(start).items():
      np.testing.assert_array_equal(param_map.get_path(tuned, path), want, err_msg=str(path))

  # the stage-1 run's model config differs in one field: refused, that field named
  out = run_cli("train", *train_args(tmp_path / "other", 1, 1),
                "--config.model.mask.temporal=bidirectional",
                f"--config.init_from={stage1}", data_dir=data_dir)
  assert out.returncode != 0
  assert "model.mask.temporal: config 'bidirectional' vs checkpoint 'causal'" in out.stderr, (
      out.stderr[-3000:])

  # trained with other token ids (another vocabulary): refused, the file and both named
  other = tmp_path / "other_vocabulary"
  shutil.copytree(stage1, other)
  record = json.loads((other / "vocabulary.json").read_text())
  (other / "vocabulary.json").write_text(json.dumps(dict(record, fingerprint="0123456789ab")))
  out = run_cli("train", *train_args(tmp_path / "other2", 1, 1), f"--config.init_from={other}",
                data_dir=data_dir)
  assert out.returncode != 0
  assert (f"{other / 'vocabulary.json'}: field 'fingerprint' is 0123456789ab" in out.stderr
          and record["fingerprint"] in out.stderr), out.stderr[-3000:]
