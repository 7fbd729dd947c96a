"""Tiny MASH-VLM that trains on 2 CPU cores: 8 frames of 64x64, patch 8 (M=23, N=64).

Variants: --config=configs/tiny_synthetic.py:ablation=t7_distinct (names in
mashvlm_jax/config_lib.py ABLATIONS), dtype=bfloat16.
"""
import ml_collections

from mashvlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, ablation="mash", dtype="float32")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.text_len = 32  # padded chat-text length per row

  config.model = ml_collections.ConfigDict(dict(
      vision=dict(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=128, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                  feature_layer=-2),
      llm=dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_layers=4,
               num_heads=4, num_kv_heads=2, head_dim=0, rope_theta=10000.0,
               rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
               attention_bias=False, mlp_bias=False),
      mask=dict(temporal="causal", spatial="bidirectional", temporal_sees_spatial=False,
                spatial_sees_temporal=False),
      projector="mlp2x_gelu",
      num_frames=8,
      rope_mode="harmonic",
      freeze_vision=True,
      dtype=arg.dtype,
      param_dtype="float32",
      remat_policy="none",
      attention_backend="dense",
  ))
  config_lib.apply_ablation(config.model, arg.ablation)
  return config
