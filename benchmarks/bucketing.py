"""Text-length buckets: padded share and train throughput with and without
``data.text_buckets``, side by side, on the tiny model at an instruction-tuning text
length (text_len 512, buckets 128/256/512, batch 16) on this machine's CPU.

    python benchmarks/bucketing.py [--steps 5] [--buckets 128,256,512] [--lengths FILE]

One stream of 20000 rows (text token counts below) is cut into batches twice: without
buckets every batch is the next 16 rows padded to 512; with them ``data/buckets.py``'s
BucketPlanner (the one the pipeline runs) forms one-bucket batches. The padded share is
exact over the stream. Throughput: the train step (train/trainer.py make_train_step,
jitted, the tiny model) is timed at each text length that occurs (median of ``--steps``
steps after compiling), and each mode's batches are charged the measured time of their
length, so rare buckets count at their long-run frequency without timing a thousand
steps. Reported: padded share, seconds per step, sequence positions/s (padding included),
real tokens/s (video tokens + unpadded text: the work that trains the model), rows/s, MFU,
and the 7B config's analytic train FLOPs per row for the same batches (an estimate).

The length distribution (``--lengths FILE`` replaces it with measured counts, one per
line, e.g. the ``text_mask`` sums of a real pipeline). It models the instruction mix the
MASH-VLM paper trains on (Sec. 5.1: VideoChatGPT-100k, VideoChat-11k, WebVid, NExT-QA,
CLEVRER, Kinetics-710, Something-Something-2; about 430k rows in all). The weights of its
two components come from those counts: the two long-form conversation/description sets
(VideoChatGPT-100k + VideoChat-11k = 111k, 26%) and the rest (74%: captions, QA,
multiple choice, classification with answers of a few words to a sentence). The token
counts of each component are NOT fitted to published statistics: no per-token length
statistics of these sets could be found from this machine. They are assumptions, stated
here so they can be checked and replaced: a log-normal per component, short rows with a
median of 72 tokens (Vicuna system prompt ~35 + question ~25 + answer ~10) and sigma 0.35,
long rows with a median of 260 tokens and sigma 0.45 (a paragraph-long answer); counts are
clipped to [12, text_len] as the pipeline truncates to text_len. Treat the gain as what
this shape of distribution gives, and rerun with ``--lengths`` on your data.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mashvlm_jax.train import cpu_tuning  # noqa: E402

cpu_tuning.keep_freed_host_memory()  # before JAX starts its CPU client, as `mashvlm train`

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mashvlm_jax.data import buckets as buckets_lib  # noqa: E402
from mashvlm_jax.model import mashvlm  # noqa: E402
from mashvlm_jax.model.config import ModelConfig  # noqa: E402
from mashvlm_jax.train import flops as flops_lib  # noqa: E402
from mashvlm_jax.train import optim, trainer  # noqa: E402

# (weight, median tokens, log-normal sigma): see the module docstring
MIX = ((0.74, 72.0, 0.35), (0.26, 260.0, 0.45))
MIN_TOKENS = 12  # <s>, USER:, ASSISTANT:, a one-word question and answer, </s>


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sample_lengths(count: int, text_len: int, seed: int) -> np.ndarray:
  """int [count] text token counts from MIX, clipped to [MIN_TOKENS, text_len]."""
  rng = np.random.default_rng(seed)
  weights = np.array([w for w, _, _ in MIX])
  part = rng.choice(len(MIX), size=count, p=weights / weights.sum())
  medians = np.array([m for _, m, _ in MIX])[part]
  sigmas = np.array([s for _, _, s in MIX])[part]
  lengths = np.exp(np.log(medians) + sigmas * rng.standard_normal(count))
  return np.clip(np.round(lengths), MIN_TOKENS, text_len).astype(int)


def read_lengths(path: str, text_len: int) -> np.ndarray:
  lengths = []
  for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), 1):
    if line.strip():
      try:
        lengths.append(int(line))
      except ValueError:
        raise SystemExit(f"{path} line {number}: expected one token count, found "
                         f"{line!r}") from None
  if not lengths or min(lengths) < 2:
    raise SystemExit(f"{path}: needs token counts >= 2 (one per line)")
  return np.minimum(np.asarray(lengths), text_len)


def plan(lengths: np.ndarray, batch: int, buckets) -> list[tuple[int, np.ndarray]]:
  """(padded length, row indices) of every batch the planner forms from the stream."""
  planner = buckets_lib.BucketPlanner(buckets, batch)
  out = []
  for position, length in enumerate(lengths):
    emitted = planner.add(position, int(length))
    if emitted:
      out.append((emitted[0], np.asarray(emitted[1])))
  return out


def make_batch(cfg: ModelConfig, lengths, padded: int, rng) -> dict:
  """Batch-contract arrays: random tokens on the real positions, the second half of each
  row's text as its answer."""
  rows = len(lengths)
  size, vocab = cfg.vision.image_size, cfg.llm.vocab_size
  mask = np.arange(padded)[None, :] < np.asarray(lengths)[:, None]
  ids = np.where(mask, rng.integers(3, vocab, (rows, padded)), 0).astype(np.int32)
  labels = np.zeros_like(ids)
  labels[:, :-1] = ids[:, 1:]
  answer = (np.arange(padded)[None, :] >= (np.asarray(lengths) // 2)[:, None])
  label_mask = (answer & (np.arange(padded)[None, :] < np.asarray(lengths)[:, None] - 1))
  return dict(frames=rng.integers(0, 256, (rows, cfg.num_frames, size, size, 3), np.uint8),
              text_ids=ids, text_mask=mask, labels=labels,
              label_mask=label_mask.astype(np.float32))


def train_state_and_step(cfg: ModelConfig):
  optim_cfg = dict(lr=1e-4, warmup_steps=10, final_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                   weight_decay=0.01, clip_norm=1.0, freeze=["^vision_tower/"],
                   lr_multipliers={}, no_decay=r"(norm|bias)")
  params = nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0)))
  tx, schedule = optim.make_optimizer(params, optim_cfg, total_steps=1000)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
                             nonfinite=jnp.zeros((), jnp.int32))
  step = jax.jit(trainer.make_train_step(mashvlm.MashVLM(cfg), tx, schedule, accum=1,
                                         trainable=optim.trainable_mask(params, optim_cfg)),
                 donate_argnums=(0,))
  return state, step


def step_seconds(cfg: ModelConfig, batch: dict, steps: int) -> float:
  """Median seconds of a train step on ``batch`` (compiled and run twice before)."""
  state, step = train_state_and_step(cfg)
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5, help="timed steps per text length")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--text_len", type=int, default=512)
  parser.add_argument("--buckets", default="128,256,512")
  parser.add_argument("--rows", type=int, default=20000, help="rows in the planned stream")
  parser.add_argument("--lengths", default="", help="file of token counts, one per line")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  buckets = tuple(int(b) for b in args.buckets.split(","))
  if buckets[-1] != args.text_len:
    raise SystemExit(f"--buckets {buckets} must end with --text_len {args.text_len}")
  cfg = ModelConfig.from_dict(load_config("tiny_synthetic").model.to_dict())
  big = ModelConfig.from_dict(load_config("mashvlm_7b").model.to_dict())
  m, n = cfg.video_token_counts
  if args.lengths:
    stream = read_lengths(args.lengths, args.text_len)
    source = f"{args.lengths} ({len(stream)} rows)"
  else:
    stream = sample_lengths(args.rows, args.text_len, args.seed)
    source = "the documented MIX (module docstring: an assumption, not data)"
  per_bucket = np.bincount([buckets_lib.bucket_index(int(x), buckets) for x in stream],
                           minlength=len(buckets)) / len(stream)
  print(f"text lengths from {source}: mean {stream.mean():.0f}, median "
        f"{np.median(stream):.0f}, p90 {np.percentile(stream, 90):.0f}, max {stream.max()}; "
        f"rows per bucket " + ", ".join(f"{b}: {s:.1%}" for b, s in zip(buckets, per_bucket)))
  modes = {"without": plan(stream, args.batch, (args.text_len,)),
           f"buckets {args.buckets}": plan(stream, args.batch, buckets)}
  rng = np.random.default_rng(args.seed)
  seconds = {}  # measured step time per text length, on the first planned batch of it
  for length in sorted({l for batches in modes.values() for l, _ in batches}):
    rows = next(r for batches in modes.values() for l, r in batches if l == length)
    seconds[length] = step_seconds(cfg, make_batch(cfg, stream[rows], length, rng), args.steps)
  peak = flops_lib.measured_matmul_peak()
  print(f"tiny model (video M+N = {m + n} tokens), batch {args.batch}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {os.cpu_count()} cores, f32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; measured s/step (median of {args.steps}) per text length: "
        + ", ".join(f"{l}: {t:.3f}" for l, t in seconds.items()))
  print(f"{'mode':<24} {'batches':>8} {'padded':>7} {'s/step':>7} {'positions/s':>12} "
        f"{'real tok/s':>11} {'rows/s':>7} {'MFU':>6} {'speedup':>8} {'7B TFLOP/row':>13}")
  base = None
  for name, batches in modes.items():
    rows = args.batch * len(batches)
    text = sum(int(stream[r].sum()) for _, r in batches)
    positions = sum(args.batch * length for length, _ in batches)
    total = sum(seconds[length] for length, _ in batches)
    real = rows * (m + n) + text
    flops = sum(args.batch * flops_lib.train_flops_per_row(cfg, l) for l, _ in batches)
    big_flops = sum(args.batch * flops_lib.train_flops_per_row(big, l) for l, _ in batches)
    base = base or real / total
    print(f"{name:<24} {len(batches):>8} {1 - text / positions:>7.1%} "
          f"{total / len(batches):>7.3f} {(rows * (m + n) + positions) / total:>12.0f} "
          f"{real / total:>11.0f} {rows / total:>7.1f} {flops / total / peak:>6.3f} "
          f"{real / total / base:>7.2f}x {big_flops / rows / 1e12:>13.2f}")
  print("Throughput: each mode's planned batches over the stream, each at the measured step "
        "time of its text length. 7B TFLOP/row: the 7B config's analytic train FLOPs "
        "(train/flops.py) for the same batches, an estimate, not a measurement.")


if __name__ == "__main__":
  main()
