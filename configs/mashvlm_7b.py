"""MASH-VLM 7B: CLIP ViT-L/14 at 224 (frozen, penultimate layer) + Vicuna-7B shapes,
16 frames -> M = 47 temporal and N = 256 spatial tokens.

Variants: --config=configs/mashvlm_7b.py:ablation=t6_disable_none,remat=dots
"""
import ml_collections

from mashvlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, ablation="mash", remat="full", dtype="bfloat16")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.text_len = 512

  config.model = ml_collections.ConfigDict(dict(
      vision=dict(image_size=224, patch_size=14, hidden_size=1024, num_layers=24,
                  num_heads=16, intermediate_size=4096, layer_norm_eps=1e-5,
                  hidden_act="quick_gelu", feature_layer=-2),
      llm=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
               num_heads=32, num_kv_heads=32, head_dim=0, rope_theta=10000.0,
               rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False),
      mask=dict(temporal="causal", spatial="bidirectional", temporal_sees_spatial=False,
                spatial_sees_temporal=False),
      projector="mlp2x_gelu",
      num_frames=16,
      rope_mode="harmonic",
      freeze_vision=True,
      dtype=arg.dtype,
      param_dtype="float32",
      remat_policy=arg.remat,
      attention_backend="dense",
  ))
  config_lib.apply_ablation(config.model, arg.ablation)
  return config
