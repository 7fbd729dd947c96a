"""Independent numpy references for the tests: the paper's equations and plain LLaMA/CLIP
written directly, importing nothing from mashvlm_jax's model code."""
import numpy as np

T_, S_, X_, P_ = 1, 2, 0, 3  # temporal, spatial, text, pad as laid out in docs/design.md


def paper_ids(m, n, l, pad=0):
  """(distinct, balanced) 0-based ids from eqs. (4), (5), right-aligned when N < M."""
  distinct = np.arange(1, m + n + l + 1) - 1
  if n >= m:  # eq. (5) exactly, minus one
    balanced = np.concatenate([np.arange(n - m + 1, n + 1), np.arange(1, n + 1),
                               np.arange(n + 1, n + l + 1)]) - 1
  else:  # temporal block is the longer one: spatial right-aligned under it
    balanced = np.concatenate([np.arange(m), np.arange(m - n, m), np.arange(m, m + l)])
  return distinct, balanced


def paper_mask(m, n, l, pad, temporal, spatial, tss, sst):
  """Mask from blocks: M_D + M_ST over the video, causal text rows, pads hidden."""
  tt = np.tril(np.ones((m, m), bool)) if temporal == "causal" else np.ones((m, m), bool)
  ss = np.tril(np.ones((n, n), bool)) if spatial == "causal" else np.ones((n, n), bool)
  ts = np.full((m, n), tss)
  st = np.full((n, m), sst)
  video = np.block([[tt, ts], [st, ss]])
  s = m + n + l
  full = np.zeros((s + pad, s + pad), bool)
  full[:m + n, :m + n] = video
  full[m + n:s, :s] = np.tril(np.ones((s, s), bool))[m + n:]
  full[s:, s:] = np.eye(pad, dtype=bool)
  return full


def rms_norm(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


def rope_complex(x, ids, theta):
  """x [S, H, d] rotated per pair k = dims (k, k + d/2) by ids[k % 2] * theta^(-2k/d)."""
  d = x.shape[-1]
  k = np.arange(d // 2)
  angle = ids[k % 2].T * theta ** (-2.0 * k / d)  # [S, d/2]
  z = (x[..., :d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * angle)[:, None, :]
  return np.concatenate([z.real, z.imag], -1)


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def attention(q, k, v, mask):
  """q [S, H, d], k/v [S, Hkv, d] (kv heads repeated), mask [S, S] bool."""
  rep = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
  logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[None], logits, -np.inf)
  return np.einsum("hqk,khd->qhd", softmax(logits), v)


def llama(p, embeds, ids, mask, *, theta, eps, tied):
  """Plain LLaMA over one row: embeds [S, D], ids [2, S], mask [S, S] -> (hidden, logits)."""
  f = lambda a: np.asarray(a, np.float64)
  lay = p["layers"]
  h = f(embeds)
  for i in range(lay["input_layernorm"]["scale"].shape[0]):
    g = lambda *ks: f(_get(lay, ks)[i])
    x = rms_norm(h, g("input_layernorm", "scale"), eps)
    q = np.einsum("sd,dhk->shk", x, g("self_attn", "q_proj", "kernel"))
    k = np.einsum("sd,dhk->shk", x, g("self_attn", "k_proj", "kernel"))
    v = np.einsum("sd,dhk->shk", x, g("self_attn", "v_proj", "kernel"))
    o = attention(rope_complex(q, ids, theta), rope_complex(k, ids, theta), v, mask)
    h = h + np.einsum("shk,hkd->sd", o, g("self_attn", "o_proj", "kernel"))
    x = rms_norm(h, g("post_attention_layernorm", "scale"), eps)
    gate = x @ g("mlp", "gate_proj", "kernel")
    up = x @ g("mlp", "up_proj", "kernel")
    h = h + (gate / (1 + np.exp(-gate)) * up) @ g("mlp", "down_proj", "kernel")
  h = rms_norm(h, f(p["norm"]["scale"]), eps)
  head = f(p["embed_tokens"]["embedding"]).T if tied else f(p["lm_head"]["kernel"])
  return h, h @ head


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def clip_vision(p, pixels, *, patch, eps, feature_layer):
  """CLIP ViT over pixels [H, W, 3] -> hidden_states list (HF order) and pooled output."""
  f = lambda a: np.asarray(a, np.float64)
  hgt, wid, _ = pixels.shape
  gh, gw = hgt // patch, wid // patch
  tiles = pixels.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(
      gh * gw, patch * patch * 3)
  kernel = f(p["patch_embedding"]["kernel"]).reshape(patch * patch * 3, -1)
  x = np.concatenate([f(p["class_embedding"])[None], tiles @ kernel]) + f(p["position_embedding"])
  x = layer_norm(x, f(p["pre_layrnorm"]["scale"]), f(p["pre_layrnorm"]["bias"]), eps)
  states = [x]
  lay = p["layers"]
  for i in range(lay["fc1"]["bias"].shape[0]):
    g = lambda *ks: f(_get(lay, ks)[i])
    h = layer_norm(x, g("layer_norm1", "scale"), g("layer_norm1", "bias"), eps)
    qkv = [np.einsum("sd,dhk->shk", h, g(n, "kernel")) + g(n, "bias")
           for n in ("q_proj", "k_proj", "v_proj")]
    o = attention(*qkv, np.ones((len(x), len(x)), bool))
    x = x + np.einsum("shk,hkd->sd", o, g("out_proj", "kernel")) + g("out_proj", "bias")
    h = layer_norm(x, g("layer_norm2", "scale"), g("layer_norm2", "bias"), eps)
    h = h @ g("fc1", "kernel") + g("fc1", "bias")
    h = h / (1 + np.exp(-1.702 * h))
    x = x + h @ g("fc2", "kernel") + g("fc2", "bias")
    states.append(x)
  pooled = layer_norm(x[0], f(p["post_layernorm"]["scale"]), f(p["post_layernorm"]["bias"]), eps)
  return states[feature_layer], pooled
