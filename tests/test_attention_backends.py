"""Fast attention backends against the dense reference (docs/design.md, "Fast backends must equal
the dense reference"): splash (Pallas, interpret mode on CPU) and the GPU flash
decomposition (XLA implementation on CPU), forward and gradients, for every mask of the
paper's ablations, with text padding; splash under shard_map on an 8-device CPU mesh; the
full tiny MashVLM and the plain-text LLaMA with each backend."""
import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax import config_lib, layout
from mashvlm_jax.model import attention, gpu_attention, mashvlm, splash
from mashvlm_jax.model.config import LlamaConfig, ModelConfig
from mashvlm_jax.model.llm import LlamaDecoder
from conftest import ROOT, load_config, require

FAST = ("splash", "gpu")


def distinct_masks():
  """Every distinct mask switch combination of the ablation presets, plus plain causal."""
  combos = {tuple(sorted(p["mask"].items())) for p in config_lib.ABLATIONS.values()}
  combos.add(tuple(sorted(layout.plain_causal_switches().items())))
  return [dict(c) for c in sorted(combos)]


MASKS = distinct_masks()
MASK_IDS = ["t={temporal},s={spatial},ts={temporal_sees_spatial},st={spatial_sees_temporal}"
            .format(**m) for m in MASKS]


def inputs(m=23, n=64, text_len=60, lengths=(60, 25), heads=4, kv_heads=2, head_dim=32,
           dtype=jnp.float32, seed=0):
  """q [B, S, H, D], k, v [B, S, Hkv, D] and types int32[B, S] with right-padded text."""
  rng = np.random.default_rng(seed)
  s = m + n + text_len
  draw = lambda h: jnp.asarray(rng.normal(size=(len(lengths), s, h, head_dim)), dtype)
  text_mask = np.arange(text_len)[None] < np.asarray(lengths)[:, None]
  types = jnp.asarray(layout.text_token_types(text_mask, m, n))
  return draw(heads), draw(kv_heads), draw(kv_heads), types


def value_and_grads(backend, q, k, v, mask, cotangent):
  """Output and d<out, cotangent>/d(q, k, v), jitted."""
  def f(q, k, v):
    out = attention.attend(q, k, v, mask, backend=backend)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


def test_masks_cover_the_ablations():
  assert len(MASKS) == 7  # causal, DST, 3 x Table 5, 2 x Table 6 (one equals DST)
  assert layout.plain_causal_switches() in MASKS


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("switches", MASKS, ids=MASK_IDS)
def test_backend_equals_dense_forward_and_grads(backend, switches):
  """Every row, pad rows included (row 1 has 35 pad tokens, S=147 pads to 2 splash
  blocks of 128); gradients for q, k and v with a random cotangent."""
  q, k, v, types = inputs()
  spec = attention.AttentionSpec(23, 64, **switches)
  layout_mask = attention.MaskLayout(types, spec)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  want, want_grads = value_and_grads("dense", q, k, v, layout.dst_mask(types, **switches), cot)
  got, got_grads = value_and_grads(backend, q, k, v, layout_mask, cot)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for name, g, w in zip("qkv", got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("backend", FAST)
def test_backend_bfloat16_close_to_dense(backend):
  q, k, v, types = inputs(dtype=jnp.bfloat16, heads=2, kv_heads=1, head_dim=64)
  mask = attention.MaskLayout(types, attention.AttentionSpec(23, 64))
  want = attention.attend(q, k, v, mask, backend="dense")
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, backend=backend))(q, k, v)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def padded_text_mask(kind, lengths, text_len):
  """bool[B, text_len], row b with lengths[b] real tokens: "right" (pads after the text),
  "left" (pads between the video and the text) or "interior" (first and last text
  positions real, pads scattered between them)."""
  rng = np.random.default_rng(2)
  rows = []
  for n in lengths:
    if kind == "right":
      real = np.arange(n)
    elif kind == "left":
      real = np.arange(text_len - n, text_len)
    else:
      real = np.r_[0, np.sort(rng.choice(np.arange(1, text_len - 1), n - 2, replace=False)),
                   text_len - 1]
    rows.append(np.isin(np.arange(text_len), real))
  return np.stack(rows)


@pytest.mark.parametrize("backend,kind", [("gpu", "right"), ("gpu", "left"),
                                          ("gpu", "interior"), ("splash", "left"),
                                          ("splash", "interior")])
def test_backend_equals_dense_wherever_the_padding_is(backend, kind):
  """Text padding right of the text, left of it (after the video) or between text tokens:
  outputs and q/k/v gradients equal the dense reference under DST and plain causal
  (splash with right padding: test_backend_equals_dense_forward_and_grads)."""
  m, n, text_len = 11, 16, 40
  text_mask = padded_text_mask(kind, (29, 13), text_len)
  assert (text_mask.sum(1) == (29, 13)).all()
  types = jnp.asarray(layout.text_token_types(text_mask, m, n))
  q, k, v, _ = inputs(m, n, text_len, lengths=(29, 13), seed=3)
  cot = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
  for switches in ({}, layout.plain_causal_switches()):
    mask = attention.MaskLayout(types, attention.AttentionSpec(m, n, **switches))
    want, want_grads = value_and_grads("dense", q, k, v, mask.dense(), cot)
    got, got_grads = value_and_grads(backend, q, k, v, mask, cot)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=str(switches))
    for name, g, w in zip("qkv", got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name} {switches}")


def test_gpu_real_first_permutation():
  """Non-pad tokens first in their order, then the pads; ``inverse`` undoes ``order``."""
  P, T = layout.PAD, layout.TEXT
  types = jnp.asarray([[1, 2, P, T, P, T], [1, 2, T, T, P, P]], jnp.int32)
  order, inverse = gpu_attention.real_first(types)
  np.testing.assert_array_equal(order, [[0, 1, 3, 5, 2, 4], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(order), np.asarray(inverse), 1),
                                np.tile(np.arange(6), (2, 1)))


def test_splash_other_block_shape_and_mha():
  """block_kv = 256 > block_q = 128 and one kv head per query head (plain MHA)."""
  q, k, v, types = inputs(m=11, n=16, text_len=250, lengths=(250, 3), heads=2, kv_heads=2)
  spec = attention.AttentionSpec(11, 16, block_q=128, block_kv=256)
  mask = attention.MaskLayout(types, spec)
  got = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, backend="splash"))(q, k, v)
  want = attention.attend(q, k, v, mask, backend="dense")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def visited_blocks(kernel):
  """For each query block, the key blocks the forward kernel computes."""
  info = kernel.fwd_mask_info
  block_mask, data_next = np.asarray(info.block_mask)[0], np.asarray(info.data_next)[0]
  return [sorted({int(d) for d, b in zip(dn, bm) if b > 0})
          for dn, bm in zip(data_next, block_mask)]


@pytest.mark.parametrize("switches,want", [
    (dict(), [[0], [1], [0, 1, 2]]),  # DST: spatial x temporal blocks skipped both ways
    (dict(temporal_sees_spatial=True, spatial_sees_temporal=True), [[0, 1], [0, 1], [0, 1, 2]]),
    (layout.plain_causal_switches(), [[0], [0, 1], [0, 1, 2]]),
])
def test_splash_skips_fully_masked_blocks(switches, want):
  """M = N = L = 128 with 128-blocks: one block each of temporal, spatial, text."""
  spec = attention.AttentionSpec(128, 128, **switches)
  kernel = splash.make_kernel(spec, 384, True)
  assert visited_blocks(kernel) == want
  # and the kernel's block list is exactly the non-empty blocks of layout.dst_mask
  dense = splash.static_mask(spec, 384).reshape(3, 128, 3, 128).any(axis=(1, 3))
  assert [list(np.flatnonzero(r)) for r in dense] == want


def test_splash_segment_ids_hide_padding():
  types = jnp.asarray(layout.token_types(2, 2, 2, pad_to=8))[None]
  np.testing.assert_array_equal(splash.segment_ids(types, 10)[0],
                                [0, 0, 0, 0, 0, 0, 7, 8, 9, 10])


def test_gpu_recompute_plan_follows_the_mask():
  """DST recomputes only the spatial rows, bidirectionally over the spatial keys; plain
  causal recomputes nothing."""
  dst = attention.AttentionSpec(5, 8)
  assert [p[:4] + (p[4],) for p in gpu_attention.recompute_plan(dst)] == [(5, 13, 5, 13, None)]
  assert gpu_attention.recompute_plan(attention.AttentionSpec.plain_causal()) == ()
  mixed = attention.AttentionSpec(5, 8, temporal_sees_spatial=True)
  (q0, q1, k0, k1, how), spatial = gpu_attention.recompute_plan(mixed)
  assert (q0, q1, k0, k1) == (0, 5, 0, 13)
  np.testing.assert_array_equal(how, layout.dst_mask(layout.token_types(5, 8, 0),
                                                     temporal_sees_spatial=True)[:5])


def test_fast_backends_reject_a_dense_mask():
  q, k, v, types = inputs(lengths=(60,))
  mask = layout.dst_mask(types)
  for backend in FAST:
    with pytest.raises(ValueError, match="needs the token layout"):
      attention.attend(q, k, v, mask, backend=backend)
  with pytest.raises(ValueError, match="not available"):
    attention.attend(q, k, v, mask, backend="flash")


def test_config_validates_backend_and_blocks():
  model = load_config("tiny_synthetic").model
  assert sorted(attention.BACKENDS) == sorted(("dense", "splash", "gpu"))
  for key, value, match in (("attention_backend", "flash", "attention_backend"),
                            ("splash_block_q", 100, "splash_block_q"),
                            ("splash_block_kv", 0, "splash_block_kv")):
    with pytest.raises(ValueError, match=match):
      ModelConfig.from_dict({**model.to_dict(), key: value})
  with pytest.raises(ValueError, match="temporal attention"):
    attention.AttentionSpec(3, 4, temporal="sideways")


def test_auto_backend_is_dense_on_cpu_and_follows_the_platform(monkeypatch):
  """"auto" (the configs' default) resolves when traced: here, on CPU, to the dense
  reference, mask and output alike; on TPU to splash, on GPUs to the gpu backend."""
  assert jax.default_backend() == "cpu"
  assert attention.resolve_backend("auto") == "dense"
  q, k, v, types = inputs(lengths=(60, 25))
  spec = attention.AttentionSpec(23, 64)
  mask = attention.attention_mask(types, spec, "auto")
  np.testing.assert_array_equal(mask, layout.dst_mask(types))  # a dense bool mask
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  got, got_grads = value_and_grads("auto", q, k, v, mask, cot)
  want, want_grads = value_and_grads("dense", q, k, v, mask, cot)
  np.testing.assert_array_equal(got, want)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_array_equal(g, w)
  for platform, backend in (("tpu", "splash"), ("gpu", "gpu"), ("cuda", "gpu"),
                            ("cpu", "dense")):
    monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
    assert attention.resolve_backend("auto") == backend
    assert attention.resolve_backend("dense") == "dense"  # explicit choices stay
  for name in ("tiny_synthetic", "mashvlm_7b"):
    assert load_config(name).model.attention_backend == "auto"
  assert ModelConfig().attention_backend == "auto"


SHARD_MAP_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mashvlm_jax import layout
    from mashvlm_jax.model import attention
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(0)
    m, n, text = 11, 16, 40
    lengths = np.array([[40], [7], [0], [23]])
    types = jnp.asarray(layout.text_token_types(np.arange(text)[None] < lengths, m, n))
    spec = attention.AttentionSpec(m, n)
    mask = attention.MaskLayout(types, spec)
    for kv_heads in (2, 1):  # 1: kv heads do not split over "tensor" and are shared
      q = jnp.asarray(rng.normal(size=(4, m + n + text, 4, 32)), jnp.float32)
      k, v = (jnp.asarray(rng.normal(size=(4, m + n + text, kv_heads, 32)), jnp.float32)
              for _ in range(2))
      cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
      def loss(q, k, v, backend, mesh=None):
        out = attention.attend(q, k, v, mask, backend=backend, mesh=mesh)
        return jnp.sum(out * cot), out
      grad = lambda *a: jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(*a)
      (_, want), want_g = jax.jit(grad, static_argnums=3)(q, k, v, "dense")
      explicit = jax.jit(lambda q, k, v: grad(q, k, v, "splash", mesh))
      assert "shard_map" in str(jax.make_jaxpr(explicit)(q, k, v))
      with jax.set_mesh(mesh):  # mesh from the context, inputs sharded over the batch
        batch = NamedSharding(mesh, P(("data", "fsdp")))
        qs, ks, vs = (jax.device_put(x, batch) for x in (q, k, v))
        context = jax.jit(lambda q, k, v: grad(q, k, v, "splash"))
        assert "shard_map" in str(jax.make_jaxpr(context)(qs, ks, vs))
        results = [explicit(q, k, v), context(qs, ks, vs)]
      for (_, got), got_g in results:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        for g, w in zip(got_g, want_g):
          np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    print("SHARD_MAP_OK")
""")


def test_splash_under_shard_map_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "SHARD_MAP_OK" in proc.stdout, proc.stderr[-4000:]


AOT_TPU_SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mashvlm_jax.model import attention, mashvlm
    from mashvlm_jax.model.config import ModelConfig
    from mashvlm_jax.train import compile_check
    from conftest import load_config
    devices = compile_check.topology_devices(compile_check.parse_topology("v5p:2x2x1"))
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    # 7B DST attention (S = 815 -> 896 = 7 blocks), mesh passed explicitly
    spec = attention.AttentionSpec(47, 256)
    def loss(q, k, v, types):
      out = attention.attend(q, k, v, attention.MaskLayout(types, spec), backend="splash",
                             mesh=mesh)
      return jnp.sum(out.astype(jnp.float32))
    heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    x = jax.ShapeDtypeStruct((4, 815, 32, 128), jnp.bfloat16, sharding=heads)
    types = jax.ShapeDtypeStruct((4, 815), jnp.int32, sharding=batch)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, types)
    assert "tpu_custom_call" in lowered.as_text()  # Mosaic kernel, not interpret mode
    lowered.compile()
    # tiny MashVLM train gradient with splash under remat, mesh from the context
    config = load_config("tiny_synthetic")
    config.model.update(attention_backend="splash", remat_policy="full")
    cfg = ModelConfig.from_dict(config.model)
    replicated = NamedSharding(mesh, P())
    params = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
        nn.unbox(mashvlm.abstract_params(cfg)))
    frames = jax.ShapeDtypeStruct((4, 8, 64, 64, 3), jnp.uint8, sharding=batch)
    text = jax.ShapeDtypeStruct((4, 12), jnp.int32, sharding=batch)
    loss = lambda p, f, t: mashvlm.MashVLM(cfg).apply({"params": p}, f, t).std()
    with jax.set_mesh(mesh):
      lowered = jax.jit(jax.grad(loss)).lower(params, frames, text)
      assert "tpu_custom_call" in lowered.as_text()
      lowered.compile()
    print("AOT_TPU_OK")
""")


def test_splash_compiles_ahead_of_time_for_tpu():
  """Lowers and compiles the real (non-interpret) Mosaic kernel for a v5p:2x2x1 topology
  from this CPU machine: forward+backward of 7B DST attention under shard_map, and the
  tiny MashVLM gradient with splash under remat and a context mesh (about 12 s on 2
  cores). Needs libtpu: a failure under CI, a skip elsewhere."""
  require("libtpu")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", AOT_TPU_SCRIPT], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "AOT_TPU_OK" in proc.stdout, proc.stderr[-4000:]


def tiny_model(arg):
  """Tiny MashVLM config, its parameters and a batch with 5 padded text tokens in row 1."""
  config = load_config("tiny_synthetic", arg)
  cfg = ModelConfig.from_dict(config.model)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 256, size=(2, 8, 64, 64, 3)).astype(np.uint8))
  text = jnp.asarray(rng.integers(0, cfg.llm.vocab_size, size=(2, 12)).astype(np.int32))
  text_mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7]]))
  return cfg, params, (frames, text, text_mask)


@pytest.mark.parametrize("arg", ["ablation=mash", pytest.param("ablation=baseline",
                                                               marks=pytest.mark.slow)])
def test_mashvlm_logits_equal_across_backends(arg):
  """The tiny MashVLM (M=23, N=64, 12 text tokens; 4 unrolled layers), all logits."""
  cfg, params, batch = tiny_model(arg)
  logits = {}
  for backend in ("dense",) + FAST:
    model = mashvlm.MashVLM(dataclasses.replace(cfg, attention_backend=backend).validate())
    logits[backend] = np.asarray(jax.jit(model.apply)({"params": params}, *batch))
  for backend in FAST:
    np.testing.assert_allclose(logits[backend], logits["dense"], atol=1e-5, rtol=1e-5,
                               err_msg=backend)


def test_causal_lm_equal_across_backends():
  """Plain-text LLaMA path (M = N = 0, plain causal mask) with right padding."""
  cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=2, num_kv_heads=1)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 9)))
  attn = jnp.asarray(np.arange(9)[None] < np.array([[9], [5]]))
  params = jax.jit(lambda r: LlamaDecoder(cfg).init(r, ids, method=LlamaDecoder.causal_lm))(
      jax.random.PRNGKey(0))
  run = lambda backend: np.asarray(jax.jit(functools.partial(
      LlamaDecoder(cfg, attention_backend=backend).apply,
      method=LlamaDecoder.causal_lm))(params, ids, attn))
  want = run("dense")
  for backend in FAST:
    np.testing.assert_allclose(run(backend), want, atol=1e-5, rtol=1e-5, err_msg=backend)


@pytest.mark.slow
def test_mashvlm_grads_equal_across_backends_under_remat():
  """Parameter gradients of the tiny MashVLM, fast backends under remat (custom_vjp of the
  splash kernel inside nn.remat + nn.scan)."""
  cfg, params, batch = tiny_model("ablation=mash")

  def grads(backend, remat):
    model_cfg = dataclasses.replace(cfg, attention_backend=backend, remat_policy=remat,
                                    scan_layers=True)
    loss = lambda p: mashvlm.MashVLM(model_cfg).apply({"params": p}, *batch).std()
    return jax.jit(jax.grad(loss))(params)

  want = grads("dense", "none")
  for backend, remat in (("splash", "full"), ("gpu", "dots")):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4),
                           grads(backend, remat), want)
