"""The LLaMA decoder against an independent numpy LLaMA, with plain-causal and DST masks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax import layout
from mashvlm_jax.model.config import LlamaConfig
from mashvlm_jax.model.llm import LlamaDecoder
import reference

CONFIGS = [
    LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=100, num_layers=3,
                num_heads=6, num_kv_heads=2, rope_theta=10000.0),
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=72, num_layers=2,
                num_heads=4, num_kv_heads=4, rope_theta=500.0, tie_word_embeddings=True),
]


def make(cfg, seed=0):
  model = LlamaDecoder(cfg)
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 4), jnp.int32),
                                        method=LlamaDecoder.causal_lm))(jax.random.PRNGKey(seed))
  params = nn.unbox(params["params"])
  # randomise the norm scales too, so the reference checks they are used
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(1), x.shape)
      if "scale" in jax.tree_util.keystr(p) else x, params)
  return model, params


@pytest.mark.parametrize("cfg", CONFIGS)
def test_plain_causal_text_equals_numpy_llama(cfg):
  model, params = make(cfg)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
  attn = np.ones((2, 9), bool)
  attn[1, 6:] = False
  logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(attn),
                       method=LlamaDecoder.causal_lm)
  for row, length in ((0, 9), (1, 6)):
    embeds = np.asarray(params["embed_tokens"]["embedding"])[ids[row, :length]]
    pos = np.stack([np.arange(length)] * 2)
    _, want = reference.llama(params, embeds, pos, np.tril(np.ones((length, length), bool)),
                              theta=cfg.rope_theta, eps=cfg.rms_norm_eps,
                              tied=cfg.tie_word_embeddings)
    np.testing.assert_allclose(logits[row, :length], want, atol=1e-4, rtol=1e-4)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("mode", layout.ROPE_MODES)
@pytest.mark.parametrize("switches", [dict(), layout.plain_causal_switches(),
                                      dict(temporal="bidirectional", temporal_sees_spatial=True)])
def test_video_sequence_equals_numpy_reference(mode, switches):
  cfg = CONFIGS[0]
  model, params = make(cfg, seed=3)
  m, n, l, pad = 5, 8, 4, 3
  rng = np.random.default_rng(1)
  embeds = rng.normal(size=(1, m + n + l + pad, cfg.hidden_size)).astype(np.float32)
  types = layout.token_types(m, n, l, pad_to=m + n + l + pad)
  ids = layout.position_ids(types, mode)
  mask = layout.dst_mask(types, **switches)
  hidden = model.apply({"params": params}, jnp.asarray(embeds), jnp.asarray(ids)[None],
                       jnp.asarray(mask)[None])
  s = m + n + l
  want, _ = reference.llama(params, embeds[0, :s], ids[:, :s], mask[:s, :s],
                            theta=cfg.rope_theta, eps=cfg.rms_norm_eps, tied=False)
  np.testing.assert_allclose(hidden[0, :s], want, atol=1e-4, rtol=1e-4)
  assert np.isfinite(np.asarray(hidden)).all()  # pad rows too


def test_dst_keeps_spatial_and_temporal_apart():
  """Under DST, spatial hidden states ignore the temporal inputs and vice versa; text
  sees both. With the plain causal mask the spatial states do change."""
  cfg = CONFIGS[0]
  model, params = make(cfg, seed=5)
  m, n, l = 5, 8, 4
  types = layout.token_types(m, n, l)
  ids = jnp.asarray(layout.position_ids(types, "harmonic"))[None]
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, m + n + l, cfg.hidden_size)).astype(np.float32)
  x_t = x.copy()
  x_t[:, :m] += rng.normal(size=(1, m, cfg.hidden_size))
  x_s = x.copy()
  x_s[:, m:m + n] += rng.normal(size=(1, n, cfg.hidden_size))

  def run(inputs, **switches):
    mask = jnp.asarray(layout.dst_mask(types, **switches))[None]
    return np.asarray(model.apply({"params": params}, jnp.asarray(inputs), ids, mask))

  base = run(x)
  np.testing.assert_allclose(run(x_t)[:, m:m + n], base[:, m:m + n], atol=1e-6)
  np.testing.assert_allclose(run(x_s)[:, :m], base[:, :m], atol=1e-6)
  assert np.abs(run(x_t)[:, m + n:] - base[:, m + n:]).max() > 1e-3
  assert np.abs(run(x_s)[:, m + n:] - base[:, m + n:]).max() > 1e-3
  causal = layout.plain_causal_switches()
  assert np.abs(run(x_t, **causal)[:, m:m + n] - run(x, **causal)[:, m:m + n]).max() > 1e-3
