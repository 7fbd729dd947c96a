"""The ARS table of a checkpoint (RVE's head scoring, paper Sec. 3.1 and Fig. 5).

Pairs: the first clips with an action of the training split (never an evaluation split),
in stored order; each asks ``tasks.action_question`` of the clip's action and of its
contrast verb (``rve.CONTRAST_ACTION``), the same video both times.

Capture: through the KV-cache path of generation (``Generator``'s prefill of the video and
the prompt without its last token, then that token as one cached decode step of a model
with ``capture_heads``), each query head's softmax weights of the prompt's last token over
all keys, restricted to the visual keys (not renormalised): A [layers, heads, V].
ARS(l, h) = rve.ars(A, Â) per pair, averaged over pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax.analysis import rve
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig


def contrast_pairs(config, count: int, split: str | None = None) -> list[dict]:
  """{"clip", "verb", "swap", "frames" uint8 [T, H, W, 3]} for the first ``count`` clips
  with an action of ``split`` (default ``config.data.train_split``), in stored order."""
  from mashvlm_jax.data import pipeline
  split = split or str(config.data.train_split)
  if split in tuple(config.data.eval_splits):
    raise ValueError(f"RVE pairs come from training clips, but split {split!r} is one of "
                     f"the evaluation splits {tuple(config.data.eval_splits)}")
  if count < 1:
    raise ValueError(f"the number of pairs must be >= 1, found {count}")
  records = pipeline.make_eval_records(config, split)
  pairs = []
  for index in range(len(records)):
    if len(pairs) == count:
      break
    record = records[index]
    verb = record["action"]
    if not verb:
      continue  # a clip without an actor has no verb to swap
    if verb not in rve.CONTRAST_ACTION:
      raise ValueError(f"{split} clip {record['id']}: action {verb!r} has no contrast verb "
                       f"in rve.CONTRAST_ACTION (known: {sorted(rve.CONTRAST_ACTION)})")
    pairs.append({"clip": record["id"], "verb": verb, "swap": rve.CONTRAST_ACTION[verb],
                  "frames": record["frames"]})
  if len(pairs) < count:
    raise ValueError(f"split {split!r} has {len(pairs)} clips with an action, fewer than the "
                     f"{count} pairs asked for")
  return pairs


class HeadAttention:
  """Jitted capture of each prompt's last-token attention per layer and query head over
  the visual keys (module docstring): ``__call__(frames [B, T, H, W, 3], prompts)`` ->
  float32 [B, layers, heads, V]."""

  def __init__(self, model_cfg: ModelConfig, params, visual: str = "all", pad_id: int = 0):
    from mashvlm_jax.eval.generate import Generator
    self.generator = Generator(model_cfg, params, pad_id=pad_id, split_layers=False,
                               rve=None)
    self.cfg = self.generator.cfg
    self.model = mashvlm.MashVLM(self.cfg, capture_heads=True)
    self.params = params
    self.visual_keys = rve.visual_keys(self.cfg, visual)
    self._run = jax.jit(self._run_fn, static_argnames=("cache_len",))

  def _run_fn(self, params, frames, head_ids, head_mask, last_token, *, cache_len):
    gen = self.generator
    _, cache, cache_types, ids, index = gen._prefill_fn(params, frames, head_ids, head_mask,
                                                        cache_len=cache_len)
    cache_types, mask = gen._step_inputs(cache_types, last_token, index)
    _, state = self.model.apply({"params": params, "cache": cache}, last_token[:, None],
                                ids[:, :, None], mask, index, method=mashvlm.MashVLM.extend,
                                mutable=["cache", "intermediates"])
    probs = state["intermediates"]["language_model"]["layers"]["self_attn"][
        "attention_head_probs"][0]  # [layers, B, heads, 1, cache_len]
    start, stop = self.visual_keys
    return jnp.swapaxes(probs[:, :, :, 0, start:stop], 0, 1)

  def __call__(self, frames, prompts, width: int | None = None) -> np.ndarray:
    from mashvlm_jax.eval.generate import pad_prompts
    if any(len(p) < 2 for p in prompts):
      raise ValueError("every prompt needs at least 2 tokens (a prefix and a last token)")
    heads = [list(p[:-1]) for p in prompts]
    head_ids, head_mask = pad_prompts(heads, self.generator.pad_id, 8,
                                      None if width is None else width - 1)
    last = np.asarray([p[-1] for p in prompts], np.int32)
    cache_len = self.generator.num_video + head_ids.shape[1] + 1
    return np.asarray(self._run(self.params, np.asarray(frames), head_ids, head_mask, last,
                                cache_len=cache_len))


def score_pairs(capture: HeadAttention, prompter, pairs: list[dict], *, batch_size: int = 8,
                width: int | None = None) -> np.ndarray:
  """ARS float64 [P, layers, heads] of each pair (``contrast_pairs``), questions built by
  ``prompter`` (eval.common.Prompter); the mean over pairs is the ARS table."""
  from mashvlm_jax.data.tasks import action_question
  out = []
  for begin in range(0, len(pairs), batch_size):
    chunk = pairs[begin:begin + batch_size]
    frames = np.stack([p["frames"] for p in chunk] * 2)
    prompts = ([prompter(action_question(p["verb"])) for p in chunk]
               + [prompter(action_question(p["swap"])) for p in chunk])
    attention = capture(frames, prompts, width).astype(np.float64)
    out.append(rve.ars(attention[:len(chunk)], attention[len(chunk):]))
  return np.concatenate(out, axis=0)


def plot_ars(table, path, *, sensitive=None, insensitive=None, layers=(), title: str = ""):
  """Heatmap of ARS [layers, heads] (paper Fig. 5) beside each layer's mean ARS, with the
  chosen heads marked (S: sensitive, x: insensitive) and enhanced layers starred -> PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  table = np.asarray(table, np.float64)
  num_layers, num_heads = table.shape
  fig, (heat, mean) = plt.subplots(
      1, 2, figsize=(min(3.5 + 0.35 * num_heads, 14), max(3.0, 1.4 + 0.3 * num_layers)), dpi=120,
      gridspec_kw={"width_ratios": [4, 1]}, sharey=True)
  image = heat.imshow(table, aspect="auto", cmap="viridis", origin="lower")
  fig.colorbar(image, ax=heat, label="ARS")
  for marks, symbol in ((sensitive, "S"), (insensitive, "x")):
    for layer, heads in enumerate(marks if marks is not None else []):
      for head in heads:
        heat.text(head, layer, symbol, ha="center", va="center", color="white", fontsize=7)
  heat.set_xlabel("query head")
  heat.set_ylabel("decoder layer (* enhanced)")
  heat.set_yticks(range(num_layers),
                  [f"{l}{'*' if l in layers else ''}" for l in range(num_layers)])
  if num_heads <= 40:
    heat.set_xticks(range(num_heads))
  mean.barh(range(num_layers), table.mean(axis=1), color="tab:blue")
  mean.set_xlabel("mean ARS")
  from mashvlm_jax.eval.plots import save_figure
  return save_figure(fig, path, title)


def layers_by_score(table) -> list[int]:
  """Layer indices by mean ARS over heads, highest first."""
  return [int(l) for l in np.argsort(-np.asarray(table).mean(axis=1), kind="stable")]



def write_heads_file(config, params, out, *, pairs: int = 32, k: int | None = None,
                     layers="middle", visual: str = "all", split: str | None = None,
                     batch_size: int = 8, checkpoint: str = "", step=None) -> dict:
  """Scores ``pairs`` verb-swapped training pairs with ``params``, writes the heads file
  ``out`` (.json) and the ARS heatmap beside it (.png); returns the heads record with
  "png" (the command ``mashvlm rve-heads`` and benchmarks/methods.py)."""
  import pathlib
  from mashvlm_jax.eval import common
  model_cfg = ModelConfig.from_dict(config.model)
  k = k or rve.default_k(model_cfg.llm.num_heads)
  rve.check_k(k, model_cfg.llm.num_heads)
  out = pathlib.Path(out)
  if out.suffix != ".json":
    raise ValueError(f"the RVE heads file must be a .json file, found {out}")
  chosen = contrast_pairs(config, pairs, split)
  prompter = common.Prompter(config)
  capture = HeadAttention(model_cfg, params, visual, prompter.tok.pad_id)
  per_pair = score_pairs(capture, prompter, chosen, batch_size=batch_size,
                         width=int(config.data.text_len))
  table = per_pair.mean(axis=0)
  record = rve.heads_record(
      table, model_cfg, k=k, layers=layers, visual=visual,
      pairs=[{key: p[key] for key in ("clip", "verb", "swap")} for p in chosen],
      ars_std=per_pair.std(axis=0).tolist(), layers_by_mean_ars=layers_by_score(table),
      checkpoint=checkpoint, step=step, split=split or str(config.data.train_split))
  rve.write_heads(out, record)
  record["png"] = plot_ars(table, out.with_suffix(".png"), sensitive=record["sensitive"],
                           insensitive=record["insensitive"], layers=record["layers"],
                           title=f"ARS over {len(chosen)} verb-swapped pairs, K={k}")
  return record
