"""MASH-VLM 7B: CLIP ViT-L/14 at 224 (frozen, penultimate layer) + Vicuna-7B shapes,
16 frames -> M = 47 temporal and N = 256 spatial tokens.

Variants: --config=configs/mashvlm_7b.py:ablation=t6_disable_none,remat=dots
remat: full by default, the only policy that fits v5p-8 and v6e-8 at the default batch;
on v5p-64 remat=dots fits in 15.9 of 95 GiB with a 16% shorter step bound (`mashvlm
compile --sweep`, docs/compile.md).
Recipes: recipe=utr (Video-UTR stage II, Table 9 and Table 8 of the UTR paper; see
_utr_recipe and docs/design.md "UTR trajectory queries").
Stage 1 (projector alignment on video-caption pairs, e.g. WebVid):
  --config=configs/mashvlm_7b.py:stage=pretrain  (see ``pretrain_stage``)

HACA fine-tuning (paper App. A; data/tasks/haca.py) on users' VideoCon-style annotations:
haca=lora16 (VideoChat2's setting: LoRA rank 16, alpha 32, lr 2e-5) or haca=lora128
(Video-LLaVA's: rank 128, alpha 256, lr 2e-4), vision frozen, AdamW, 3 epochs; rows per
VideoCon record from haca_family=haca|haca_mask|entailment. With
train_examples=N (the training records), total_steps = ceil(3 N / data.batch_size).
Start from the stage-2 model with --config.init_from=<import-hf or workdir>.
"""
import os

import ml_collections

from mashvlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, ablation="mash", remat="full", dtype="bfloat16",
                             stage="instruct", recipe="", haca="", haca_family="haca",
                             train_examples=0)
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
      # LLaVAction's action token and heads (model/action_token.py), EPIC-KITCHENS-100
      # classes: 97 verbs, 300 nouns, 3806 actions.
      action_token=dict(enabled=False, num_verbs=97, num_nouns=300, num_actions=3806,
                        loss_weight=0.05, head_weights=(0.5, 0.5, 0.1)),
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
  # Wall seconds an async save may take to commit on every host (Orbax's default is 1200);
  # a slower save stops the run with the last good checkpoint intact. The full state
  # (float32 params + AdamW moments, about 84 GB) to remote storage gets an hour.
  config.checkpoint_timeout_s = 3600
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
      num_workers="auto",  # grain.experimental.pick_performance_config (data/storage.py)
      num_threads=16,
      prefetch_buffer_size=256,
      annotations={},
      video_root="",
      build_sample_mode="middle",
      build_threads=16,
      max_failure_share=0.05,
      # Share of train records in the tracks layout (UTR query rows) that make-data
      # reports against; 0 = no target.
      utr_share=0.0,
      # "raw" (frames at the model's shape, sampled once at build), "jpeg" or "source"
      # (sampled afresh at every visit in the workers): data/storage.py
      storage="raw",
      jpeg=dict(quality=90, short_side=256, max_frames=32, fps=0.0),
      source_max_mb=64.0,
      max_read_failure_share=0.01,  # undecodable records skipped at read time, up to this
      ram_budget_mb=0,  # num_workers="auto": 0 = half the host's memory
      mqa_predictions="",  # EPIC-layout annotations: ranked action ids per clip
  ))
  if arg.stage == "pretrain":
    pretrain_stage(config)
  elif arg.stage != "instruct":
    raise ValueError(f"config argument stage must be 'instruct' or 'pretrain', found "
                     f"{arg.stage!r}")
  if arg.recipe and arg.stage == "pretrain":
    raise ValueError(f"recipe={arg.recipe} is an instruction-tuning recipe; it does not "
                     f"combine with stage=pretrain")
  if arg.recipe == "utr":
    _utr_recipe(config)
  elif arg.recipe:
    raise ValueError(f"unknown recipe {arg.recipe!r}; known: utr")
  if arg.haca and (arg.recipe or arg.stage == "pretrain"):
    raise ValueError(f"haca={arg.haca} is a fine-tuning recipe of its own; it does not "
                     f"combine with recipe= or stage=pretrain")
  apply_haca_recipe(config, arg.haca, arg.haca_family, arg.train_examples)
  return config


UTR_STEPS = 5000  # Table 9, stage II training steps
UTR_WARMUP_RATIO = 0.003


def _utr_recipe(config):
  """Video-UTR stage II (UTR paper Table 9): AdamW b2 0.95, eps 1e-8; peak lr 1e-5 for
  the LLM and projector, 2e-6 for the vision tower, which trains (lr multiplier 0.2);
  cosine to 0 after a warmup of 0.003 of the steps; weight decay 0.05; clip 1.0; global
  batch 256 as 4 accumulated microbatches of 64; 5k steps.

  Task mix (Table 8, stage II): UTR-Data (HowTo100M 50K + MeViS 90K + LaMOT 225K = 365K
  tracks records) beside 890K ordinary rows (VideoChat2 100K + LLaVA-NeXT-SFT 790K): 365 /
  1255 = 29% of the samples. List the tracks files beside the ordinary ones in
  data.annotations["train"]; make-data reports the share it built against utr_share.
  Crop and flip stay off: they would move the boxes the UTR answers hold."""
  config.total_steps = UTR_STEPS
  config.grad_accum_steps = 4
  config.data.batch_size = 256
  config.model.freeze_vision = False
  config.optim.update(dict(
      lr=1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=1.0,
      warmup_steps=round(UTR_WARMUP_RATIO * UTR_STEPS), final_lr_ratio=0.0,
      lr_multipliers={"^vision_tower/": 0.2}))  # 2e-6 / 1e-5
  config.data.utr_share = round(365 / 1255, 2)
  config.data.augment.random_resized_crop = False
  config.data.augment.flip = False


def pretrain_stage(config) -> None:
  """Stage 1, in place: train the projector only (the language model frozen beside the
  vision tower) on captions (data.annotations = {"train": "webvid.csv"}, captions.py),
  LLaVA-style: lr 1e-3, global batch 256, short text, JPEG storage sampled per visit."""
  config.text_len = 128
  config.total_steps = 5000
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 150
  config.optim.freeze = ["^language_model/"]  # + ^vision_tower/ (model.freeze_vision)
  config.data.batch_size = 256
  config.data.storage = "jpeg"
  config.data.template.system = ""



# The paper's two LoRA settings: name -> (rank, alpha, learning rate).
HACA_LORA = {"lora16": (16, 32.0, 2e-5), "lora128": (128, 256.0, 2e-4)}
HACA_EPOCHS = 3


def apply_haca_recipe(config, haca: str, family: str, train_examples: int) -> None:
  """haca "" leaves the config as it is; else LoRA on the decoder's projections
  (model.lora: rank, alpha, targets, dropout), the setting's learning rate, the vision
  tower frozen, data.train_tasks = (family,) and, with train_examples, 3 epochs of steps."""
  if not haca:
    return
  if haca not in HACA_LORA:
    raise ValueError(f"config argument haca must be one of {sorted(HACA_LORA)}, found "
                     f"{haca!r}")
  if family not in ("entailment", "haca", "haca_mask"):
    raise ValueError(f"config argument haca_family must be entailment, haca or haca_mask, "
                     f"found {family!r}")
  rank, alpha, lr = HACA_LORA[haca]
  config.model.lora = dict(rank=rank, alpha=alpha,
                           targets=r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                           dropout=0.05)
  config.model.freeze_vision = True
  config.optim.lr = lr
  config.optim.weight_decay = 0.0
  config.data.train_tasks = (family,)
  if train_examples:
    config.total_steps = -(-HACA_EPOCHS * train_examples // config.data.batch_size)
