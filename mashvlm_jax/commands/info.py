"""Print a config's sequence layout and parameter counts; --forward runs a jitted step.

``mashvlm info --config=configs/NAME.py[:ARGS] [--forward]`` prints the sequence layout (M, N, position ids, mask blocks), the parameter counts per
tower (by ``jax.eval_shape``, no memory), and with ``--forward`` initialises the model and
runs a jitted forward and gradient on random uint8 frames with a padded batch.
"""
from __future__ import annotations

import time

from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny_synthetic.py",
                                lock_config=True)
_FORWARD = flags.DEFINE_bool("forward", False, "Run a jitted forward+grad on random frames.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size for --forward.")


def describe_layout(cfg) -> str:
  from mashvlm_jax import layout
  m, n = cfg.video_token_counts
  types = layout.token_types(m, n, 4)
  ids = layout.position_ids(types, cfg.rope_mode)
  mask = layout.dst_mask(types, **cfg.mask.as_kwargs())
  blocks = {"temporal->temporal": mask[:m, :m], "spatial->spatial": mask[m:m + n, m:m + n],
            "temporal->spatial": mask[:m, m:m + n], "spatial->temporal": mask[m:m + n, :m]}
  lines = [f"sequence: [temporal M={m}][spatial N={n}][text L]  rope_mode={cfg.rope_mode}",
           f"  ids row 0 (even pairs): temporal {ids[0, 0]}..{ids[0, m - 1]}, "
           f"spatial {ids[0, m]}..{ids[0, m + n - 1]}, text from {ids[0, m + n]}",
           f"  ids row 1 (odd pairs):  temporal {ids[1, 0]}..{ids[1, m - 1]}, "
           f"spatial {ids[1, m]}..{ids[1, m + n - 1]}, text from {ids[1, m + n]}",
           "  mask (query->key, share of pairs visible): " + ", ".join(
               f"{k} {v.mean():.2f}" for k, v in blocks.items())]
  if cfg.action_token.enabled:  # the first text position (model/action_token.py)
    a = cfg.action_token
    lines.append(f"  action token at {m + n} (typed as text, sees the M+N video tokens; "
                 f"text starts at {cfg.prefix_len}): heads verb {a.num_verbs}, noun "
                 f"{a.num_nouns}, action {a.num_actions}; loss weight {a.loss_weight}, "
                 f"head weights {a.head_weights}")
  return "\n".join(lines)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mashvlm_jax.model import mashvlm
  from mashvlm_jax.model.config import ModelConfig

  config = flags.FLAGS.config
  if config is None:
    raise SystemExit("mashvlm info: --config is required, e.g. "
                     "--config=configs/tiny_synthetic.py")
  cfg = ModelConfig.from_dict(config.model)
  print(describe_layout(cfg))
  shapes = mashvlm.abstract_params(cfg)
  for tower in ("vision_tower", "projector", "language_model"):
    print(f"  params {tower:<15} {mashvlm.count_params(shapes[tower]):>15,}")
  print(f"  params {'total':<15} {mashvlm.count_params(shapes):>15,}")
  if not _FORWARD.value:
    return
  t0 = time.perf_counter()
  params = mashvlm.init_params(cfg, jax.random.PRNGKey(config.get("seed", 0)))
  rng = np.random.default_rng(0)
  batch, text_len = _BATCH.value, int(config.get("text_len", 16))
  size = cfg.vision.image_size
  frames = rng.integers(0, 256, (batch, cfg.num_frames, size, size, 3), dtype=np.uint8)
  text = rng.integers(0, cfg.llm.vocab_size, (batch, text_len), dtype=np.int32)
  lengths = np.maximum(2, text_len - np.arange(batch) * (text_len // (2 * batch)))
  text_mask = np.arange(text_len)[None] < lengths[:, None]
  model = mashvlm.MashVLM(cfg)

  def loss_fn(p):
    logits = model.apply({"params": p}, frames, text, text_mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, text[:, 1:, None], -1)[..., 0]
    weights = text_mask[:, 1:]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  step = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = step(params)
  jax.block_until_ready(grads)
  t1 = time.perf_counter()
  loss, grads = step(params)
  jax.block_until_ready(grads)
  t2 = time.perf_counter()
  gnorm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree_util.tree_leaves(grads))))
  print(f"forward+grad: batch {batch}, text_len {text_len}, loss {float(loss):.4f} "
        f"(ln vocab = {np.log(cfg.llm.vocab_size):.4f}), grad norm {gnorm:.4f}, "
        f"finite {bool(np.isfinite(float(loss)) and np.isfinite(gnorm))}")
  print(f"  init+compile+first step {t1 - t0:.1f}s, second step {t2 - t1:.3f}s")
