"""`mashvlm compile`: slice names, the fits decision and exit status, mesh checks, training
defaults, the analytic FLOPs against a count of the traced program, and (with libtpu) an
ahead-of-time compile of the tiny config's train step for a v5p-8 slice."""
import functools
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT, load_config, require
from mashvlm_jax import layout
from mashvlm_jax.model import attention, mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.model.llm import LlamaDecoder
from mashvlm_jax.train import compile_check, defaults, flops

GIB = 2 ** 30


# ------------------------------------------------------------------ slice names


@pytest.mark.parametrize("name, chips, topology, config, hbm_gib", [
    ("v5p-64", 32, "v5p:2x4x4", "megacore", 95),
    ("v5p-8", 4, "v5p:2x2x1", "megacore", 95),
    ("v5p-16", 8, "v5p:2x2x2", "megacore", 95),
    ("v5p-128", 64, "v5p:4x4x4", "megacore", 95),
    ("v5p-1024", 512, "v5p:8x8x8", "megacore", 95),
    ("v4-32", 16, "v4:2x2x4", "megacore", 32),
    ("v4-512", 256, "v4:4x8x8", "megacore", 32),
    ("v5e-256", 256, "v5e:16x16", "default", 16),
    ("v5litepod-8", 8, "v5e:2x4", "default", 16),
    ("v6e-64", 64, "v6e:8x8", "default", 32),
    ("v6e-1", 1, "v6e:1x1", "default", 32),
    ("V6E-32", 32, "v6e:4x8", "default", 32),
    ("v5p:2x4x4", 32, "v5p:2x4x4", "megacore", 95),
    ("v5p:16x16x24", 6144, "v5p:16x16x24", "megacore", 95),
])
def test_parse_topology_follows_cloud_naming(name, chips, topology, config, hbm_gib):
  tpu = compile_check.parse_topology(name)
  assert tpu.chips == chips
  assert tpu.topology_name == topology
  assert tpu.generation.chip_config == config
  assert tpu.hbm_bytes == hbm_gib * GIB


def test_accelerator_type_and_host_bounds():
  assert compile_check.parse_topology("v5p:2x4x4").accelerator_type == "v5p-64"
  assert compile_check.parse_topology("v5e:16x16").accelerator_type == "v5e-256"
  assert compile_check.parse_topology("v5p-64").chips_per_host_bounds == (2, 2, 1)
  assert compile_check.parse_topology("v6e-8").chips_per_host_bounds == (2, 4, 1)
  assert compile_check.parse_topology("v6e-64").chips_per_host_bounds == (2, 2, 1)
  assert compile_check.parse_topology("v5e-1").chips_per_host_bounds == (1, 1, 1)


@pytest.mark.parametrize("name, why", [
    ("v5p-7", "N must be even"),
    ("v5p-12", "6 chips is not a standard v5p slice"),
    ("v5p-4", "2 chips is not a standard v5p slice"),
    ("v6e-512", "512 chips is not a standard v6e slice"),
    ("v5e-2", "2 chips is not a standard v5e slice"),
    ("v3-8", "unknown TPU generation 'v3'"),
    ("v5p:2x2", "3D tori"),
    ("v6e:2x2x1", "2D tori"),
    ("tpu", "not of the form"),
    ("v5p-", "not of the form"),
])
def test_bad_topology_names_list_the_accepted_forms(name, why):
  with pytest.raises(ValueError) as err:
    compile_check.parse_topology(name)
  message = str(err.value)
  assert why in message and "Accepted forms" in message
  for form in ("v4-N / v5p-N", "v5e-N / v5litepod-N / v6e-N", "<gen>:AxBxC"):
    assert form in message


def test_parse_mesh():
  assert compile_check.parse_mesh("data=1, fsdp=-1,tensor=4") == dict(data=1, fsdp=-1,
                                                                      tensor=4)
  with pytest.raises(ValueError, match="not axis=size"):
    compile_check.parse_mesh("fsdp:4")


# ------------------------------------------------------------------ fits and exit status


@functools.lru_cache(maxsize=None)
def cpu_memory_stats():
  """jax's CompiledMemoryStats of a real CPU compile from abstract inputs (nothing is
  allocated): a step that takes a donated 19 GiB float32 state and a 1 GiB batch and
  returns the new state and a scalar."""
  def step(state, batch):
    update = jnp.sin(batch) * 2
    return state + update.sum(), update.max()
  state = jax.ShapeDtypeStruct((19 * GIB // 4,), jnp.float32)
  batch = jax.ShapeDtypeStruct((GIB // 4,), jnp.float32)
  return jax.jit(step, donate_argnums=(0,)).lower(state, batch).compile().memory_analysis()


def compiled_report(hbm_bytes=None, topology="v5p-64"):
  """A report over the real memory statistics above, against ``hbm_bytes`` (default: the
  slice's HBM per chip)."""
  tpu = compile_check.parse_topology(topology)
  memory = compile_check.Memory.from_stats(
      cpu_memory_stats(), tpu.hbm_bytes if hbm_bytes is None else hbm_bytes)
  return compile_check.Report(
      tpu=tpu, mesh=dict(data=1, fsdp=tpu.chips, tensor=1), batch_size=128, text_len=512,
      seq_len=815, attention_backend="splash", params=7_000_000_000,
      flops_per_step=4.6e15, peak_flops_per_chip=459e12, memory=memory)


def test_memory_total_and_fits_decision():
  memory = compiled_report().memory
  assert memory.arguments == 20 * GIB  # state + batch, from their shapes
  assert memory.aliased == 19 * GIB  # the donated state's buffer holds the new state
  assert 19 * GIB < memory.outputs <= 19 * GIB + 64  # new state, a scalar, XLA's tuple
  stats = cpu_memory_stats()
  assert (memory.temporaries, memory.generated_code) == (stats.temp_size_in_bytes,
                                                          stats.generated_code_size_in_bytes)
  total = (memory.arguments + memory.outputs - memory.aliased + memory.temporaries
           + memory.generated_code)
  assert memory.total == total
  fits = compiled_report(hbm_bytes=total)  # exactly full still fits
  assert fits.fits and compile_check.exit_code(fits) == 0
  over = compiled_report(hbm_bytes=total - 1)
  assert not over.fits and compile_check.exit_code(over) == 1
  text = compile_check.format_report(over)
  assert "fits:    NO" in text
  assert f"{total / GIB:8.2f} GiB  of {(total - 1) / GIB:.2f} GiB HBM" in text


def test_refused_by_xla_does_not_fit():
  report = compiled_report()
  report.memory, report.error = None, "RESOURCE_EXHAUSTED: Ran out of memory on HBM"
  assert not report.fits and compile_check.exit_code(report) == 1
  assert "XLA: RESOURCE_EXHAUSTED" in compile_check.format_report(report)
  assert compile_check.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory"))
  assert not compile_check.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: bad shape"))


def test_step_time_from_flops_and_mfu():
  report = compiled_report()  # 4.6 PFLOP on 32 chips x 459 TFLOP/s at 40%
  expected = 4.6e15 / (32 * 459e12 * 0.4)
  assert report.step_seconds(0.4) == pytest.approx(expected)
  assert f"{expected:.4g} s per step at 40% MFU" in compile_check.format_report(report, 0.4)


@pytest.mark.parametrize("spare_bytes, code", [(0, 0), (-1, 1)])
def test_run_exit_status_and_json(monkeypatch, tmp_path, spare_bytes, code):
  hbm = compiled_report().memory.total + spare_bytes
  monkeypatch.setattr(compile_check, "check", lambda *a, **k: compiled_report(hbm))
  lines, errors = [], []
  out = tmp_path / "report.json"
  status = compile_check.run(load_config("tiny_synthetic"), "v5p-64", json_path=str(out),
                             echo=lines.append, echo_error=errors.append)
  assert status == code and not errors
  saved = json.loads(out.read_text())
  assert saved["fits"] == (code == 0) and saved["chips"] == 32
  assert saved["memory"]["total"] == hbm - spare_bytes
  assert any("does not fit" in line for line in lines) == bool(code)


def test_run_bad_arguments_exit_2():
  errors = []
  config = load_config("tiny_synthetic")
  assert compile_check.run(config, "v9-8", echo=print, echo_error=errors.append) == 2
  assert "unknown TPU generation" in errors[-1]
  assert compile_check.run(config, "v5p-8", mesh_text="fsdp=3", echo=print,
                           echo_error=errors.append) == 2
  assert "needs 3 devices but 4" in errors[-1]


# ------------------------------------------------------------------ mesh and config checks


def test_mesh_size_differs_from_chip_count_fails_before_compiling(monkeypatch):
  def no_libtpu(_):
    raise AssertionError("the mesh must be checked before libtpu is asked for devices")
  monkeypatch.setattr(compile_check, "topology_devices", no_libtpu)
  config = load_config("tiny_synthetic")
  with pytest.raises(ValueError, match=r"does not fit v5p-64 \(v5p:2x4x4, 32 chips\).*"
                                       r"needs 16 devices but 32"):
    compile_check.check(config, "v5p-64", mesh=dict(fsdp=16))
  with pytest.raises(ValueError, match="does not divide the 32"):
    compile_check.check(config, "v5p-64", mesh=dict(fsdp=-1, tensor=3))


def test_missing_libtpu_names_the_install(monkeypatch):
  from jax.experimental import topologies

  def missing(*args, **kwargs):
    raise RuntimeError("Unable to initialize backend 'tpu'")
  monkeypatch.setattr(topologies, "get_topology_desc", missing)
  monkeypatch.setattr(compile_check, "libtpu_installed", lambda: False)
  with pytest.raises(compile_check.TopologyError, match=r"pip install -e '\.\[tpu\]'"):
    compile_check.topology_devices(compile_check.parse_topology("v5p-8"))
  monkeypatch.setattr(compile_check, "libtpu_installed", lambda: True)
  with pytest.raises(compile_check.TopologyError, match="libtpu rejects this shape"):
    compile_check.topology_devices(compile_check.parse_topology("v5p-8"))


def model_only_config():
  """The tiny config without its training keys (as a config written for `mashvlm info`)."""
  config = load_config("tiny_synthetic")
  for key in ("optim", "mesh", "total_steps", "checkpoint_every", "log_every",
              "grad_accum_steps", "nan_policy"):
    if key in config:
      del config[key]
  del config.data["batch_size"]
  config.lock()
  return config


def test_training_defaults_fill_only_missing_keys():
  config = model_only_config()
  filled = defaults.training_defaults(config)
  assert "optim" not in config and "batch_size" not in config.data  # input unchanged
  assert dict(filled.mesh) == dict(data=1, fsdp=-1, tensor=1)
  assert filled.optim.lr == 2e-5 and filled.optim.clip_norm == 1.0
  assert filled.optim.freeze == [] and filled.optim.no_decay == "(norm|bias)"
  assert filled.optim.weight_decay == 0.0 and filled.optim.warmup_steps == 100
  assert filled.nan_policy == "stop" and filled.grad_accum_steps == 1
  assert filled.data.batch_size == defaults.BATCH_SIZE
  assert filled.data.name == config.data.name  # existing data keys kept
  filled.text_len = 40  # data.text_len still follows the top-level text_len
  assert filled.data.text_len == 40
  for name in ("tiny_synthetic", "mashvlm_7b"):  # every training key explicit: no change
    full = load_config(name)
    assert defaults.training_defaults(full).to_dict() == full.to_dict()
  partial = load_config("mashvlm_7b")
  del partial["data"], partial["optim"], partial["text_len"]
  partial.optim = dict(lr=1e-4)
  partial = defaults.training_defaults(partial)
  assert partial.data.batch_size == defaults.BATCH_SIZE and partial.data.text_len == 512
  assert partial.optim.lr == 1e-4 and partial.optim.b2 == 0.95  # partial optim completed


def test_7b_config_training_keys():
  config = load_config("mashvlm_7b")
  assert config.data.batch_size == 128 and config.data.text_len == 512
  assert dict(config.mesh) == dict(data=1, fsdp=-1, tensor=1)
  assert config.model.remat_policy == "full"
  assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
  assert config.optim.lr == 2e-5
  prepared = compile_check.prepare_config(config)
  assert prepared.model.attention_backend == "splash"
  assert config.model.attention_backend == "auto"  # the config itself is not changed
  kept = compile_check.prepare_config(config, attention_backend=None, mesh=dict(fsdp=8))
  assert kept.model.attention_backend == "auto" and dict(kept.mesh) == dict(fsdp=8)


# ------------------------------------------------------------------ analytic FLOPs


def matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general / conv in a jaxpr, sub-jaxprs included (scan
  bodies times their length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape  # flax: HWIO
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
      per_output = math.prod(kernel[d] for d in spec[1:])
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += times * matmul_flops(inner)
  return total


def tiny_model_and_inputs(text_len=32, **llm):
  config = load_config("tiny_synthetic")
  config.model.llm.update(llm)
  cfg = ModelConfig.from_dict(config.model)
  params = nn.unbox(mashvlm.abstract_params(cfg))
  frames, text = mashvlm.dummy_inputs(cfg, batch=1, text_len=text_len)
  return cfg, params, frames, text


def test_forward_flops_match_the_traced_matmuls():
  cfg, params, frames, text = tiny_model_and_inputs()
  model = mashvlm.MashVLM(cfg)
  traced = matmul_flops(jax.make_jaxpr(
      lambda p: model.apply({"params": p}, frames, text))(params).jaxpr)
  analytic = (cfg.num_frames * flops.vision_flops_per_frame(cfg)
              + flops.projector_flops_per_row(cfg) + flops.llm_flops_per_row(cfg, 32))
  assert traced == pytest.approx(analytic, rel=1e-6)


def test_llm_flops_match_xla_cost_analysis():
  # One layer: XLA's cost analysis counts a while-loop body (the layer scan) once.
  cfg, params, _, _ = tiny_model_and_inputs(num_layers=1)
  m, n = cfg.video_token_counts
  types = layout.text_token_types(jnp.ones((1, 32), bool), m, n)
  ids = layout.position_ids(types, cfg.rope_mode)
  mask = attention.attention_mask(types, mashvlm.attention_spec(cfg, m, n), "dense")
  embeds = jnp.zeros((1, m + n + 32, cfg.llm.hidden_size))

  def llm(p):
    decoder = LlamaDecoder(cfg.llm)
    hidden = decoder.apply({"params": p}, embeds, ids, mask)
    return decoder.apply({"params": p}, hidden[:, -32:], method="logits")
  cost = jax.jit(llm).lower(params["language_model"]).cost_analysis()
  counted = cost["flops"] if isinstance(cost, dict) else cost[0]["flops"]
  analytic = flops.llm_flops_per_row(cfg, 32)
  # XLA also counts softmax, norms and rotary arithmetic: a few percent on top.
  assert analytic <= counted <= 1.05 * analytic


def test_train_flops_match_the_traced_gradient():
  cfg, params, frames, text = tiny_model_and_inputs()
  model = mashvlm.MashVLM(cfg)

  def loss(p):
    return model.apply({"params": p}, frames, text).sum()
  traced = matmul_flops(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
  analytic = flops.train_flops_per_row(cfg, 32)
  # The projector's first layer needs no input gradient (the vision tower is frozen):
  # the 3x rule overcounts by that one matmul.
  proj_input_grad = 2 * cfg.num_frames * (cfg.vision.grid ** 2 + 1) * (
      cfg.vision.hidden_size * cfg.llm.hidden_size)
  assert traced == pytest.approx(analytic - proj_input_grad, rel=1e-6)


# ------------------------------------------------------------------ AOT compile with libtpu


def run_cli(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTEST_CURRENT_TEST", None)
  return subprocess.run([sys.executable, "-m", "mashvlm_jax.cli", "compile", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_bad_topology_without_compiling():
  out = run_cli("--config=configs/tiny_synthetic.py", "--topology=v5p-6", timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "3 chips is not a standard v5p slice" in out.stderr
  assert "Accepted forms" in out.stderr


def test_compile_tiny_for_v5p_8(tmp_path):
  """`mashvlm compile` of the tiny config's train step for a v5p-8 slice (about 15 s on 2
  cores). Needs libtpu: a failure under CI, a skip elsewhere."""
  require("libtpu")
  out = run_cli("--config=configs/tiny_synthetic.py", "--topology=v5p:2x2x1", "--mesh=fsdp=-1",
                "--config.data.batch_size=8", f"--json={tmp_path / 'r.json'}")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["topology"] == "v5p-8" and report["chips"] == 4
  assert report["mesh"] == dict(data=1, fsdp=4, tensor=1)
  assert report["attention_backend"] == "splash"
  assert report["tpu_kernels"] > 0  # splash lowered as Mosaic TPU kernels, not interpreted
  memory = report["memory"]
  assert report["fits"] and 0 < memory["total"] < report["hbm_bytes"]
  assert memory["arguments"] > 0 and memory["temporaries"] > 0
  assert memory["aliased"] > 0  # the donated train state is reused for the new state
  assert "fits:    yes" in out.stdout and "WARNING" not in out.stderr
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic").model)
  assert report["tflops_per_step"] == pytest.approx(
      8 * flops.train_flops_per_row(cfg, 32) / 1e12)
