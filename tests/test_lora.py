"""LoRA on the decoder: a fresh adapter leaves the logits bitwise unchanged; adapters equal
a dense numpy reference W + (alpha / r) B A; KV-cache decoding uses them; a LoRA training
step from a run without adapters moves only the adapters (and the projector) and keeps
optimizer state for them only; the merged export and the PEFT adapter export give our
logits in PyTorch."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import ROOT, load_config, require
from mashvlm_jax.convert import param_map, params_io
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import LlamaConfig, LoraConfig, ModelConfig
from mashvlm_jax.model.llm import LlamaDecoder

LLM = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=45, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=500.0)
# kernel of each projection in the flax layout, and its adapter's A and B, per layer:
# einsum contracting A B over the rank (written here independently of model/llm.py)
MERGE = {"q_proj": "dr,rhk->dhk", "k_proj": "dr,rhk->dhk", "v_proj": "dr,rhk->dhk",
         "o_proj": "hkr,rd->hkd", "gate_proj": "dr,rm->dm", "up_proj": "dr,rm->dm",
         "down_proj": "mr,rd->md"}
PART = {name: "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
        for name in MERGE}


def text_batch(vocab, width=9):
  ids = np.random.default_rng(0).integers(0, vocab, (2, width)).astype(np.int32)
  mask = np.ones((2, width), bool)
  mask[1, 6:] = False
  return ids, mask


def with_random_b(params, scale=0.3, seed=0):
  """The tree with every ``lora_b`` drawn at random (a trained adapter), the rest as is."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (scale * rng.normal(size=x.shape)).astype(np.float32)
      if "lora_b" in jax.tree_util.keystr(p) else np.asarray(x), params)


def decoder_params(lora: LoraConfig, scan: bool = True):
  decoder = LlamaDecoder(LLM, lora=lora, scan_layers=scan)
  params = jax.jit(lambda key: decoder.init(key, jnp.zeros((1, 4), jnp.int32),
                                            method=LlamaDecoder.causal_lm)["params"])(
                                                jax.random.PRNGKey(0))
  return decoder, params


def causal_logits(decoder, params, ids, mask):
  return np.asarray(jax.jit(lambda p: decoder.apply(
      {"params": p}, ids, mask, method=LlamaDecoder.causal_lm))(params))


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize("lora,message", [
    (dict(rank=-1), "lora.rank must be an integer >= 0"),
    (dict(rank=4, targets="q_proj|(v"), r"lora.targets='q_proj\|\(v' is not a valid regex"),
    (dict(rank=4, targets="qkv"), "matches none of the decoder's projections"),
    (dict(rank=4, targets="proj"), "matches none"),  # matched in full, not searched
    (dict(rank=4, alpha=0), "lora.alpha must be a positive number"),
    (dict(rank=4, dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
    (dict(rank=4, beta=1), r"unknown config key\(s\) model.lora.beta"),
])
def test_bad_lora_config_is_named(lora, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig.from_dict(dict(lora=lora))


def test_lora_config_defaults_and_overrides():
  config = load_config("mashvlm_7b")
  cfg = ModelConfig.from_dict(config.model)
  assert cfg.lora == LoraConfig() and not cfg.lora.enabled  # off by default
  assert cfg.lora.targeted() == tuple(MERGE)
  config.model.lora.rank = 16  # what --config.model.lora.rank=16 sets
  cfg = ModelConfig.from_dict(config.model)
  assert cfg.lora.scale == 2.0 and hash(cfg)  # static: a hashable module field
  # a model config stored before LoRA existed reads as LoRA off
  stored = cfg.to_dict()
  del stored["lora"]
  assert ModelConfig.from_dict(stored).lora == LoraConfig()
  lora = LoraConfig(rank=2, targets="(q|v)_proj|down_proj")
  assert lora.targeted() == ("q_proj", "v_proj", "down_proj")


# ------------------------------------------------------------------------ model


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapter_leaves_logits_bitwise_unchanged(scan):
  """B starts at zero: the MASH-VLM logits with fresh adapters are the base model's, bit
  for bit, with the layer stack scanned and unrolled."""
  small = dict(num_frames=4, scan_layers=scan,
               vision=dict(image_size=32, patch_size=8, hidden_size=16, num_layers=1,
                           num_heads=2, intermediate_size=24),
               llm=dict(vocab_size=40, hidden_size=24, intermediate_size=30, num_layers=2,
                        num_heads=4, num_kv_heads=2))
  cfg = ModelConfig.from_dict(dict(small, lora=dict(rank=4, alpha=8.0)))
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  base, adapters = param_map.split_lora(params["language_model"])
  assert sorted(adapters["layers"]["self_attn"]) == ["k_proj_lora", "o_proj_lora",
                                                     "q_proj_lora", "v_proj_lora"]
  for leaf_path, leaf in param_map.leaves(adapters).items():
    assert leaf.shape[0] == 2 and (leaf_path[-1] == "lora_a") == bool(np.any(leaf)), leaf_path
  base_cfg = dataclasses.replace(cfg, lora=LoraConfig())
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (2, 4, 32, 32, 3), dtype=np.uint8)
  ids, mask = text_batch(40, 7)
  got = jax.jit(mashvlm.MashVLM(cfg).apply)({"params": params}, frames, ids, mask)
  want = jax.jit(mashvlm.MashVLM(base_cfg).apply)(
      {"params": dict(params, language_model=base)}, frames, ids, mask)
  assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_adapter_a_is_initialised_as_peft_does():
  """PEFT: kaiming_uniform_(a=sqrt(5)) on torch's lora_A [rank, in], i.e. uniform on
  +-1/sqrt(in) with ``in`` the projection's input width (H * d for o_proj); B zeros."""
  torch = require("torch")
  _, params = decoder_params(LoraConfig(rank=8))
  layers = nn.unbox(params)["layers"]
  fan_in = dict(q_proj=32, k_proj=32, v_proj=32, o_proj=32, gate_proj=32, up_proj=32,
                down_proj=45)
  for name, width in fan_in.items():
    a = np.asarray(layers[PART[name]][f"{name}_lora"]["lora_a"])
    want = torch.empty(8, width)
    torch.nn.init.kaiming_uniform_(want, a=math.sqrt(5))
    bound = float(torch.nn.init._calculate_fan_in_and_fan_out(want)[0]) ** -0.5
    assert np.abs(a).max() <= bound and want.abs().max() <= bound
    assert np.abs(a).max() > 0.8 * bound, name
    assert not np.any(np.asarray(layers[PART[name]][f"{name}_lora"]["lora_b"]))


@pytest.mark.parametrize("scan", [True, False])
def test_adapters_equal_dense_reference(scan):
  """Trained adapters (random B) on some projections: the decoder's logits equal plain
  numpy LLaMA (tests/reference.py) run on W + (alpha / r) B A merged in numpy."""
  lora = LoraConfig(rank=3, alpha=5.0, targets="q_proj|v_proj|o_proj|down_proj")
  decoder, params = decoder_params(lora, scan)
  params = with_random_b(nn.unbox(params))
  ids, mask = text_batch(LLM.vocab_size)
  got = causal_logits(decoder, params, ids, mask)
  merged, adapters = param_map.split_lora(params)
  merged = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), merged)
  assert set(adapters["layers"]["self_attn"]) | set(adapters["layers"]["mlp"]) == {
      "q_proj_lora", "v_proj_lora", "o_proj_lora", "down_proj_lora"}
  for name in lora.targeted():
    ad = adapters["layers"][PART[name]][f"{name}_lora"]
    kernel = merged["layers"][PART[name]][name]["kernel"]
    for layer in range(LLM.num_layers):
      kernel[layer] += 5.0 / 3 * np.einsum(MERGE[name], np.float64(ad["lora_a"][layer]),
                                           np.float64(ad["lora_b"][layer]))
  for row in range(2):
    length = int(mask[row].sum())
    embeds = merged["embed_tokens"]["embedding"][ids[row, :length]]
    positions = np.stack([np.arange(length)] * 2)
    _, want = reference.llama(merged, embeds, positions, np.tril(np.ones((length,) * 2, bool)),
                              theta=LLM.rope_theta, eps=LLM.rms_norm_eps, tied=False)
    np.testing.assert_allclose(got[row, :length], want, atol=2e-5, rtol=1e-5)
  base, _ = decoder_params(LoraConfig(), scan)  # the adapters matter here
  assert np.abs(causal_logits(base, param_map.split_lora(params)[0], ids, mask) - got).max() > 1e-2


def test_dropout_runs_only_with_a_dropout_rng():
  lora = LoraConfig(rank=3, alpha=5.0, dropout=0.5)
  decoder, params = decoder_params(lora)
  params = with_random_b(nn.unbox(params))
  ids, mask = text_batch(LLM.vocab_size)
  plain = causal_logits(decoder_params(dataclasses.replace(lora, dropout=0.0))[0], params,
                        ids, mask)
  np.testing.assert_array_equal(causal_logits(decoder, params, ids, mask), plain)
  train = jax.jit(lambda key: decoder.apply({"params": params}, ids, mask,
                                            method=LlamaDecoder.causal_lm,
                                            rngs={"dropout": key}))
  run = lambda seed: np.asarray(train(jax.random.PRNGKey(seed)))
  assert np.abs(run(0) - plain).max() > 1e-3 and np.abs(run(0) - run(1)).max() > 1e-3
  np.testing.assert_array_equal(run(0), run(0))


def test_kv_cache_generation_with_adapters_equals_full_recompute():
  """Greedy decoding with the KV cache (prefill through the scanned stack, steps through
  per-layer weights: llm.decode_unstacked) equals recomputing the grown rows."""
  from test_generate import MAX_NEW, recompute_greedy, tiny
  from mashvlm_jax.eval import generate
  cfg, _, frames, prompts = tiny("mash", "harmonic")
  cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=4, alpha=8.0))
  params = with_random_b(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(1))), 0.5)
  want_tokens, want_logits = recompute_greedy(cfg, params, frames, prompts, MAX_NEW)
  gen = generate.Generator(cfg, params)
  out = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=MAX_NEW),
                     return_logits=True)
  assert out.tokens == want_tokens
  np.testing.assert_allclose(out.step_logits, want_logits, atol=1e-5, rtol=1e-5)
  _, base_logits = recompute_greedy(dataclasses.replace(cfg, lora=LoraConfig()),
                                    dict(params, language_model=param_map.split_lora(
                                        params["language_model"])[0]),
                                    frames, prompts, 1)
  assert np.abs(base_logits[:, 0] - want_logits[:, 0]).max() > 1e-2  # adapters matter


# ------------------------------------------------------------------------ training


def test_lora_fine_tuning_from_a_run_without_adapters(tmp_path, monkeypatch):
  """init_from a run without LoRA into a LoRA config (relative paths): the run starts
  from its weights with fresh adapters; after a step only the adapters and the
  projector moved (B from zero), the optimizer state holds moments for those only; a config without
  the adapters cannot read the LoRA run (model.lora.rank named)."""
  from mashvlm_jax import paths
  from mashvlm_jax.train import trainer
  monkeypatch.chdir(tmp_path)
  config = load_config("tiny_synthetic")
  config.model.llm.num_layers = 2
  config.data.update(builder_config="tiny", data_dir="data", batch_size=4, text_len=24)
  config.update(total_steps=1, checkpoint_every=1, log_every=1, async_checkpointing=False)
  trainer.train(config, "stage1")
  tuned = config.copy_and_resolve_references()
  tuned.model.lora.update(rank=4, alpha=8.0, dropout=0.1)
  tuned.update(init_from="stage1")
  tuned.optim.warmup_steps = 0  # the one step at the full learning rate
  paths.resolve_config_paths(tuned)  # as the CLI does with every --config
  out = trainer.train(tuned, "lora")
  start, _ = params_io.load_params(tmp_path / "stage1")
  after, cfg = params_io.load_params(tmp_path / "lora")
  assert cfg.lora.rank == 4
  moved = set()
  for path, value in param_map.leaves(after).items():
    if any(k.endswith("_lora") for k in path):
      if path[-1] == "lora_b":
        assert np.abs(value).min() > 0, path  # from zero, every entry trained
      moved.add(path[0])
      continue
    if path[0] == "projector":  # trainable: optim.freeze leaves it
      assert not np.array_equal(value, param_map.get_path(start, path)), path
      continue
    np.testing.assert_array_equal(value, param_map.get_path(start, path), err_msg=str(path))
  assert moved == {"language_model"}
  # Adam moments (mu, nu) exist for the adapters and the projector only
  trained = [p for p in param_map.leaves(after)
             if p[0] == "projector" or any(k.endswith("_lora") for k in p)]
  moments = []
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(out["state"].opt_state):
    if getattr(leaf, "ndim", 0):  # scalars are step counts
      names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in key_path]
      assert "projector" in names or any(n.endswith("_lora") for n in names), names
      moments.append(names)
  assert len(moments) == 2 * len(trained)
  with pytest.raises(ValueError, match="model.lora.rank: config 0 vs checkpoint 4"):
    params_io.check_model_config(config, "lora/model_config.json")


def test_lora_gradient_accumulation_equals_full_batch():
  """A LoRA SGD step on 2 microbatches gives the full batch's step (frozen parameters'
  accumulators are scalars there); the frozen weights come out bit for bit."""
  import optax
  from test_train_units import toy_batch, toy_state
  from mashvlm_jax.train import optim, trainer
  config = load_config("tiny_synthetic")
  config.model.num_frames = 4
  config.model.vision.update(image_size=32, num_layers=1)
  config.model.llm.update(num_layers=1, vocab_size=64)
  config.model.lora.update(rank=4, dropout=0.0)
  cfg = ModelConfig.from_dict(config.model)
  params = with_random_b(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  trainable = optim.trainable_mask(params, dict(freeze=["^vision_tower/"]
                                                + optim.lora_freeze(True)))
  tx = optax.sgd(1.0)
  outs = [jax.jit(trainer.make_train_step(mashvlm.MashVLM(cfg), tx,
                                          optax.constant_schedule(1.0), accum=accum,
                                          trainable=trainable))(toy_state(tx, params),
                                                                toy_batch())
          for accum in (1, 2)]
  for path, value in param_map.leaves(outs[1][0].params).items():
    want = param_map.get_path(outs[0][0].params, path)
    np.testing.assert_allclose(value, want, atol=1e-6, rtol=1e-5, err_msg=str(path))
    if not param_map.get_path(trainable, path):
      assert np.asarray(value).tobytes() == np.asarray(
          param_map.get_path(params, path)).tobytes(), path
  a = ("language_model", "layers", "mlp", "down_proj_lora", "lora_a")
  assert np.abs(param_map.get_path(outs[1][0].params, a) - param_map.get_path(params, a)).max() > 1e-5


def test_train_flops_with_lora_match_the_traced_step():
  """The analytic LoRA training FLOPs (train/flops.py) equal the matmuls of the traced
  train step: no weight gradients for the decoder's base weights, the adapters x3."""
  from test_compile import matmul_flops
  from mashvlm_jax.train import flops, trainer
  config = load_config("tiny_synthetic")
  config.model.lora.update(rank=4, targets="q_proj|k_proj|o_proj|up_proj|down_proj")
  config.data.batch_size = 1
  setup = trainer.build(config)
  cfg = setup.model_cfg
  step = trainer.make_train_step(setup.model, setup.tx, setup.schedule, accum=1,
                                 trainable=setup.trainable)
  frames, text = mashvlm.dummy_inputs(cfg, batch=1, text_len=32)
  ones = jnp.ones(text.shape, bool)
  batch = dict(frames=frames, text_ids=text, text_mask=ones, labels=text, label_mask=ones)
  traced = matmul_flops(jax.make_jaxpr(step)(setup.abstract_state, batch).jaxpr)
  # as in tests/test_compile.py: the projector's first layer needs no input gradient
  proj_input_grad = 2 * cfg.num_frames * (cfg.vision.grid ** 2 + 1) * (
      cfg.vision.hidden_size * cfg.llm.hidden_size)
  analytic = flops.train_flops_per_row(cfg, 32)
  assert traced == pytest.approx(analytic - proj_input_grad, rel=1e-6)
  full = flops.train_flops_per_row(dataclasses.replace(cfg, lora=LoraConfig()), 32)
  assert analytic < full  # the frozen weight gradients are not computed


def test_import_hf_refuses_a_lora_config(tmp_path):
  from mashvlm_jax.convert import hf_import
  from mashvlm_jax.convert.param_map import ConversionError
  cfg = ModelConfig.from_dict(dict(lora=dict(rank=8)))
  with pytest.raises(ConversionError, match="model.lora.rank=8: import-hf writes the base"):
    hf_import.import_hf(tmp_path / "llm", tmp_path / "clip", cfg)


# ------------------------------------------------------------------------ export

EXPORT_MODEL = dict(num_frames=4, vision=dict(image_size=32, patch_size=8, hidden_size=32,
                                              num_layers=2, num_heads=4,
                                              intermediate_size=37),
                    llm=dict(vocab_size=97, hidden_size=48, intermediate_size=61,
                             num_layers=2, num_heads=6, num_kv_heads=2, rope_theta=500.0),
                    lora=dict(rank=4, alpha=12.0, targets="q_proj|k_proj|v_proj|o_proj|"
                                                          "up_proj|down_proj"))


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
  """A LoRA checkpoint of random weights (non-zero B) exported both ways; the adapter
  form through the CLI with relative paths."""
  from test_torch_reference import random_params
  from mashvlm_jax.convert import torch_export
  cfg = ModelConfig.from_dict(EXPORT_MODEL)
  params = random_params(cfg)
  root = tmp_path_factory.mktemp("lora_export")
  params_io.save_params(root / "ckpt", params, cfg)
  loaded, _ = params_io.load_params(root / "ckpt")
  torch_export.export_torch(loaded, cfg, root / "merged", max_shard_bytes=20_000)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  run = subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", "export-torch",
                        "--checkpoint=ckpt", "--out=adapter", "--lora=adapter"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return cfg, params, root


def test_merged_and_peft_adapter_exports_give_our_logits(lora_export):
  torch = require("torch")
  transformers = require("transformers")
  peft = require("peft")
  cfg, params, root = lora_export
  ids, mask = text_batch(cfg.llm.vocab_size)
  decoder = LlamaDecoder(cfg.llm, lora=cfg.lora)
  ours = causal_logits(decoder, params["language_model"], ids, mask)

  def hf(model):
    with torch.no_grad():
      return model.eval()(torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits

  load = lambda d: transformers.LlamaForCausalLM.from_pretrained(
      d, attn_implementation="eager", dtype=torch.float32)
  merged = hf(load(root / "merged" / "language_model")).numpy()
  assert np.abs(merged - ours)[mask].max() <= 1e-4
  adapter_dir = root / "adapter" / "language_model_adapter"
  base = load(root / "adapter" / "language_model")
  plain = hf(base).numpy()
  model = peft.PeftModel.from_pretrained(base, adapter_dir)
  assert model.peft_config["default"].r == 4
  with_adapter = hf(model).numpy()
  assert np.abs(with_adapter - ours)[mask].max() <= 1e-4
  assert np.abs(plain - ours)[mask].max() > 1e-2  # the base alone is another model
  names = json.loads((adapter_dir / "adapter_config.json").read_text())["target_modules"]
  assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
  from safetensors import safe_open
  with safe_open(str(adapter_dir / "adapter_model.safetensors"), "np") as f:
    keys = set(f.keys())
  assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
  assert len(keys) == 2 * 6 * cfg.llm.num_layers


def test_both_exports_run_in_the_torch_reference(lora_export):
  """The whole MASH-VLM forward from each export (the adapter folded in by
  torch_reference) equals ours; the records say how the adapter was written."""
  require("torch")
  from test_torch_reference import inputs
  from mashvlm_jax import torch_reference
  cfg, params, root = lora_export
  frames, text, mask = inputs(cfg)
  want = np.asarray(jax.jit(mashvlm.MashVLM(cfg).apply)({"params": params}, frames, text,
                                                        mask))
  for form in ("merged", "adapter"):
    got = torch_reference.load(root / form).logits(frames, text, mask).numpy()
    assert np.abs(got - want)[mask].max() <= 1e-4, form
    record = json.loads((root / form / "mash_config.json").read_text())
    assert record["lora"]["form"] == form.replace("merged", "merge")
    assert record["lora"]["scale"] == 3.0
    assert record["model"]["lora"]["rank"] == (4 if form == "adapter" else 0)


def test_adapter_export_needs_adapters(tmp_path):
  from mashvlm_jax.convert import torch_export
  from mashvlm_jax.convert.param_map import ConversionError
  from test_torch_reference import random_params
  cfg = ModelConfig.from_dict(dict(EXPORT_MODEL, lora=dict(rank=0)))
  with pytest.raises(ConversionError, match="--lora=adapter: the checkpoint has no LoRA"):
    torch_export.export_torch(random_params(cfg), cfg, tmp_path / "out", lora="adapter")
  with pytest.raises(ConversionError, match="--lora must be one of"):
    torch_export.export_torch(random_params(cfg), cfg, tmp_path / "out", lora="fold")
  assert not (tmp_path / "out").exists()
