"""Batched generation with a KV cache: greedy, temperature and top-p sampling.

The video block and the prompt are prefilled once (``MashVLM.prefill``, the config's DST
mask); then one token per step goes through ``MashVLM.extend`` with the text-query mask
row of ``layout.text_query_mask`` over the cache and both position-id streams continued
by +1 (``layout.next_position_ids``). Prompts are RIGHT-padded, as in training: row b's
first new token is written at cache slot P + len_b (P = M + N, + 1 with the action token),
over the prompt's padding, so every row's cache holds ``[video][action][prompt][generated]``
with no gap and its ids and mask
are those of the unpadded grown sequence. Output therefore equals recomputing the full
sequence at every step (tests/test_generate.py).

With RVE (``rve=``, or built inside ``common.attention_enhancement``; analysis/rve.py) the
prompt's last token is enhanced at the prefill and each new token at its step, so the
output equals a full recompute with ``MashVLM(rve=...)`` and ``rve_from`` at the prompt's
last token.

Rows stop on ``eos_id``, on a stop string (in the decoded text, as given or as the
tokenizer writes it back: ``stop_forms``) or after
``max_new_tokens``; the batch stops when every row has.

Two decode loops give the same tokens (the same jitted pieces and the same RNG stream,
``fold_in(PRNGKey(seed), step)``): ``loop="host"`` dispatches one jitted step per token
from Python and checks the stop conditions on the host after each; ``loop="device"`` is
one jitted program, the prefill then a ``lax.while_loop`` over the steps writing into a
[B, max_new_tokens] buffer, which stops early only when every row has emitted EOS. Stop
strings need the decoded text, so on the device loop they are applied afterwards on the
host (the text and tokens are cut exactly as the host loop cuts them, but the loop
itself runs on to EOS or ``max_new_tokens``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mashvlm_jax import layout
from mashvlm_jax.eval import common
from mashvlm_jax.model import llm, mashvlm
from mashvlm_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How tokens are chosen; temperature 0 is greedy (top_p is then unused)."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  eos_id: int | None = None
  stop_strings: tuple[str, ...] = ()
  seed: int = 0

  def validate(self) -> "SamplingParams":
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be positive, found {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, found {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], found {self.top_p}")
    return self


LOOPS = ("host", "device")


@dataclasses.dataclass
class Generation:
  """Per row: new token ids (without EOS), decoded text (cut before a stop string; None
  without a tokenizer), why it stopped ("eos" | "stop" | "length"); ``step_logits``
  float32 [B, steps, vocab] (the logits each new token was chosen from) when asked;
  ``steps``: how many tokens per row the loop chose before the batch stopped (one
  prefill plus ``steps - 1`` cached decode steps)."""
  tokens: list
  texts: list | None
  finish: list
  step_logits: np.ndarray | None = None
  steps: int = 0


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1,
                length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (text_ids int32 [B, L], text_mask bool [B, L]); L = ``length`` or the
  longest prompt rounded up to ``multiple`` (fewer distinct shapes, fewer compiles)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. <s>)")
  longest = max(len(p) for p in prompts)
  width = length or -(-longest // multiple) * multiple
  if longest > width:
    raise ValueError(f"a prompt has {longest} tokens, more than the padded length {width}")
  ids = np.full((len(prompts), width), pad_id, np.int32)
  for row, p in enumerate(prompts):
    ids[row, :len(p)] = p
  return ids, np.arange(width)[None] < np.array([len(p) for p in prompts])[:, None]


def sample_logits(logits, rng, temperature, top_p):
  """int32 [B] from float32 logits [B, V]: argmax when temperature == 0, otherwise a draw
  from softmax(logits / temperature) restricted to the smallest top-p set of tokens."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
  kept = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the top token always stays
  choice = jax.random.categorical(rng, kept, axis=-1)
  drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


def greedy_logits(logits):
  """int32 [B]: the argmax of float32 logits [B, V]."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def choose_token(logits, rng, step, temperature, top_p, *, greedy: bool):
  """int32 [B]: the token of decode step ``step`` (0 = chosen from the prefill's logits).
  Both loops draw with ``fold_in(rng, step)``, so a seed gives one token stream; greedy
  skips the sort over the vocabulary."""
  if greedy:
    return greedy_logits(logits)
  return sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_p)


_choose = jax.jit(choose_token, static_argnames=("greedy",))


class Generator:
  """A MashVLM's parameters with jitted prefill / decode-step functions.

  Decoding always uses the dense attention backend (each step has one query per row);
  remat is turned off (no gradients are taken). ``split_layers`` (default) runs the
  decode steps with one weight buffer per decoder layer (llm.decode_unstacked), which
  avoids copying each layer's weights out of the scanned stack at every step (about 1.6x
  faster per step on CPU) at the cost of a second copy of the decoder's layer weights;
  False steps through the scanned stack (``MashVLM.extend``).

  ``rve``: an analysis.rve.RveConfig (default: ``common.active_enhancement()``).
  ``loop`` picks the decode loop (module docstring), ``generate(loop=...)`` per call;
  both give the same tokens. "device" is the default: on a loaded 2-core CPU it decoded
  1.35x (tiny shape) and 1.13x (small) as many tokens/s end to end as "host"
  (benchmarks/generate.py), and compiles one larger program per prompt width (small:
  ~9 s against ~5 s for the host's prefill). "host" stops earlier when rows end at a
  stop string without ever emitting EOS.
  """

  def __init__(self, model_cfg: ModelConfig, params, tokenizer=None, pad_id: int | None = None,
               split_layers: bool = True, loop: str = "device", rve=None):
    self.loop = _check_loop(loop)
    self.cfg = dataclasses.replace(model_cfg, remat_policy="none", attention_backend="dense")
    self.rve = rve if rve is not None else common.active_enhancement()
    if self.rve is not None:
      self.rve.check_model(self.cfg)
    self.model = mashvlm.MashVLM(self.cfg, rve=self.rve)
    self.params = params
    self.tokenizer = tokenizer
    self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer else 0)
    self.num_video = self.cfg.prefix_len  # M + N (+ the action token)
    self.split_layers = split_layers
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len",))
    if split_layers:
      lm = params["language_model"] if params is not None else {}
      self._lm_rest = {k: v for k, v in lm.items() if k != "layers"}
      self._lm_layers = (jax.jit(llm.unstack_layers, static_argnums=1)(
          lm["layers"], self.cfg.llm.num_layers) if params is not None else None)
      self._decoder = llm.LlamaDecoder(self.cfg.llm, dtype=self.cfg.compute_dtype,
                                       param_dtype=self.cfg.weight_dtype, rve=self.rve,
                                       lora=self.cfg.lora)
      self._step = jax.jit(self._split_step_fn, donate_argnums=(1,))
    else:
      self._step = jax.jit(self._step_fn, donate_argnums=(1,))
    self._device_generate = jax.jit(
        self._device_generate_fn,
        static_argnames=("cache_len", "max_new_tokens", "greedy", "keep_logits"))

  # ------------------------------------------------------------------ jitted pieces

  def _prefill_fn(self, params, frames, text_ids, text_mask, *, cache_len):
    (logits, types, ids), variables = self.model.apply(
        {"params": params}, frames, text_ids, text_mask, cache_len,
        method=mashvlm.MashVLM.prefill, mutable=["cache"])
    last = jnp.sum(text_mask, axis=-1) - 1
    last_logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    pad = jnp.full(types.shape[:1] + (cache_len - types.shape[1],), layout.PAD, types.dtype)
    cache_types = jnp.concatenate([types, pad], axis=-1)
    next_ids = layout.next_position_ids(ids, types)
    index = layout.last_real_index(types) + 1
    cache = variables["cache"]
    if self.split_layers:
      cache = llm.unstack_layers(cache["language_model"]["layers"], self.cfg.llm.num_layers)
    return last_logits, cache, cache_types, next_ids, index

  def _step_inputs(self, cache_types, token, index):
    """Marks slot ``index`` int[B] as text; the step's mask bool [B, 1, cache_len]."""
    rows = jnp.arange(token.shape[0])
    cache_types = cache_types.at[rows, index].set(layout.TEXT)
    return cache_types, layout.text_query_mask(cache_types, index[:, None])

  def _step_fn(self, params, cache, cache_types, token, index, ids):
    """One new token per row at cache slot ``index`` int[B] with ids int[B, 2]."""
    cache_types, mask = self._step_inputs(cache_types, token, index)
    logits, variables = self.model.apply(
        {"params": params, "cache": cache}, token[:, None], ids[:, :, None], mask, index,
        method=mashvlm.MashVLM.extend, mutable=["cache"])
    return logits[:, 0], variables["cache"], cache_types

  def _split_step_fn(self, weights, caches, cache_types, token, index, ids):
    """``_step_fn`` with per-layer weights and caches (llm.decode_unstacked)."""
    rest, layers = weights
    cache_types, mask = self._step_inputs(cache_types, token, index)
    logits, caches = llm.decode_unstacked(self._decoder, rest, layers, caches,
                                          token[:, None], ids[:, :, None], mask, index)
    return logits[:, 0], caches, cache_types

  def _decode_step(self, weights, cache, cache_types, token, index, ids):
    step = self._split_step_fn if self.split_layers else self._step_fn
    return step(weights, cache, cache_types, token, index, ids)

  def _device_generate_fn(self, params, weights, frames, text_ids, text_mask, eos_id, rng,
                          temperature, top_p, *, cache_len, max_new_tokens, greedy,
                          keep_logits):
    """The whole generation as one program: prefill, then a ``lax.while_loop`` of decode
    steps until ``max_new_tokens`` or until every row has emitted ``eos_id`` int32 (-1:
    none). Returns (tokens int32 [B, max_new_tokens], of which the first ``steps`` columns
    are set; steps int32; logits float32 [B, max_new_tokens or 0, vocab])."""
    logits, cache, cache_types, ids, index = self._prefill_fn(
        params, frames, text_ids, text_mask, cache_len=cache_len)
    choose = functools.partial(choose_token, rng=rng, temperature=temperature, top_p=top_p,
                               greedy=greedy)
    batch, vocab = logits.shape
    token = choose(logits, step=0)
    tokens = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
    kept = jnp.zeros((batch, max_new_tokens if keep_logits else 0, vocab), logits.dtype)
    if keep_logits:
      kept = kept.at[:, 0].set(logits)

    def running(carry):
      step, done = carry[0], carry[2]
      return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
      step, token, done, tokens, kept, cache, cache_types, index, ids = carry
      logits, cache, cache_types = self._decode_step(weights, cache, cache_types, token,
                                                     index, ids)
      token = choose(logits, step=step)
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, step, axis=1)
      if keep_logits:
        kept = jax.lax.dynamic_update_index_in_dim(kept, logits, step, axis=1)
      return (step + 1, token, done | (token == eos_id), tokens, kept, cache, cache_types,
              index + 1, ids + 1)

    carry = (jnp.int32(1), token, token == eos_id, tokens, kept, cache, cache_types, index,
             ids)
    steps, _, _, tokens, kept, *_ = jax.lax.while_loop(running, decode, carry)
    return tokens, steps, kept

  # ------------------------------------------------------------------ public API

  def generate(self, frames, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams = SamplingParams(), *, return_logits: bool = False,
               prompt_multiple: int = 8, loop: str | None = None) -> Generation:
    """Continues each prompt (token ids after the video) of the batch.

    Args:
      frames: uint8 [B, T, H, W, 3].
      prompts: B lists of token ids (right-padded here to a multiple of
        ``prompt_multiple``).
      loop: "host" | "device" (default: the Generator's ``loop``).
    """
    loop = self.loop if loop is None else _check_loop(loop)
    sampling = sampling.validate()
    if sampling.stop_strings and self.tokenizer is None:
      raise ValueError("stop_strings need a tokenizer to decode the generated text")
    frames = np.asarray(frames)
    if frames.shape[0] != len(prompts):
      raise ValueError(f"{frames.shape[0]} videos for {len(prompts)} prompts")
    text_ids, text_mask = pad_prompts(prompts, self.pad_id, prompt_multiple)
    cache_len = self.num_video + text_ids.shape[1] + sampling.max_new_tokens
    state = _Rows(len(prompts), sampling, self.tokenizer)
    inputs = (frames, text_ids, text_mask)
    if loop == "device":
      steps, logits = self._generate_on_device(inputs, sampling, state, cache_len,
                                               return_logits)
    else:
      steps, logits = self._generate_on_host(inputs, sampling, state, cache_len,
                                             return_logits)
    return Generation(state.tokens, state.texts(), state.finish, logits, steps)

  def _weights(self):
    """The decode step's weights: (rest, per-layer list) when split, else the params."""
    return (self._lm_rest, self._lm_layers) if self.split_layers else self.params

  def _generate_on_host(self, inputs, sampling, state, cache_len, return_logits):
    """One dispatch per token; the stop conditions checked on the host after each.
    Returns (steps, logits float32 [B, steps, vocab] or None)."""
    logits, cache, cache_types, ids, index = self._prefill(self.params, *inputs,
                                                           cache_len=cache_len)
    rng = jax.random.PRNGKey(sampling.seed)
    temperature, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
    kept_logits = []
    for step in range(sampling.max_new_tokens):
      token = _choose(logits, rng, step, temperature, top_p,
                      greedy=sampling.temperature == 0)
      if return_logits:
        kept_logits.append(np.asarray(logits))
      state.add(np.asarray(token))
      if state.all_done or step == sampling.max_new_tokens - 1:
        break
      logits, cache, cache_types = self._step(self._weights(), cache, cache_types, token,
                                              index, ids)
      index, ids = index + 1, ids + 1
    return step + 1, np.stack(kept_logits, axis=1) if return_logits else None

  def _generate_on_device(self, inputs, sampling, state, cache_len, return_logits):
    """One program (``_device_generate_fn``); EOS checked on the device, stop strings on
    the host afterwards. Returns (steps, logits float32 [B, steps, vocab] or None)."""
    eos_id = -1 if sampling.eos_id is None else sampling.eos_id
    tokens, steps, logits = self._device_generate(
        self.params, self._weights(), *inputs, jnp.int32(eos_id),
        jax.random.PRNGKey(sampling.seed), jnp.float32(sampling.temperature),
        jnp.float32(sampling.top_p), cache_len=cache_len,
        max_new_tokens=sampling.max_new_tokens, greedy=sampling.temperature == 0,
        keep_logits=return_logits)
    steps = int(steps)
    for column in np.asarray(tokens)[:, :steps].T:
      state.add(column)
    return steps, np.asarray(logits[:, :steps]) if return_logits else None

  def generate_text(self, frames, prompts, sampling: SamplingParams = SamplingParams(),
                    **kwargs) -> list[str]:
    """Decoded continuations (needs a tokenizer)."""
    if self.tokenizer is None:
      raise ValueError("generate_text needs a tokenizer")
    return self.generate(frames, prompts, sampling, **kwargs).texts


def _check_loop(loop: str) -> str:
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, found {loop!r}")
  return loop


def stop_forms(stop_strings, tokenizer) -> tuple[str, ...]:
  """Each stop string as given and as ``tokenizer`` writes it back,
  ``decode(encode(s))``, when that differs: a lower-casing word tokenizer decodes "USER:"
  as "user :", which the generated text holds instead of "USER:"."""
  forms = [s for s in stop_strings if s]
  if hasattr(tokenizer, "encode"):
    for s in list(forms):
      ids = tokenizer.encode(s)
      if ids and tokenizer.decode(ids) not in forms:
        forms.append(tokenizer.decode(ids))
  return tuple(form for form in forms if form)


class _Rows:
  """Host-side bookkeeping of the generated tokens and each row's stop condition."""

  def __init__(self, batch: int, sampling: SamplingParams, tokenizer):
    self.sampling, self.tokenizer = sampling, tokenizer
    self.stops = stop_forms(sampling.stop_strings, tokenizer)
    self.tokens = [[] for _ in range(batch)]
    self.finish = ["length"] * batch
    self.done = [False] * batch
    self.cut = [None] * batch  # text with the stop string and after it removed

  @property
  def all_done(self) -> bool:
    return all(self.done)

  def add(self, token: np.ndarray) -> None:
    for row, tok in enumerate(token.tolist()):
      if self.done[row]:
        continue
      if self.sampling.eos_id is not None and tok == self.sampling.eos_id:
        self.done[row], self.finish[row] = True, "eos"
        continue
      self.tokens[row].append(tok)
      if self.stops:
        self._check_stop(row)

  def _check_stop(self, row: int) -> None:
    text = self.tokenizer.decode(self.tokens[row])
    hits = [text.find(s) for s in self.stops if s in text]
    if hits:
      self.done[row], self.finish[row] = True, "stop"
      self.cut[row] = text[:min(hits)]

  def texts(self) -> list | None:
    if self.tokenizer is None:
      return None
    return [cut if cut is not None else self.tokenizer.decode(toks)
            for cut, toks in zip(self.cut, self.tokens)]
