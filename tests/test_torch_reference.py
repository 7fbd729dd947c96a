"""The full MASH-VLM forward in JAX against the package's PyTorch reference, loaded from an
export; export -> import gives bitwise-identical parameters."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import require

torch = require("torch")

from mashvlm_jax import config_lib, torch_reference
from mashvlm_jax.convert import hf_import, param_map, params_io, torch_export
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=4,
              intermediate_size=37)
LLM = dict(vocab_size=97, hidden_size=48, intermediate_size=61, num_layers=2, num_heads=6,
           num_kv_heads=2, rope_theta=500.0)
CONFIGS = {
    # MASH-VLM proper: harmonic ids, DST mask, MLP projector, grouped queries
    "mash": dict(num_frames=4, rope_mode="harmonic", vision=VISION, llm=LLM),
    # uneven segments (T=6), balanced ids, Table 6 "disable none" mask, linear projector,
    # tied embeddings, llama3 rope scaling, biases, exact-GELU CLIP, an early feature layer
    "variant": dict(num_frames=6, rope_mode="balanced", projector="linear",
                    mask=config_lib.ABLATIONS["t6_disable_none"]["mask"],
                    vision=dict(VISION, hidden_act="gelu", feature_layer=1),
                    llm=dict(LLM, tie_word_embeddings=True, attention_bias=True,
                             mlp_bias=True, num_kv_heads=1, head_dim=10,
                             rope_scaling=dict(rope_type="llama3", factor=4.0,
                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=32))),
}


def random_params(cfg: ModelConfig):
  """Random float32 leaves shaped like the model's (norm scales near 1), without the cost
  of compiling init: every tensor distinctive, so a misplaced one shows."""
  shapes = nn.unbox(mashvlm.abstract_params(cfg))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (("scale" in jax.tree_util.keystr(p)) + 0.05 * rng.normal(size=x.shape))
      .astype(np.float32), shapes)


def inputs(cfg: ModelConfig):
  rng = np.random.default_rng(0)
  size = cfg.vision.image_size
  frames = rng.integers(0, 256, (2, cfg.num_frames, size, size, 3), dtype=np.uint8)
  text = rng.integers(0, cfg.llm.vocab_size, (2, 7)).astype(np.int32)
  mask = np.ones((2, 7), bool)
  mask[1, 4:] = False
  return frames, text, mask


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
  cfg = ModelConfig.from_dict(CONFIGS[request.param])
  params = random_params(cfg)
  out = tmp_path_factory.mktemp(request.param)
  params_io.save_params(out / "ckpt", params, cfg)
  loaded, _ = params_io.load_params(out / "ckpt")
  torch_export.export_torch(loaded, cfg, out / "export", max_shard_bytes=20_000)
  return cfg, params, out


def test_full_forward_equals_torch_reference(exported):
  cfg, params, out = exported
  frames, text, mask = inputs(cfg)
  want = jax.jit(mashvlm.MashVLM(cfg).apply)({"params": params}, frames, text, mask)
  got = torch_reference.load(out / "export").logits(frames, text, mask).numpy()
  assert got.shape == want.shape == (2, 7, cfg.llm.vocab_size)
  assert np.abs(got - np.asarray(want))[mask].max() <= 1e-4
  assert np.isfinite(got).all()


def test_export_then_import_is_bitwise(exported):
  cfg, params, out = exported
  export = out / "export"
  got, cfg2 = hf_import.import_hf(export / "language_model", export / "vision_tower", cfg,
                                  projector_file=export / "projector.safetensors")
  assert cfg2 == cfg
  want = param_map.leaves(params)
  assert set(param_map.leaves(got)) == set(want)
  for path, leaf in param_map.leaves(got).items():
    assert leaf.dtype == want[path].dtype and leaf.tobytes() == want[path].tobytes(), path
