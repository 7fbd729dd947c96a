"""Tiny MASH-VLM that trains on 2 CPU cores: 8 frames of 64x64, patch 8 (M=23, N=64).

Variants: --config=configs/tiny_synthetic.py:ablation=t7_distinct (names in
mashvlm_jax/config_lib.py ABLATIONS), dtype=bfloat16.

HACA fine-tuning (data/tasks/haca.py): recipe=entailment|haca|haca_mask adds that family's
rows to every training clip (data.train_tasks) and widens the text to hold a caption in
both the question and the correction (text_len 48). Start it from a stage-1 run with
--config.init_from=<workdir> and evaluate with `mashvlm eval --benchmark=entailment` and
`--benchmark=retrieval`.
"""
import os

import ml_collections

from mashvlm_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, ablation="mash", dtype="float32", recipe="")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.text_len = 32  # padded chat-text length per row

  config.model = ml_collections.ConfigDict(dict(
      vision=dict(image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=128, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                  # A random tower: its patch embeddings (before any random layer,
                  # feature_layer=0) with sin-cos positions keep the actor and where it
                  # is legible; after a random layer the model never read the motion.
                  feature_layer=0, position_init="sincos2d"),
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
      attention_backend="auto",  # splash on TPU, gpu on GPUs, dense on CPU
      scan_layers=False,  # 4 + 2 layers: unrolled is faster and compiles fast
      # LLaVAction's action token and verb/noun/action heads (model/action_token.py);
      # synthetic classes: verb = action (8), noun = scene (8), action = the pair (64).
      action_token=dict(enabled=False, num_verbs=8, num_nouns=8, num_actions=64,
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

  # Input data (mashvlm_jax/data/; `mashvlm make-data --config=...` builds it). The
  # synthetic set is stored at the model's frame count and resolution; its word-level
  # tokenizer (under 256 tokens) is stored with it and fits in vocab_size=512 (kept: a
  # multiple of 64).
  config.data = ml_collections.ConfigDict(dict(
      name="synthetic_unscene",  # | "local_video_qa" (annotations + video_root below)
      builder_config="default",  # synthetic sizes: tiny | default | large
      train_size=0,  # clips in train / in each test split; 0 = the preset's
      test_size=0,
      data_dir=os.environ.get("MASHVLM_DATA_DIR", "./data_cache"),
      stored_frames=0,  # frames/size written at build time; 0 = the model's
      stored_size=0,
      typical_prob=0.9,  # train: share of clips with the action's typical scene
      scene_only_share=0.05,  # train: share of clips without an actor
      # train: labels of the Yes/No "No" questions: "uniform" (any other label) | "typical"
      # (the hallucination candidates, as the UNSCENE test duals: teaches "No to the
      # scene's typical action", a rule that needs no motion; data/tasks/train_mix.py)
      train_negatives="uniform",
      # train: extra task families added to every clip's rows (data/tasks/families.py),
      # e.g. ("utr",); their rows join the one-row-per-visit draw. UTR families
      # ("utr", "utr_notask") need text_len >= 64 and augment crop/flip off
      # (docs/design.md, UTR trajectory queries)
      train_tasks=(),
      seed=0,  # data generation seed (the shuffle seed is config.seed)
      train_split="train",
      eval_splits=("test_typical", "test_unusual", "test_scene_only"),
      batch_size=16,  # global; each process yields batch_size / process_count rows
      text_len=config.get_ref("text_len"),
      # e.g. (16, 32): each batch padded to the smallest of these that holds its rows,
      # one compile per length (data/buckets.py); () = every batch at text_len
      text_buckets=(),
      # UTR: train on the QA rows a `mashvlm tpl` pass kept (data/row_filter.py); "" = all
      row_filter=dict(path="", rule="top", fraction=1 / 3, threshold=0.0, per_task=False),
      qa_mode="sample",  # one random QA turn per visit | "all": the whole record as chat
      sample_mode="rand",  # temporal resampling when stored frames != model frames
      augment=dict(random_resized_crop=True, crop_scale=(0.8, 1.0),
                   crop_ratio=(0.75, 1.3333), flip=False),  # train split only
      tokenizer=dict(kind="word", path="", bos="<s>", eos="</s>"),  # path: hf/sentencepiece
      template=dict(system="", user="USER:", assistant="ASSISTANT:"),
      num_workers=0,  # Grain worker processes (0: in the main process)
      num_threads=2,  # reader threads per process
      prefetch_buffer_size=64,
      # Users' data (name="local_video_qa"): split -> JSON file or directory, or a list
      # of {"path", "video_root"}; decoded with `build_sample_mode` at build time.
      annotations={},
      video_root="",
      build_sample_mode="middle",
      build_threads=4,
      max_failure_share=0.05,  # a build fails when more records than this are unusable
      # users' data: "raw" frames sampled once at build, or "jpeg" / "source" sampled at
      # every visit in the workers (data/storage.py; docs/design.md, storage formats)
      storage="raw",
      jpeg=dict(quality=90, short_side=0, max_frames=32, fps=0.0),
      source_max_mb=64.0,
      max_read_failure_share=0.01,  # jpeg/source: undecodable records skipped up to this
      ram_budget_mb=0,  # num_workers="auto": 0 = half the host's memory
      # EPIC-layout annotations: JSON lines {"id", "ranked": action ids, best first} giving
      # each clip's multiple-choice options (data/annotations.py epic_items)
      mqa_predictions="",
  ))

  apply_haca_recipe(config, arg.recipe)

  # Training (mashvlm train): the testbed's motion regime (docs/methods.md, "The chosen
  # regime"): with uniform negatives and 9000 steps the model reads motion when the scene
  # gives no shortcut, so what it does at typical_prob 0.9 is the bias, not an inability.
  # 45 minutes on 2 busy CPU cores (README); total_steps=1500 with train_negatives=typical (the
  # `shortcut` regime) is the 4-minute job of the README until 2026-12-01.
  config.total_steps = 9000
  config.checkpoint_every = 500
  config.log_every = 50
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.checkpoint_timeout_s = 1200  # an async save not committed in this time fails
  config.init_from = ""  # an `mashvlm import-hf` output directory
  config.grad_accum_steps = 1
  config.nan_policy = "stop"  # "stop": raise, last good checkpoint intact | "skip"
  config.log_batch_fingerprints = False  # batches.jsonl: a hash of every step's batch
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.optim = ml_collections.ConfigDict(dict(
      lr=2e-3, warmup_steps=100, final_lr_ratio=0.05, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.01, clip_norm=1.0,
      freeze=[],  # regexes over "/"-joined param paths; model.freeze_vision adds the tower
      lr_multipliers={},  # {regex: factor}
      no_decay=r"(norm|bias)"))
  return config


HACA_RECIPES = ("entailment", "haca", "haca_mask")


def apply_haca_recipe(config, recipe: str) -> None:
  """recipe "" leaves the config as it is; else data.train_tasks = (recipe,) and text_len 48
  (the longest HACA row, a correction of the longest caption, is 43 word tokens)."""
  if not recipe:
    return
  if recipe not in HACA_RECIPES:
    raise ValueError(f"config argument recipe must be one of {HACA_RECIPES}, found {recipe!r}")
  config.data.train_tasks = (recipe,)
  config.text_len = 48
