"""KV-cache generation equals recomputing the full sequence; the on-device decode loop
gives the host loop's tokens; decode-step ids and mask equal layout's for the grown
sequence; sampling and stopping rules."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax import layout
from mashvlm_jax.data import tokenizer
from mashvlm_jax.eval import generate
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from conftest import load_config

PROMPT_LENGTHS = (5, 11, 2)  # ragged batch: rows 0 and 2 are right-padded
MAX_NEW = 6


def tiny(ablation: str, rope_mode: str, vocab_size: int | None = None):
  """The tiny config at 32x32 pixels (M=23, N=16) with 2 decoder layers, random weights
  (and ``vocab_size`` tokens instead of 512 when given)."""
  config = load_config("tiny_synthetic", f"ablation={ablation}")
  config.model.vision.image_size = 32
  config.model.llm.num_layers = 2
  if vocab_size:
    config.model.llm.vocab_size = vocab_size
  cfg = dataclasses.replace(ModelConfig.from_dict(config.model), rope_mode=rope_mode)
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(1)))
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, size=(len(PROMPT_LENGTHS), 8, 32, 32, 3)).astype(np.uint8)
  prompts = [list(rng.integers(4, cfg.llm.vocab_size, size=n)) for n in PROMPT_LENGTHS]
  return cfg, params, frames, prompts


def recompute_greedy(cfg, params, frames, prompts, steps):
  """Reference: the full uncached MashVLM forward on the grown rows at every step
  (right-padded to one width, which leaves real logits unchanged), argmax of each row's
  last real position."""
  width = max(map(len, prompts)) + steps
  forward = jax.jit(mashvlm.MashVLM(cfg).apply)
  rows = [list(p) for p in prompts]
  tokens, logits = [[] for _ in rows], []
  for _ in range(steps):
    ids = np.zeros((len(rows), width), np.int32)
    for r, row in enumerate(rows):
      ids[r, :len(row)] = row
    mask = np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]
    out = np.asarray(forward({"params": params}, frames, ids, mask))
    last = out[np.arange(len(rows)), [len(r) - 1 for r in rows]]
    logits.append(last)
    for r, tok in enumerate(last.argmax(-1)):
      rows[r].append(int(tok))
      tokens[r].append(int(tok))
  return tokens, np.stack(logits, axis=1)


@pytest.mark.parametrize("ablation,rope_mode,split_layers", [
    ("mash", "harmonic", True), ("t7_distinct", "distinct", True),  # DST mask
    ("baseline", "distinct", True), ("baseline", "harmonic", True),  # plain causal mask
    ("mash", "harmonic", False),  # steps through the scanned stack (MashVLM.extend)
])
def test_cached_greedy_equals_full_recompute(ablation, rope_mode, split_layers):
  cfg, params, frames, prompts = tiny(ablation, rope_mode)
  gen = generate.Generator(cfg, params, split_layers=split_layers)
  want_tokens, want_logits = recompute_greedy(cfg, params, frames, prompts, MAX_NEW)
  for loop in generate.LOOPS:
    out = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=MAX_NEW),
                       return_logits=True, loop=loop)
    assert out.tokens == want_tokens, loop
    assert out.finish == ["length"] * len(prompts)
    np.testing.assert_allclose(out.step_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_rows_stop_on_eos_while_others_continue():
  cfg, params, frames, prompts = tiny("mash", "harmonic")
  gen = generate.Generator(cfg, params)
  free = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=MAX_NEW))
  # a token some row first emits after step 0 becomes EOS
  row, step = next((r, k) for r, toks in enumerate(free.tokens)
                   for k in range(1, len(toks)) if toks[k] not in toks[:k])
  eos = free.tokens[row][step]
  out = gen.generate(frames, prompts, generate.SamplingParams(max_new_tokens=MAX_NEW,
                                                              eos_id=eos))
  for r, want in enumerate(free.tokens):  # every row stops right before its first EOS
    cut = want.index(eos) if eos in want else len(want)
    assert out.tokens[r] == want[:cut]
    assert out.finish[r] == ("eos" if eos in want else "length")
  assert out.tokens[row] == free.tokens[row][:step]


def eos_for_staggered_stops(rows, max_new):
  """A token every row emits before its last step, chosen so that the rows' first
  occurrences fall on the most distinct steps; None when no token is in every row."""
  common = set.intersection(*(set(r[:max_new - 1]) for r in rows))
  return max(sorted(common), key=lambda tok: len({r.index(tok) for r in rows}), default=None)


class CharTokens:
  """A stand-in tokenizer for stop strings: token t decodes to "<t>"."""
  pad_id = 0

  def decode(self, ids):
    return "".join(f"<{i}>" for i in ids)


@pytest.mark.parametrize("ablation,rope_mode,temperature,split_layers", [
    ("mash", "harmonic", 0.0, True), ("mash", "harmonic", 1.0, True),
    ("baseline", "distinct", 0.0, True), ("baseline", "distinct", 1.0, True),
    ("mash", "harmonic", 0.0, False),  # the scanned stack (MashVLM.extend) in the loop
])
def test_device_loop_gives_the_host_loops_tokens(ablation, rope_mode, temperature,
                                                  split_layers):
  """Same tokens, logits and stop reasons from both loops on a ragged (right-padded)
  batch, free-running and with an EOS at which rows stop at different steps; the device
  loop's step counter shows it stops once every row is done."""
  max_new = 16
  # sampling from 16 tokens makes the rows meet a common token (the EOS) within 16 steps
  cfg, params, frames, prompts = tiny(ablation, rope_mode, 16 if temperature else None)
  prompts = [[t % cfg.llm.vocab_size for t in p] for p in prompts]
  gen = generate.Generator(cfg, params, tokenizer=CharTokens(), split_layers=split_layers)
  sampling = generate.SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                     top_p=0.9, seed=5)
  run = lambda loop, **kw: gen.generate(frames, prompts, dataclasses.replace(sampling, **kw),
                                        return_logits=True, loop=loop)
  host, device = run("host"), run("device")
  assert device.tokens == host.tokens and device.texts == host.texts
  assert host.steps == device.steps == max_new
  np.testing.assert_allclose(device.step_logits, host.step_logits, atol=1e-6, rtol=1e-6)

  eos = eos_for_staggered_stops(host.tokens, max_new)
  assert eos is not None, host.tokens
  host_eos, device_eos = run("host", eos_id=eos), run("device", eos_id=eos)
  stops = [row.index(eos) for row in host.tokens]
  assert len(set(stops)) > 1  # rows finish at different steps
  assert host_eos.tokens == [row[:stop] for row, stop in zip(host.tokens, stops)]
  assert device_eos.tokens == host_eos.tokens
  assert device_eos.finish == host_eos.finish == ["eos"] * len(prompts)
  # the loop ran exactly until the last row's EOS: max(stops) + 1 < max_new tokens chosen
  assert device_eos.steps == host_eos.steps == max(stops) + 1 < max_new
  np.testing.assert_array_equal(device_eos.step_logits, device.step_logits[:, :max(stops) + 1])

  # stop strings are cut on the host afterwards: same tokens and text as the host loop's,
  # whose loop stops at the last row's stop string while the device loop runs to the end
  stop = f"<{host.tokens[0][2]}>"
  host_stop, device_stop = run("host", stop_strings=(stop,)), run("device", stop_strings=(stop,))
  assert device_stop.tokens == host_stop.tokens and device_stop.texts == host_stop.texts
  assert device_stop.finish == host_stop.finish and host_stop.finish[0] == "stop"
  assert device_stop.steps == max_new


def test_loop_must_be_known():
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic").model)
  with pytest.raises(ValueError, match="loop must be one of"):
    generate.Generator(cfg, params=None, loop="gpu")


def test_next_position_ids_continue_both_streams():
  """Ids of appended tokens equal layout.position_ids of the grown, ragged rows."""
  m, n, width, new = 5, 8, 7, 4
  lengths = np.array([7, 3, 1])
  for mode in layout.ROPE_MODES:
    types = layout.text_token_types(np.arange(width)[None] < lengths[:, None], m, n)
    ids = layout.position_ids(types, mode)
    grown_mask = np.arange(width + new)[None] < (lengths + new)[:, None]
    grown = layout.position_ids(layout.text_token_types(grown_mask, m, n), mode)
    for step in range(new):
      got = layout.next_position_ids(ids, types, step)
      want = grown[np.arange(3), :, m + n + lengths + step]
      np.testing.assert_array_equal(got, want, err_msg=f"{mode} step {step}")
    got_jax = layout.next_position_ids(jnp.asarray(ids), jnp.asarray(types), 1)
    np.testing.assert_array_equal(got_jax, layout.next_position_ids(ids, types, 1))


def test_text_query_mask_equals_dst_rows():
  m, n = 4, 6
  types = layout.text_token_types(np.arange(6)[None] < np.array([[6], [2]]), m, n)
  full = layout.dst_mask(types)
  queries = np.array([[m + n, m + n + 3, m + n + 5], [m + n, m + n + 1, m + n + 1]])
  got = layout.text_query_mask(types, queries)
  want = np.take_along_axis(full, queries[..., None], axis=1)
  np.testing.assert_array_equal(got, want)


def test_top_p_keeps_the_nucleus_and_temperature_zero_is_greedy():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.PRNGKey(0)
  drawn = np.asarray(generate.sample_logits(logits, keys, jnp.float32(1.0), jnp.float32(0.7)))
  assert set(np.unique(drawn)) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 is outside
  assert abs((drawn == 0).mean() - 0.5 / 0.8) < 0.03
  everything = np.asarray(generate.sample_logits(logits, keys, jnp.float32(1.0),
                                                 jnp.float32(1.0)))
  assert abs((everything == 3).mean() - 0.05) < 0.015
  greedy = generate.sample_logits(logits[:3], keys, jnp.float32(0.0), jnp.float32(0.1))
  np.testing.assert_array_equal(greedy, [0, 0, 0])


def test_sampling_is_seeded():
  cfg, params, frames, prompts = tiny("mash", "harmonic")
  gen = generate.Generator(cfg, params)
  hot = dict(max_new_tokens=4, temperature=5.0, top_p=0.95)
  a = gen.generate(frames, prompts, generate.SamplingParams(seed=3, **hot)).tokens
  b = gen.generate(frames, prompts, generate.SamplingParams(seed=3, **hot)).tokens
  c = gen.generate(frames, prompts, generate.SamplingParams(seed=4, **hot)).tokens
  assert a == b and a != c


def word_tokenizer(tmp_path):
  """The synthetic set's kind of tokenizer (data/tokenizer.py): lower-cased words and
  punctuation; ids <pad>=0, <unk>=1, <s>=2, </s>=3, then ":"=4, "[MASK]"=5 (always
  there, HACA's mask token), "a"=6, "b"=7, "no"=8, "user"=9, "yes"=10."""
  path = tmp_path / "tokenizer.json"
  tokenizer.save_atomic(tokenizer.build_word_tokenizer(["yes no a b USER:"]), path)
  return tokenizer.Tokenizer(str(path), kind="word")


def test_stop_strings_cut_the_text(tmp_path):
  tok = word_tokenizer(tmp_path)
  assert tok.encode("yes a b no USER:") == [10, 6, 7, 8, 9, 4] and tok.eos_id == 3
  # the word tokenizer decodes "USER:" as "user :" (lower case, punctuation split off)
  rows = generate._Rows(2, generate.SamplingParams(max_new_tokens=5, eos_id=tok.eos_id,
                                                   stop_strings=("user :",)), tok)
  for words in ("yes no", "a user", "b :", "b yes"):  # one step: row 0's, row 1's token
    rows.add(np.array(tok.encode(words)))
  assert rows.finish == ["length", "stop"]
  assert rows.texts() == ["yes a b b", "no "]
  assert rows.tokens[1] == [8, 9, 4]  # no user : (the stop string's tokens kept)
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic").model)
  with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
    generate.Generator(cfg, params=None).generate(
        np.zeros((1, 8, 64, 64, 3), np.uint8), [[2]],
        generate.SamplingParams(stop_strings=("x",)))


def test_stop_string_matches_how_a_word_tokenizer_writes_it(tmp_path):
  from mashvlm_jax.data import tokenizer as tokenizer_lib
  path = tmp_path / "words.json"
  tokenizer_lib.save_atomic(tokenizer_lib.build_word_tokenizer(["USER: hi", "yes no"]), path)
  tok = tokenizer_lib.Tokenizer(str(path), kind="word")
  assert tok.decode(tok.encode("USER:")) == "user :"  # lower-cased, split at punctuation
  assert generate.stop_forms(("USER:", "\n", ""), tok) == ("USER:", "\n", "user :")
  sampling = generate.SamplingParams(max_new_tokens=8, stop_strings=("USER:",))
  rows = generate._Rows(2, sampling, tok)
  for word in ("yes", "user", ":", "hi"):
    rows.add(np.array(tok.encode(word) + tok.encode("no")))
  assert rows.finish == ["stop", "length"]  # the second row never writes the stop string
  assert rows.texts() == ["yes ", "no no no no"]
  assert rows.tokens[0] == tok.encode("yes user :")  # nothing added after the stop
