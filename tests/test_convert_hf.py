"""HuggingFace import/export against tiny random HF torch models made here (the reference):
logits and features parity, round trips through from_pretrained, bad input, the CLI."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, require

torch = require("torch")
transformers = require("transformers")

from mashvlm_jax.convert import hf_import, params_io, param_map, safetensors_io, torch_export
from mashvlm_jax.convert.param_map import ConversionError
from mashvlm_jax.data import tokenizer
from mashvlm_jax.model.config import LlamaConfig, ModelConfig, VisionConfig
from mashvlm_jax.model.llm import LlamaDecoder
from mashvlm_jax.model.vision import ClipVisionEncoder
from mashvlm_jax import torch_reference

LLAMAS = {
    # grouped queries (6 heads over 2 kv heads), untied, odd intermediate size, sharded
    "gqa_untied_odd": dict(vocab_size=101, hidden_size=48, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2),
    # tied embeddings, rope_theta 5e5, head_dim 12 != hidden/heads, 1 kv head, bf16 weights
    "tied_theta_headdim_bf16": dict(vocab_size=64, hidden_size=32, intermediate_size=45,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=1, head_dim=12, rope_theta=5e5,
                                    tie_word_embeddings=True, rms_norm_eps=1e-5),
    # llama3 rope scaling (all three frequency bands at theta 250), attention and MLP biases
    "llama3_biases": dict(vocab_size=80, hidden_size=32, intermediate_size=63,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                          attention_bias=True, mlp_bias=True, max_position_embeddings=1024,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=64),
                          rope_theta=250.0),
    # linear rope scaling, tied
    "linear_tied": dict(vocab_size=50, hidden_size=24, intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        tie_word_embeddings=True, rope_theta=1000.0,
                        rope_scaling=dict(rope_type="linear", factor=2.5)),
}
CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
            image_size=32, patch_size=8)


def _perturb(model, scale=0.1):
  """HF initialises norms to 1/0 and biases to 0: make every tensor distinctive."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model


def make_llama(directory, name, dtype=None, **save_kwargs):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**LLAMAS[name], attn_implementation="eager")
  model = _perturb(transformers.LlamaForCausalLM(cfg)).eval()
  if dtype is not None:  # store in dtype; the reference is that checkpoint read in float32
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
  model.save_pretrained(directory, **save_kwargs)
  return model


def make_clip(directory, full=False, **overrides):
  torch.manual_seed(0)
  vision = dict(CLIP, **overrides)
  if full:  # a whole CLIPModel checkpoint: vision_model.* beside text_model.*
    cfg = transformers.CLIPConfig(vision_config=vision, text_config=dict(
        hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        attn_implementation="eager")
    model = _perturb(transformers.CLIPModel(cfg), 0.05).eval()
    model.save_pretrained(directory)
    return model.vision_model
  model = _perturb(transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**vision, attn_implementation="eager")), 0.05).eval()
  model.save_pretrained(directory)
  return model


def llm_shapes(cfg: LlamaConfig):
  return jax.eval_shape(lambda: LlamaDecoder(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), method=LlamaDecoder.causal_lm))["params"]


def text_batch(vocab):
  ids = np.random.default_rng(0).integers(0, vocab, (2, 9))
  mask = np.ones((2, 9), bool)
  mask[1, 6:] = False  # right padding
  return ids, mask


def hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask).long()).logits.numpy()


def assert_real_close(got, want, mask, atol):
  got, want = np.asarray(got), np.asarray(want)
  assert np.abs(got - want)[mask].max() <= atol, np.abs(got - want)[mask].max()


@pytest.mark.parametrize("name", sorted(LLAMAS))
def test_llama_logits_match_hf(tmp_path, name):
  dtype = torch.bfloat16 if "bf16" in name else None
  save = dict(max_shard_size="20KB") if name == "gqa_untied_odd" else {}
  hf = make_llama(tmp_path, name, dtype, **save)
  assert (tmp_path / "model.safetensors.index.json").exists() == bool(save)
  hf_json, where = hf_import.read_config(tmp_path)
  cfg = LlamaConfig(**hf_import.llama_fields(hf_json, where))
  params = hf_import.load_tower("language_model", safetensors_io.open_checkpoint(tmp_path),
                               llm_shapes(cfg), ignore=(r"lm_head\.weight",))
  ids, mask = text_batch(cfg.vocab_size)
  logits = jax.jit(lambda p: LlamaDecoder(cfg).apply(
      {"params": p}, ids, mask, method=LlamaDecoder.causal_lm))(params)
  assert_real_close(logits, hf_logits(hf, ids, mask), mask, 1e-4)


@pytest.mark.parametrize("full,feature_layer,act", [(False, -2, "quick_gelu"), (True, 1, "gelu")])
def test_clip_features_match_hf(tmp_path, full, feature_layer, act):
  hf = make_clip(tmp_path, full=full, hidden_act=act)
  hf_json, where = hf_import.read_config(tmp_path)
  cfg = VisionConfig(**hf_import.clip_fields(hf_json, where), feature_layer=feature_layer)
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  shapes = jax.eval_shape(lambda: ClipVisionEncoder(cfg).init(jax.random.PRNGKey(0), pixels))
  params = hf_import.load_tower("vision_tower", safetensors_io.open_checkpoint(tmp_path),
                                shapes["params"])
  # features as the model reads them (the layers past feature_layer skipped); pooled=True
  # runs every layer for HF's pooler_output
  out, with_pooler = (jax.jit(ClipVisionEncoder(cfg, pooled=pooled).apply)({"params": params}, pixels)
               for pooled in (False, True))
  with torch.no_grad():
    ref = hf(torch.tensor(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  state = ref.hidden_states[feature_layer].numpy()
  np.testing.assert_allclose(out["cls"], state[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["patches"], state[:, 1:], atol=1e-4, rtol=0)
  np.testing.assert_allclose(with_pooler["pooled"], ref.pooler_output.numpy(), atol=1e-4, rtol=0)


def model_config(**model):
  return ModelConfig.from_dict(dict(dict(num_frames=4, vision=dict(feature_layer=-2)), **model))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  llama = make_llama(root / "llm", "gqa_untied_odd")
  clip = make_clip(root / "clip")
  return root, llama, clip


def test_round_trip_import_export_from_pretrained(hf_dirs, tmp_path):
  """HF -> import -> Orbax -> export (sharded) -> from_pretrained: same tensors and logits."""
  root, llama, clip = hf_dirs
  params, cfg = hf_import.import_hf(root / "llm", root / "clip", model_config(),
                                    adopt_hf_config=True)
  params_io.save_params(tmp_path / "ckpt", params, cfg)
  loaded, cfg2 = params_io.load_params(tmp_path / "ckpt")
  assert cfg2 == cfg
  torch_export.export_torch(loaded, cfg2, tmp_path / "out", max_shard_bytes=30_000)
  out = tmp_path / "out"
  assert (out / "language_model" / "model.safetensors.index.json").exists()
  llama2, info = transformers.LlamaForCausalLM.from_pretrained(
      out / "language_model", output_loading_info=True, attn_implementation="eager")
  assert not any(info.values()), info
  for name, value in llama.state_dict().items():
    assert torch.equal(llama2.state_dict()[name], value), name
  ids, mask = text_batch(cfg.llm.vocab_size)
  want = hf_logits(llama, ids, mask)
  np.testing.assert_array_equal(hf_logits(llama2.eval(), ids, mask), want)
  clip2, info = transformers.CLIPVisionModel.from_pretrained(out / "vision_tower",
                                                             output_loading_info=True)
  assert not any(info.values()), info
  for name, value in clip.state_dict().items():
    assert torch.equal(clip2.state_dict()[name], value), name
  # the package's PyTorch reference, independent of transformers, agrees with HF too
  ref = torch_reference.load(out)
  assert_real_close(ref.text_logits(ids, mask), want, mask, 1e-4)
  mash = json.loads((out / "mash_config.json").read_text())
  assert mash["token_split"]["num_temporal"] == 11 and mash["rope"]["mode"] == "harmonic"
  assert mash["mask"] == cfg.mask.as_kwargs()


def test_bfloat16_export_loads_in_bfloat16(hf_dirs, tmp_path):
  root, llama, _ = hf_dirs
  params, cfg = hf_import.import_hf(root / "llm", root / "clip", model_config(),
                                    adopt_hf_config=True)
  torch_export.export_torch(params, cfg, tmp_path / "out", dtype="bfloat16")
  llama2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out" / "language_model")
  assert llama2.dtype == torch.bfloat16
  for name, value in llama.state_dict().items():
    assert torch.equal(llama2.state_dict()[name], value.to(torch.bfloat16)), name


def test_bfloat16_param_dtype_import(hf_dirs):
  root, llama, _ = hf_dirs
  cfg = model_config(param_dtype="bfloat16")
  params, _ = hf_import.import_hf(root / "llm", root / "clip", cfg, adopt_hf_config=True,
                                  as_jax=True)
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  want = llama.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16)
  got = np.asarray(params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"][1]).T
  assert torch.equal(torch.from_numpy(got.astype(np.float32)).to(torch.bfloat16), want)


def test_strict_config_lists_every_disagreement(hf_dirs, tmp_path):
  root, _, _ = hf_dirs
  with pytest.raises(ConversionError) as err:
    hf_import.import_hf(root / "llm", root / "clip", model_config())
  text = str(err.value)
  assert "model.llm.num_kv_heads: config 32, config.json 2" in text
  assert "model.vision.patch_size: config 14, config.json 8" in text
  assert "--adopt_hf_config" in text


def _write_state(directory, state, config):
  from safetensors.torch import save_file
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(config))
  save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors",
            metadata={"format": "pt"})


def test_bad_checkpoints_are_named(hf_dirs, tmp_path):
  root, llama, _ = hf_dirs
  config = json.loads((root / "llm" / "config.json").read_text())
  state = dict(llama.state_dict())
  cfg = model_config(vision=dict(image_size=32, patch_size=8, hidden_size=32, num_layers=3,
                                 num_heads=4, intermediate_size=37))
  cfg = hf_import.adopt_hf_fields(cfg, hf_import.llama_fields(config, "x"), {})

  def fails(name, mutate_state=None, mutate_config=None):
    s, c = dict(state), dict(config)
    (mutate_state or (lambda s: None))(s)
    (mutate_config or (lambda c: None))(c)
    _write_state(tmp_path / name, s, c)
    with pytest.raises(ConversionError) as err:
      hf_import.import_hf(tmp_path / name, root / "clip", cfg)
    return str(err.value)

  bad = torch.zeros(3, 48)
  text = fails("shape", lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": bad}))
  assert "tensor model.layers.1.self_attn.k_proj.weight in model.safetensors: shape [3, 48]" in text
  assert "implies [16, 48]" in text
  nan = state["model.norm.weight"].clone()
  nan[[1, 5]] = float("nan")
  text = fails("nonfinite", lambda s: s.update({"model.norm.weight": nan}))
  assert "tensor model.norm.weight holds 2 non-finite value(s) (NaN or inf) of 48" in text
  params, _ = hf_import.import_hf(tmp_path / "nonfinite", root / "clip", cfg,
                                  allow_nonfinite=True)  # on request, imported as it is
  assert np.isnan(params["language_model"]["norm"]["scale"]).sum() == 2
  text = fails("missing", lambda s: s.pop("model.norm.weight"))
  assert "missing tensor model.norm.weight (expected shape [48])" in text
  text = fails("extra", lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": bad}))
  assert "not covered by the conversion table" in text and "q_norm" in text
  text = fails("arch", mutate_config=lambda c: c.update(model_type="mistral",
                                                        architectures=["MistralForCausalLM"]))
  assert "model_type 'mistral'" in text and "not covered" in text
  text = fails("act", mutate_config=lambda c: c.update(hidden_act="gelu"))
  assert "hidden_act='gelu' is not supported" in text
  text = fails("rope", mutate_config=lambda c: c.update(
      rope_parameters=None, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
  assert "rope_scaling.rope_type='yarn' is not supported" in text
  with pytest.raises(ConversionError, match="config.json is missing"):
    hf_import.import_hf(tmp_path, root / "clip", cfg)
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match="no weights in .*noweights"):
    hf_import.import_hf(tmp_path / "noweights", root / "clip", cfg)


def test_pickles_refused_unless_allowed(hf_dirs, tmp_path):
  root, llama, _ = hf_dirs
  torch.save(llama.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="pickle.*--allow_pickle"):
    safetensors_io.open_checkpoint(tmp_path)
  hf_json, where = hf_import.read_config(root / "llm")
  shapes = llm_shapes(LlamaConfig(**hf_import.llama_fields(hf_json, where)))
  got = hf_import.load_tower("language_model",
                             safetensors_io.open_checkpoint(tmp_path, allow_pickle=True), shapes)
  want = hf_import.load_tower("language_model", safetensors_io.open_checkpoint(root / "llm"),
                              shapes)
  for path, leaf in param_map.leaves(want).items():
    np.testing.assert_array_equal(param_map.get_path(got, path), leaf)
  # a pickle that would run code is rejected by weights_only=True, and nothing runs
  marker = tmp_path / "pwned"

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  torch.save({"model.norm.weight": Evil()}, tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="refused by torch.load.weights_only=True"):
    safetensors_io.open_checkpoint(tmp_path, allow_pickle=True)
  assert not marker.exists()


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_import_then_export(hf_dirs, tmp_path):
  root, llama, _ = hf_dirs
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  base = ["import-hf", f"--llm={root / 'llm'}", f"--vision={root / 'clip'}",
          "--config=configs/tiny_synthetic.py", f"--out={ckpt}"]
  run = _cli(*base)  # the tiny config does not describe these checkpoints: refused
  assert run.returncode == 1 and "model.llm.vocab_size: config 512" in run.stderr, run.stderr
  assert not ckpt.exists() and not list(tmp_path.iterdir())
  run = _cli(*base, "--adopt_hf_config")
  assert run.returncode == 0, run.stderr
  assert (ckpt / "model_config.json").exists() and "language_model" in run.stdout
  run = _cli("export-torch", f"--checkpoint={ckpt}", f"--out={out}", "--dtype=bfloat16",
             "--shard_size=40KB")
  assert run.returncode == 0, run.stderr
  assert (out / "vision_tower" / "model.safetensors.index.json").exists()
  llama2 = transformers.LlamaForCausalLM.from_pretrained(out / "language_model")
  for name, value in llama.state_dict().items():
    assert torch.equal(llama2.state_dict()[name], value.to(torch.bfloat16)), name


def test_export_ships_the_tokenizer(hf_dirs, tmp_path):
  """The project's word tokenizer (data/tokenizer.py), as the synthetic build stores it (one
  tokenizer.json) and as a LLaMA directory carries it (with tokenizer_config.json naming
  the special tokens): AutoTokenizer on the export gives the project's ids."""
  root, _, _ = hf_dirs
  words = tokenizer.build_word_tokenizer(["USER: is the person skiing? ASSISTANT: yes"])
  tokenizer.save_atomic(words, tmp_path / "data" / "tokenizer.json")
  ours = tokenizer.Tokenizer(str(tmp_path / "data" / "tokenizer.json"), kind="word")
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=words, unk_token=tokenizer.UNK, bos_token=tokenizer.BOS,
      eos_token=tokenizer.EOS, pad_token=tokenizer.PAD).save_pretrained(tmp_path / "llama")
  params, cfg = hf_import.import_hf(root / "llm", root / "clip", model_config(),
                                    adopt_hf_config=True)
  text = "USER: Is the person skiing? ASSISTANT: yes"
  want = ours.encode(text)
  assert len(want) == 10 and ours.unk_id not in want
  for name, source in (("file", tmp_path / "data" / "tokenizer.json"),
                       ("directory", tmp_path / "llama")):
    out = torch_export.export_torch(params, cfg, tmp_path / name, tokenizer=source)
    loaded = transformers.AutoTokenizer.from_pretrained(out / "language_model")
    assert loaded(text, add_special_tokens=False)["input_ids"] == want, name
  assert (loaded.eos_token_id, loaded.pad_token_id) == (ours.eos_id, ours.pad_id)

  # a source without tokenizer files fails before anything is written
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConversionError, match="neither tokenizer.model nor tokenizer.json"):
    torch_export.export_torch(params, cfg, tmp_path / "out2", tokenizer=tmp_path / "empty")
  assert not (tmp_path / "out2").exists()
