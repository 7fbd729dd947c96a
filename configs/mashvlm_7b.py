"""MASH-VLM 7B: CLIP ViT-L/14 at 224 (frozen, penultimate layer) + Vicuna-7B shapes,
16 frames -> M = 47 temporal and N = 256 spatial tokens.

Variants: --config=configs/mashvlm_7b.py:ablation=t6_disable_none,remat=dots
"""
import os

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
                  hidden_act="quick_gelu", feature_layer=-2,
                  position_init="normal"),  # replaced by the imported CLIP weights
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
      attention_backend="auto",  # splash on TPU, gpu on GPUs, dense on CPU
      scan_layers=True,  # one compiled layer body per tower
      # LoRA adapters on the decoder (docs/design.md "LoRA"): rank 0 = off. With rank > 0
      # the decoder's base weights are frozen and only the adapters (and what optim.freeze
      # leaves, e.g. the projector) train. targets: regex matched in full against
      # q_proj k_proj v_proj o_proj gate_proj up_proj down_proj. The HACA paper: 16/32
      # (VideoChat2), 128/256 (Video-LLaVA); dropout as LLaVA's LoRA scripts.
      lora=dict(rank=0, alpha=32.0,
                targets="q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj",
                dropout=0.05),
  ))
  config_lib.apply_ablation(config.model, arg.ablation)

  # Training: instruction tuning as in VideoChat2/LLaVA stage 2 (global batch 128, AdamW
  # 2e-5, cosine), bf16 compute (model.dtype) with float32 master weights and optimizer
  # state (model.param_dtype), full remat. `mashvlm compile --config=configs/mashvlm_7b.py
  # --topology=v5p-8` checks that a slice holds it (docs/compile.md).
  config.total_steps = 5000
  config.checkpoint_every = 500
  config.log_every = 10
  config.grad_accum_steps = 1
  config.nan_policy = "stop"
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-5, warmup_steps=100, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0,
      freeze=[],  # the vision tower is frozen by model.freeze_vision
      lr_multipliers={}, no_decay=r"(norm|bias)"))

  # Users' video QA data (mashvlm_jax/data/; `mashvlm make-data` builds it): set
  # data.annotations, data.video_root and data.tokenizer.path (Vicuna's tokenizer.model).
  config.data = ml_collections.ConfigDict(dict(
      name="local_video_qa",
      builder_config="default",
      train_size=0,
      test_size=0,
      data_dir=os.environ.get("MASHVLM_DATA_DIR", "./data_cache"),
      stored_frames=0,  # 0 = the model's frame count / resolution
      stored_size=0,
      typical_prob=0.9,  # synthetic_unscene only
      scene_only_share=0.05,  # synthetic_unscene only
      seed=0,
      train_split="train",
      eval_splits=(),
      batch_size=128,  # global rows per optimizer step
      text_len=config.get_ref("text_len"),
      # e.g. (128, 256, 512): each batch padded to the smallest of these that holds its
      # rows, one compile per length (data/buckets.py); () = every batch at text_len
      text_buckets=(),
      # UTR: train on the QA rows a `mashvlm tpl` pass kept (data/row_filter.py); "" = all
      row_filter=dict(path="", rule="top", fraction=1 / 3, threshold=0.0, per_task=False),
      qa_mode="sample",
      sample_mode="rand",
      augment=dict(random_resized_crop=False, crop_scale=(0.8, 1.0),
                   crop_ratio=(0.75, 1.3333), flip=False),
      tokenizer=dict(kind="sentencepiece", path="", bos="<s>", eos="</s>"),
      template=dict(system="A chat between a curious user and an artificial intelligence "
                    "assistant. The assistant gives helpful, detailed, and polite answers "
                    "to the user's questions.", user="USER:", assistant="ASSISTANT:"),
      num_workers=8,
      num_threads=16,
      prefetch_buffer_size=256,
      annotations={},
      video_root="",
      build_sample_mode="middle",
      build_threads=16,
      max_failure_share=0.05,
  ))
  return config
