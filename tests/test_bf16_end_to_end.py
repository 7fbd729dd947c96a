"""bfloat16 end to end: a tiny training run with bf16 compute and bf16 parameters, its
`mashvlm export-torch --dtype=bfloat16` export, and the package's PyTorch reference
(torch_reference) run from that export in bf16 and in float32, against our forward in bf16
and in float32.

Tolerances: bf16 keeps 8 significant bits, one ulp at magnitude x is 2^-7 x at most; the two
bf16 programs round in different places (XLA fusions against torch's op by op), so their
logits may differ by a few ulps of the largest logit. We allow 4 ulps of the largest logit,
TOL = 2^-5 max|logit|, between the two bf16 forwards and between bf16 and float32. The two
float32 forwards must agree to 1e-4. The bf16 forward must also differ from float32 by more
than float32 rounding (1e-4), which proves it ran in bf16."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, require
from test_train_run import data_dir, run_cli, train_args  # noqa: F401  (data_dir: fixture)
from mashvlm_jax import torch_reference
from mashvlm_jax.convert import param_map, params_io
from mashvlm_jax.model import mashvlm
from mashvlm_jax.train import trainer

BF16 = ["--config.model.dtype=bfloat16", "--config.model.param_dtype=bfloat16"]


def batch(vocab: int):
  """Two rows of random frames and text from the first 55 of the synthetic tokenizer's ids;
  row 1 right-padded after 15 of 24 tokens."""
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (2, 8, 64, 64, 3), dtype=np.uint8)
  text = rng.integers(4, vocab, (2, 24)).astype(np.int32)
  mask = np.ones((2, 24), bool)
  mask[1, 15:] = False
  return frames, text, mask


def test_bf16_train_export_and_torch_reference(tmp_path, data_dir):
  torch = require("torch")
  safetensors_torch = require("safetensors.torch")
  workdir, export = tmp_path / "run", tmp_path / "export"
  out = run_cli("train", *train_args(workdir, 2, 2), *BF16, data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  out = run_cli("export-torch", f"--checkpoint={workdir}", f"--out={export}",
                "--dtype=bfloat16", data_dir=data_dir)
  assert out.returncode == 0, out.stderr[-3000:]

  params, cfg = params_io.load_params(workdir)
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
  leaves = param_map.leaves(params)
  assert {str(x.dtype) for x in leaves.values()} == {"bfloat16"}
  # the export holds the trained bf16 parameters bit for bit
  exported = safetensors_torch.load_file(str(export / "projector.safetensors"))
  kernel = leaves[("projector", "linear_1", "kernel")]
  assert exported["linear_1.weight"].dtype == torch.bfloat16
  assert torch.equal(exported["linear_1.weight"].T.contiguous().view(torch.int16),
                     torch.from_numpy(np.asarray(kernel).view(np.int16)))

  frames, text, mask = batch(55)
  ours_bf16 = np.asarray(jax.jit(mashvlm.MashVLM(cfg).apply)(
      {"params": params}, frames, text, mask), np.float32)
  cfg32 = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
  params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
  ours_f32 = np.asarray(jax.jit(mashvlm.MashVLM(cfg32).apply)(
      {"params": params32}, frames, text, mask))
  ref_bf16 = torch_reference.load(export, dtype="bfloat16").logits(frames, text, mask)
  ref_f32 = torch_reference.load(export, dtype="float32").logits(frames, text, mask)
  assert ref_bf16.dtype == torch.float32  # lm_head output upcast; computed in bf16
  ref_bf16, ref_f32 = ref_bf16.numpy(), ref_f32.numpy()

  diff = lambda a, b: float(np.abs(a - b)[mask].max())
  tol = 2.0 ** -5 * float(np.abs(ours_f32[mask]).max())
  assert np.isfinite(ours_bf16).all() and np.isfinite(ref_bf16).all()
  assert diff(ours_f32, ref_f32) <= 1e-4
  assert diff(ours_bf16, ref_bf16) <= tol, (diff(ours_bf16, ref_bf16), tol)
  assert 1e-4 < diff(ours_bf16, ours_f32) <= tol, (diff(ours_bf16, ours_f32), tol)
  assert 1e-4 < diff(ref_bf16, ref_f32) <= tol, (diff(ref_bf16, ref_f32), tol)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_train_step_keeps_the_state_dtypes(param_dtype):
  """The train step returns a state of the same shapes and dtypes as it takes (else jit
  compiles it again on the second step and restore casts what was saved)."""
  config = load_config("tiny_synthetic")
  config.model.update(dtype="bfloat16", param_dtype=param_dtype)
  config.data.update(batch_size=4, text_len=8)
  setup = trainer.build(config)
  step = trainer.make_train_step(setup.model, setup.tx, setup.schedule, accum=1,
                                 trainable=setup.trainable)
  size = setup.model_cfg.vision.image_size
  batch = dict(frames=jax.ShapeDtypeStruct((4, 8, size, size, 3), jnp.uint8),
               text_ids=jax.ShapeDtypeStruct((4, 8), jnp.int32),
               text_mask=jax.ShapeDtypeStruct((4, 8), jnp.bool_),
               labels=jax.ShapeDtypeStruct((4, 8), jnp.int32),
               label_mask=jax.ShapeDtypeStruct((4, 8), jnp.float32))
  new_state, _ = jax.eval_shape(step, setup.abstract_state, batch)
  before = jax.tree_util.tree_leaves_with_path(setup.abstract_state)
  after = jax.tree_util.tree_leaves_with_path(new_state)
  changed = [jax.tree_util.keystr(path) for (path, a), (_, b) in zip(before, after)
             if (a.shape, a.dtype) != (b.shape, b.dtype)]
  assert len(before) == len(after) and not changed, changed[:3]
