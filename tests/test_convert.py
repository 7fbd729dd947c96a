"""The conversion table, safetensors reading/writing and the params checkpoint, without torch."""
import json
import math
import struct

import flax.linen as nn
import ml_dtypes
import numpy as np
import pytest

from mashvlm_jax.convert import param_map, params_io, safetensors_io
from mashvlm_jax.convert.param_map import ConversionError
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from conftest import load_config

SMALL = dict(num_frames=4, vision=dict(image_size=32, patch_size=8, hidden_size=16,
                                       num_layers=2, num_heads=2, intermediate_size=24),
             llm=dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_layers=2,
                      num_heads=4, num_kv_heads=2))


@pytest.mark.parametrize("layout,jax_shape", [
    (param_map.COPY, (5, 3)), (param_map.LINEAR, (5, 3)), (param_map.HEADS_IN, (6, 2, 4)),
    (param_map.HEADS_OUT, (2, 4, 6)), (param_map.FLAT, (2, 4)), (param_map.CONV, (3, 3, 3, 5))])
def test_layouts_are_inverse_and_match_torch_conventions(layout, jax_shape):
  x = np.random.default_rng(0).normal(size=jax_shape)
  hf = layout.to_hf(x)
  assert hf.shape == layout.hf_shape(jax_shape)
  np.testing.assert_array_equal(layout.to_jax(hf, jax_shape), x)
  if layout is param_map.HEADS_IN:  # torch row h*head_dim + j is flax [:, h, j]
    np.testing.assert_array_equal(hf[1 * 4 + 3], x[:, 1, 3])
  if layout is param_map.HEADS_OUT:  # torch column h*head_dim + j is flax [h, j, :]
    np.testing.assert_array_equal(hf[:, 1 * 4 + 2], x[1, 2])
  if layout is param_map.CONV:  # torch OIHW [o, i, y, x] is flax HWIO [y, x, i, o]
    assert hf[4, 2, 0, 1] == x[0, 1, 2, 4]


@pytest.mark.parametrize("overrides", [
    {}, dict(projector="linear"),
    dict(llm=dict(SMALL["llm"], tie_word_embeddings=True, attention_bias=True, mlp_bias=True))])
def test_table_covers_every_parameter_once(overrides):
  cfg = ModelConfig.from_dict({**SMALL, **overrides})
  shapes = nn.unbox(mashvlm.abstract_params(cfg))
  for tower in param_map.present_towers(shapes):  # the action token: test_action_token.py
    tensors = param_map.plan(tower, shapes[tower])
    names = [t.hf for t in tensors]
    assert len(set(names)) == len(names)
    # every element of every leaf is written by exactly one HF tensor
    for path, leaf in param_map.leaves(shapes[tower]).items():
      mine = [t for t in tensors if t.path == path]
      assert sum(math.prod(t.jax_shape) for t in mine) == math.prod(leaf.shape), path
  names = {t.hf for t in param_map.plan("language_model", shapes["language_model"])}
  assert ("lm_head.weight" in names) != cfg.llm.tie_word_embeddings
  assert ("model.layers.1.self_attn.q_proj.bias" in names) == cfg.llm.attention_bias


def test_7b_tensor_counts_and_shapes():
  cfg = ModelConfig.from_dict(load_config("mashvlm_7b").model)
  shapes = nn.unbox(mashvlm.abstract_params(cfg))
  llm = {t.hf: t.hf_shape for t in param_map.plan("language_model", shapes["language_model"])}
  vision = {t.hf: t.hf_shape for t in param_map.plan("vision_tower", shapes["vision_tower"])}
  assert len(llm) == 32 * 9 + 3 and len(vision) == 24 * 16 + 7  # as in Vicuna-7B / CLIP-L
  assert llm["model.layers.31.self_attn.o_proj.weight"] == (4096, 4096)
  assert llm["model.layers.0.mlp.down_proj.weight"] == (4096, 11008)
  assert vision["embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
  assert vision["encoder.layers.23.self_attn.q_proj.bias"] == (1024,)


def test_uncovered_parameter_is_refused():
  shapes = {"layers": {"q_norm": {"scale": np.zeros((2, 8))}}}
  with pytest.raises(ConversionError, match="not covered .*layers/q_norm/scale"):
    param_map.plan("language_model", shapes)


def _spec(name, array):
  return safetensors_io.TensorSpec(name, array.shape, array.dtype, lambda: array)


def test_sharded_write_then_lazy_read(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {f"t{i}": rng.normal(size=(i + 1, 7)).astype(np.float32) for i in range(6)}
  arrays["bf"] = rng.normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
  arrays["half"] = rng.normal(size=(4,)).astype(np.float16)
  specs = [_spec(k, v) for k, v in arrays.items()]
  files = safetensors_io.write_checkpoint(tmp_path, specs, max_shard_bytes=100)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert files[-1] == "model.safetensors.index.json" and len(files) > 3
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in arrays.values())
  assert set(index["weight_map"]) == set(arrays)
  ckpt = safetensors_io.open_checkpoint(tmp_path)
  for name, value in arrays.items():
    got = ckpt.read(name)
    assert got.dtype == value.dtype and got.tobytes() == value.tobytes()
  # the official reader agrees with the header we wrote
  from safetensors import safe_open
  with safe_open(str(tmp_path / index["weight_map"]["t3"]), "np") as f:
    np.testing.assert_array_equal(f.get_tensor("t3"), arrays["t3"])
    assert f.metadata() == {"format": "pt"}


def test_single_file_below_shard_size(tmp_path):
  specs = [_spec("a", np.ones((2, 2), np.float32))]
  assert safetensors_io.write_checkpoint(tmp_path, specs, 10 ** 6) == ["model.safetensors"]
  assert safetensors_io.open_checkpoint(tmp_path).names() == ["a"]


def test_corrupt_or_missing_files_are_named(tmp_path):
  bad = tmp_path / "model.safetensors"
  header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
  bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 10)  # data cut short
  with pytest.raises(ConversionError, match="tensor w .*inconsistent"):
    safetensors_io.open_checkpoint(tmp_path)
  bad.write_bytes(b"\xff" * 20)
  with pytest.raises(ConversionError, match="not a safetensors file"):
    safetensors_io.open_checkpoint(tmp_path)
  bad.unlink()
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(ConversionError, match="model-00001-of-00002.safetensors"):
    safetensors_io.open_checkpoint(tmp_path)
  with pytest.raises(ConversionError, match="does not exist"):
    safetensors_io.open_checkpoint(tmp_path / "nowhere")
  (tmp_path / "model.bin").write_bytes(b"")
  with pytest.raises(ConversionError, match="pickle.*--allow_pickle"):
    safetensors_io.open_file(tmp_path / "model.bin")


def test_parse_size():
  assert safetensors_io.parse_size("5GB") == 5 * 10 ** 9
  assert safetensors_io.parse_size("2GiB") == 2 * 2 ** 30
  assert safetensors_io.parse_size("500mb") == 5 * 10 ** 8
  assert safetensors_io.parse_size("1234") == 1234
  with pytest.raises(ValueError, match="cannot read size"):
    safetensors_io.parse_size("lots")


def test_params_checkpoint_round_trip_and_atomicity(tmp_path, monkeypatch):
  monkeypatch.setattr(params_io, "BUDGET_FLOOR", 0)  # Orbax's budget = the largest leaf
  cfg = ModelConfig.from_dict(SMALL)
  shapes = nn.unbox(mashvlm.abstract_params(cfg))
  rng = np.random.default_rng(0)
  params = {tower: {p: rng.normal(size=x.shape).astype(np.float32)
                    for p, x in param_map.leaves(tree).items()} for tower, tree in shapes.items()}
  nested = {}
  for tower, flat in params.items():
    for path, value in flat.items():
      param_map.set_path(nested, (tower,) + path, value)
  out = params_io.save_params(tmp_path / "ckpt", nested, cfg)
  loaded, cfg2 = params_io.load_params(out)
  assert cfg2 == cfg
  for path, value in param_map.leaves(nested).items():
    assert param_map.get_path(loaded, path).tobytes() == value.tobytes()
  with pytest.raises(FileExistsError, match="--overwrite"):
    params_io.save_params(tmp_path / "ckpt", nested, cfg)
  # a failure mid-save leaves neither a partial directory nor a changed old one
  broken = dict(nested, projector={"linear_1": {"kernel": object()}})
  with pytest.raises(Exception):
    params_io.save_params(tmp_path / "ckpt", broken, cfg, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
  assert params_io.load_params(out)[1] == cfg
  # a tree that does not fit the config is named leaf by leaf
  del nested["language_model"]["norm"]
  nested["vision_tower"]["class_embedding"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"missing language_model/norm/scale(.|\n)*"
                     r"vision_tower/class_embedding: expected float32\[16\], found float32\[3\]"):
    params_io.check_params(nested, cfg)


def test_imports_pull_in_neither_torch_nor_jax():
  """torch_reference needs torch only when run; the converters import jax/torch lazily."""
  import subprocess
  import sys
  from conftest import ROOT
  code = ("import sys\n"
          "import mashvlm_jax.torch_reference, mashvlm_jax.convert.hf_import\n"
          "import mashvlm_jax.convert.torch_export, mashvlm_jax.convert.params_io\n"
          "print(sorted(m for m in ('torch', 'jax', 'transformers') if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
