"""The training loop: sharded jit train step, Orbax checkpoints with exact resume,
preemption handling, metrics (JSONL, TensorBoard, console) and a loss-curve plot.

Workdir layout:
  checkpoints/<step>/   Orbax: train state + per-process data iterator state
  metrics.jsonl         one JSON object per log step
  tensorboard/          event files
  loss_curve.png        written at the end
  config.json           the resolved config
  model_config.json     the model config (export-torch and evaluators read it)
  vocabulary.json       the tokenizer's fingerprint and size: a resumed run, a fine-tuning
                        run (init_from) and evaluation refuse other token ids
  segments.jsonl        one line per start (a resume adds one): the step it started from,
                        the time, the processes and devices, and the code (provenance.py)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import signal
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from mashvlm_jax import paths, provenance
from mashvlm_jax.model import action_token as action_lib
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from mashvlm_jax.train import checkpoint as ckpt_lib
from mashvlm_jax.train import flops as flops_lib
from mashvlm_jax.train import optim
from mashvlm_jax.train import sharding

log = logging.getLogger("mashvlm.train")

BATCH_KEYS = ("frames", "text_ids", "text_mask", "labels", "label_mask")
NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimizer steps taken (= batches consumed)
  params: Any
  opt_state: Any
  rng: jnp.ndarray  # uint32[2]
  nonfinite: jnp.ndarray  # int32 scalar: steps whose update was skipped (non-finite)


def masked_xent(logits, labels, label_mask):
  """(sum of NLL, number of label tokens, number correct) over label_mask."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  weights = label_mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the training keys before anything is built or compiled."""
  required = ("model", "data", "optim", "mesh", "total_steps", "checkpoint_every",
              "log_every", "seed")
  missing = [k for k in required if k not in config]
  if missing:
    raise ValueError(f"config is missing {missing}; see configs/tiny_synthetic.py")
  if config.get("nan_policy", "stop") not in NAN_POLICIES:
    raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, found {config.nan_policy!r}")
  for key in ("total_steps", "checkpoint_every", "log_every"):
    if int(config[key]) <= 0:
      raise ValueError(f"{key} must be positive, found {config[key]}")
  if int(config.get("grad_accum_steps", 1)) <= 0:
    raise ValueError(f"grad_accum_steps must be >= 1, found {config.grad_accum_steps}")


def check_batch_layout(global_batch: int, accum: int, mesh, process_count: int) -> None:
  """Batch must split over processes, gradient-accumulation microbatches and data x fsdp."""
  dp = sharding.data_parallel_size(mesh)
  if global_batch % process_count:
    raise ValueError(f"data.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")
  if global_batch % accum or (global_batch // accum) % dp:
    raise ValueError(f"data.batch_size={global_batch} with grad_accum_steps={accum} gives "
                     f"microbatches of {global_batch / accum:g} rows, which must be divisible "
                     f"by the data-parallel size data x fsdp = {dp}; change data.batch_size, "
                     f"grad_accum_steps or config.mesh")


def head_scales(cfg, batch):
  """float32 [3]: lambda * w_h * max(label tokens, 1) / max(labelled rows of head h, 1)
  over the global batch. The step divides the summed objective by max(label tokens, 1),
  so sum_h scale_h * (sum of CE_h) becomes lambda * w_h * CE_h averaged over labelled rows,
  the same for any gradient accumulation (the counts are data, known before the step)."""
  denom = jnp.maximum(jnp.sum(batch["label_mask"].astype(jnp.float32)), 1.0)
  labelled = jnp.maximum(jnp.sum((batch["class_labels"] >= 0).astype(jnp.float32), 0), 1.0)
  weights = jnp.asarray(cfg.head_weights, jnp.float32)
  return cfg.loss_weight * weights * denom / labelled


def make_train_step(model: nn.Module, tx, schedule, *, accum: int, trainable,
                    unroll_accum: bool = False):
  """(state, batch) -> (state, metrics). Non-finite updates are never applied.

  With ``accum`` > 1 the microbatches run in a scan; ``unroll_accum`` unrolls it, the same
  arithmetic without a loop (``mashvlm compile`` reads the step's cost from that program:
  XLA's cost analysis counts a loop body once).

  Frozen parameters (``trainable`` False) enter the loss behind stop_gradient, so their
  weight gradients are never computed (LoRA: only the adapters' are). With LoRA dropout
  the model gets a "dropout" RNG drawn from the state's RNG per step and microbatch.
  With the model's action token enabled the objective adds lambda * sum_h w_h CE_h
  (model/action_token.py), each CE averaged over the batch's labelled rows, and the
  metrics add lm_loss and per head {head}_loss and {head}_accuracy (labelled rows)."""
  action = model.cfg.action_token if model.cfg.action_token.enabled else None
  dropout = model.cfg.lora.enabled and model.cfg.lora.dropout > 0

  def micro_loss(params, mb, scales, key):
    """(summed objective, aux sums) of one microbatch."""
    params = jax.tree_util.tree_map(
        lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    rngs = {"dropout": key} if dropout else {}
    if action is None:
      logits = model.apply({"params": params}, mb["frames"], mb["text_ids"], mb["text_mask"],
                           rngs=rngs)
      nll, count, correct = masked_xent(logits, mb["labels"], mb["label_mask"])
      return nll, dict(count=count, correct=correct)
    logits, heads = model.apply({"params": params}, mb["frames"], mb["text_ids"],
                                mb["text_mask"], with_heads=True, rngs=rngs)
    nll, count, correct = masked_xent(logits, mb["labels"], mb["label_mask"])
    sums = action_lib.head_xent(heads, mb["class_labels"])
    objective = nll + sum(scales[i] * sums[head][0]
                          for i, head in enumerate(action_lib.HEADS))
    return objective, dict(count=count, correct=correct, nll=nll, heads=sums)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch):
    scales = head_scales(action, batch) if action is not None else None
    key = jax.random.split(state.rng)[1]  # apart from the next state's fold_in(rng, step)
    if accum == 1:
      (nll, aux), grads = grad_fn(state.params, batch, scales, key)
    else:
      # Microbatch i takes rows i, i+accum, ...: every device keeps its own rows.
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
          batch)

      # frozen parameters' gradients are zero: their accumulators are scalars, so
      # no full-size buffer is carried through the loop for them (LoRA: the whole LLM)
      def body(carry, inputs):
        mb, index = inputs
        (nll, aux), grads = grad_fn(state.params, mb, scales, jax.random.fold_in(key, index))
        grads = jax.tree_util.tree_map(lambda g, t: g if t else jnp.zeros((), g.dtype),
                                       grads, trainable)
        acc = jax.tree_util.tree_map(jnp.add, carry, (nll, aux, grads))
        return acc, None

      aux = dict(count=0.0, correct=0.0)
      if action is not None:
        aux.update(nll=0.0, heads={head: (0.0, 0.0, 0.0) for head in action_lib.HEADS})
      zeros = jax.tree_util.tree_map(
          lambda p, t: jnp.zeros_like(p) if t else jnp.zeros((), p.dtype), state.params,
          trainable)
      (nll, aux, grads), _ = jax.lax.scan(body, (0.0, aux, zeros),
                                          (micro, jnp.arange(accum)), unroll=unroll_accum)
      grads = jax.tree_util.tree_map(lambda g, p: jnp.broadcast_to(g, p.shape), grads,
                                     state.params)
    count, correct = aux["count"], aux["correct"]
    denom = jnp.maximum(count, 1.0)
    # in the parameters' dtype: a float32 division would turn bf16 optimizer state into
    # float32 after one step (a recompile, and checkpoints unlike the abstract state)
    grads = jax.tree_util.tree_map(lambda g, p: (g / denom).astype(p.dtype), grads,
                                   state.params)
    loss = nll / denom
    grad_norm = optax.tree.norm(
        jax.tree_util.tree_map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable))
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # the update too: a non-finite learning rate makes NaN parameters from finite grads
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                           opt_state=keep(new_opt, state.opt_state),
                           rng=jax.random.fold_in(state.rng, state.step),
                           nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
    metrics = dict(loss=loss, accuracy=correct / denom, grad_norm=grad_norm,
                   lr=schedule(state.step), answer_tokens=count,
                   nonfinite=new_state.nonfinite)
    if action is not None:
      metrics.update(lm_loss=aux["nll"] / denom)
      for head, (xent, labelled, right) in aux["heads"].items():
        rows = jnp.maximum(labelled, 1.0)
        metrics.update({f"{head}_loss": xent / rows, f"{head}_accuracy": right / rows})
      metrics.update(labelled_rows=aux["heads"]["verb"][1])
    return new_state, metrics

  return train_step


@dataclasses.dataclass
class Setup:
  """Everything built from the config before the first step."""
  model_cfg: ModelConfig
  model: nn.Module
  mesh: Any
  tx: Any
  schedule: Any
  abstract_state: TrainState
  state_shardings: TrainState
  batch_shardings: dict
  trainable: Any


def build(config: ml_collections.ConfigDict, mesh=None) -> Setup:
  """Validates the config and builds mesh, model, optimizer and shardings (no compile)."""
  validate_config(config)
  model_cfg = ModelConfig.from_dict(config.model)
  mesh = mesh or sharding.make_mesh(config.mesh)
  accum = int(config.get("grad_accum_steps", 1))
  check_batch_layout(int(config.data.batch_size), accum, mesh, jax.process_count())
  boxed = jax.eval_shape(lambda r: mashvlm.MashVLM(model_cfg).init(
      r, *mashvlm.dummy_inputs(model_cfg))["params"], jax.random.PRNGKey(0))
  param_shardings = sharding.param_shardings(boxed, mesh)
  abstract_params = nn.unbox(boxed)
  optim_cfg = dict(config.optim)
  optim_cfg["freeze"] = list(optim_cfg.get("freeze", ())) + (
      ["^vision_tower/"] if model_cfg.freeze_vision else []) + optim.lora_freeze(
          model_cfg.lora.enabled)
  tx, schedule = optim.make_optimizer(abstract_params, optim_cfg, int(config.total_steps))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  repl = sharding.replicated(mesh)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen params: no optimizer state
  opt_shardings = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt,
                                        param_shardings, transform_non_params=lambda _: repl,
                                        is_leaf=masked)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  abstract_state = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt,
                              rng=jax.ShapeDtypeStruct((2,), jnp.uint32), nonfinite=scalar)
  state_shardings = TrainState(step=repl, params=param_shardings, opt_state=opt_shardings,
                               rng=repl, nonfinite=repl)
  batch_ndims = dict(frames=5, text_ids=2, text_mask=2, labels=2, label_mask=2)
  if model_cfg.action_token.enabled:
    batch_ndims.update(class_labels=2)
  batch_shardings = {k: sharding.batch_sharding(mesh, n) for k, n in batch_ndims.items()}
  return Setup(model_cfg, mashvlm.MashVLM(model_cfg), mesh, tx, schedule, abstract_state,
               state_shardings, batch_shardings, optim.trainable_mask(abstract_params,
                                                                      optim_cfg))


def with_shardings(abstract, shardings):
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(setup: Setup, seed: int) -> TrainState:
  """Fresh parameters and optimizer state, created directly in their shardings."""
  def init(rng):
    params = nn.unbox(mashvlm.MashVLM(setup.model_cfg).init(
        rng, *mashvlm.dummy_inputs(setup.model_cfg))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=setup.tx.init(params), rng=jax.random.fold_in(rng, 1),
                      nonfinite=jnp.zeros((), jnp.int32))
  return jax.jit(init, out_shardings=setup.state_shardings)(jax.random.PRNGKey(seed))


def load_initial_params(config, setup: Setup, state: TrainState, directory: str) -> TrainState:
  """Replaces the parameters found in ``directory`` (``init_from``): an ``import-hf``
  output, a trainer workdir (its latest step) or one of its step directories. Parameters
  only: the optimizer state stays fresh and the step counter at 0; what the checkpoint
  does not carry (e.g. a projector, LoRA adapters) keeps its fresh initialisation. The model config
  stored with the checkpoint must agree with ``config.model`` (ValueError naming each
  differing field)."""
  from flax import traverse_util
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.data import registry
  stored = params_io.resolve_checkpoint(directory)[2]
  # a LoRA run may start from a checkpoint without adapters (or with other ones)
  params_io.check_model_config(config, stored / params_io.CONFIG_FILE, ignore=("lora",))
  registry.check_vocabulary_file(config, stored / registry.VOCABULARY_FILE)
  loaded = traverse_util.flatten_dict(params_io.load_params(directory)[0], sep="/")
  fresh = traverse_util.flatten_dict(state.params, sep="/")
  shardings = traverse_util.flatten_dict(setup.state_shardings.params, sep="/")
  unknown = sorted(set(loaded) - set(fresh))
  if unknown:
    raise ValueError(f"{directory}: parameters not in this model: {unknown[:5]}")
  for name, value in loaded.items():
    if tuple(value.shape) != tuple(fresh[name].shape):
      raise ValueError(f"{directory}: {name} has shape {tuple(value.shape)}, the config "
                       f"expects {tuple(fresh[name].shape)}")
  merged = {name: jax.device_put(np.asarray(loaded[name], fresh[name].dtype), shardings[name])
            if name in loaded else fresh[name] for name in fresh}
  log.info("initialised %d of %d parameter arrays from %s", len(loaded), len(fresh), directory)
  return state.replace(params=traverse_util.unflatten_dict(merged, sep="/"))


class PreemptionFlag:
  """Set by SIGTERM (TPU preemption notice); the loop saves and exits at the next step."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def batch_fingerprint(batch: dict) -> str:
  h = hashlib.sha1()
  for key in BATCH_KEYS + tuple(k for k in ("class_labels",) if k in batch):
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()[:16]


def drop_lines_after(path: epath.Path, step: int) -> None:
  """Removes the lines of the metrics file ``path`` logged after ``step``: a run that
  stopped between two checkpoints logged steps that its resume repeats, and each step
  must appear once. The file is replaced in one rename, never left half-written."""
  if not path.exists():
    return

  def logged_at_or_before(line: str) -> bool:
    try:
      return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):  # a line torn by the kill that stopped the run
      return False

  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines if line.strip() and logged_at_or_before(line)]
  if len(kept) == len(lines):
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text("".join(kept))
  tmp.replace(path)
  log.info("%s: dropped %d lines logged after step %d (the run resumes from it)", path,
           len(lines) - len(kept), step)


SEGMENTS_FILE = "segments.jsonl"


def record_segment(workdir: epath.Path, start_step: int, total_steps: int) -> None:
  """Appends one line to ``segments.jsonl`` for this start of training: the step it starts
  from, the time, the processes and devices, and the code (git commit, library versions).
  A resumed run thus says which code trained which steps."""
  line = {"start_step": start_step, "total_steps": total_steps,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "processes": jax.process_count(), "devices": jax.device_count(),
          "platform": jax.devices()[0].platform, "code": provenance.code_version()}
  with (workdir / SEGMENTS_FILE).open("a") as f:
    f.write(json.dumps(line, sort_keys=True) + "\n")


class MetricsLogger:
  """JSONL + TensorBoard + console progress bar, written by process 0 only."""

  def __init__(self, workdir: epath.Path, total_steps: int, start_step: int):
    self.active = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    if not self.active:
      return
    from tensorboardX import SummaryWriter
    from tqdm import tqdm
    self.tb = SummaryWriter(str(workdir / "tensorboard"))
    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                    dynamic_ncols=True)
    drop_lines_after(self.path, start_step)
    self.file = self.path.open("a")

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    self.file.write(json.dumps({"step": step, **metrics}) + "\n")
    self.file.flush()
    for key, value in metrics.items():
      self.tb.add_scalar(f"train/{key}", value, step)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.3f}",
                         mfu=f"{metrics.get('mfu', float('nan')):.3f}")

  def advance(self, steps: int = 1) -> None:
    if self.active:
      self.bar.update(steps)

  def close(self) -> None:
    if self.active:
      self.bar.close()
      self.tb.close()
      self.file.close()


class StepWindow:
  """The steps since the last reset (a log step, or a step that compiled): their sequence
  positions (padding included), real tokens (video + unpadded text) and model FLOPs."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start, self.steps = time.perf_counter(), 0
    self.positions = self.real_tokens = self.flops = 0.0

  def add(self, positions: float, real_tokens: float, flops: float) -> None:
    self.steps += 1
    self.positions += positions
    self.real_tokens += real_tokens
    self.flops += flops

  def rates(self, peak_flops: float) -> dict:
    """step_time (s), tokens_per_s (positions), real_tokens_per_s and mfu."""
    elapsed = time.perf_counter() - self.start
    return dict(step_time=elapsed / self.steps, tokens_per_s=self.positions / elapsed,
                real_tokens_per_s=self.real_tokens / elapsed,
                mfu=self.flops / elapsed / peak_flops)


def plot_loss_curve(metrics_path: epath.Path, out: epath.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
  ax2 = ax.twinx()
  ax2.plot([r["step"] for r in rows], [r["accuracy"] for r in rows], color="tab:orange",
           label="answer-token accuracy")
  ax.set_xlabel("step")
  ax.set_ylabel("answer-token cross-entropy")
  ax2.set_ylabel("accuracy")
  ax2.set_ylim(0, 1)
  fig.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(str(out))
  plt.close(fig)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

  Returns a summary dict (final step, last metrics, paths, preempted flag).
  """
  from mashvlm_jax.convert import params_io
  from mashvlm_jax.data import buckets as buckets_lib
  from mashvlm_jax.data import pipeline, registry

  workdir = epath.Path(paths.local_path(str(workdir)))
  setup = build(config)
  total = int(config.total_steps)
  pipeline.ensure_built(config)
  iterator = pipeline.make_iterator(config, "train", seed=int(config.seed))

  workdir.mkdir(parents=True, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints",
                                       keep=int(config.get("keep_checkpoints", 3)),
                                       use_async=bool(config.get("async_checkpointing", True)),
                                       timeout_s=int(config.get("checkpoint_timeout_s",
                                                                ckpt_lib.DEFAULT_TIMEOUT_S)))
  latest = checkpointer.latest_step()
  if latest is not None:  # resuming: the same model and the same token ids
    params_io.check_model_config(config, workdir / params_io.CONFIG_FILE)
    registry.check_vocabulary_file(config, workdir / registry.VOCABULARY_FILE)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    # what export-torch and evaluators read with a checkpoint (convert/params_io.py)
    (workdir / params_io.CONFIG_FILE).write_text(
        json.dumps(setup.model_cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    (workdir / registry.VOCABULARY_FILE).write_text(
        json.dumps(registry.vocabulary_record(config), indent=2, sort_keys=True) + "\n")
  if latest is not None:
    state, data_state, counters = checkpointer.restore(
        latest, with_shardings(setup.abstract_state, setup.state_shardings))
    iterator.set_state(data_state)
    log.info("resumed from %s at step %d", checkpointer.directory, latest)
  else:
    counters = {}
    state = init_state(setup, int(config.seed))
    if config.get("init_from"):
      state = load_initial_params(config, setup, state, config.init_from)

  step_fn = jax.jit(
      make_train_step(setup.model, setup.tx, setup.schedule,
                      accum=int(config.get("grad_accum_steps", 1)), trainable=setup.trainable),
      in_shardings=(setup.state_shardings, setup.batch_shardings),
      out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
      donate_argnums=(0,))

  start = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    record_segment(workdir, start, total)
  logger = MetricsLogger(workdir, total, start)
  fingerprints = (workdir / "batches.jsonl").open("a") if (
      config.get("log_batch_fingerprints", False) and jax.process_index() == 0) else None
  rows_per_step = int(config.data.batch_size)
  batch_keys = pipeline.batch_keys(setup.model_cfg.action_token.enabled)
  prefix = setup.model_cfg.prefix_len  # M + N (+ the action token)
  # data.text_buckets: batches come at a few text lengths; each compiles once, and the
  # throughput metrics count every step at its own length.
  flops_per_row = functools.lru_cache(maxsize=None)(
      lambda length: flops_lib.train_flops_per_row(setup.model_cfg, length))
  compiled_lengths: set = set()
  device = jax.devices()[0]
  peak, _ = flops_lib.peak_flops_per_device(device.device_kind, device.platform)
  peak_total = peak if device.platform == "cpu" else peak * jax.device_count()
  nan_policy = config.get("nan_policy", "stop")
  last_metrics: dict = {}
  preempted = False
  window = StepWindow()
  # undecodable records skipped by this process in the whole run (saved with checkpoints)
  read_failures = int(counters.get("read_failures", 0))

  def save(step):
    checkpointer.save(step, state, iterator.get_state(), {"read_failures": read_failures})

  try:
    with PreemptionFlag() as flag:
      for step in range(start + 1, total + 1):
        local = next(iterator)
        # jpeg/source storage: undecodable records skipped for this batch (storage.py)
        read_failures += int(np.sum(local.get("read_failures", 0)))
        local = {k: np.asarray(local[k]) for k in batch_keys}
        text_len = int(local["text_ids"].shape[1])
        text_tokens = int(local["text_mask"].sum()) * jax.process_count()  # global, estimated
        if fingerprints:
          fingerprints.write(json.dumps({"step": step, "batch": batch_fingerprint(local)}) + "\n")
          fingerprints.flush()
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
          state, metrics = step_fn(state, sharding.global_batch(local, setup.mesh))
        window.add(positions=rows_per_step * (prefix + text_len),
                   real_tokens=rows_per_step * prefix + text_tokens,
                   flops=rows_per_step * flops_per_row(text_len))
        logger.advance()
        if text_len not in compiled_lengths:  # keep compilation out of the step-time window
          compiled_lengths.add(text_len)
          jax.block_until_ready(metrics)
          window.reset()
        is_log = step % int(config.log_every) == 0 or step == total
        is_save = step % int(config.checkpoint_every) == 0 or step == total
        stop_now = flag.raised or checkpointer.reached_preemption(step)
        if is_log or is_save or stop_now:
          metrics = jax.device_get(metrics)
          if int(metrics["nonfinite"]) and nan_policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at or before step {step}; the update was not "
                f"applied and no checkpoint was written after it (latest good: "
                f"{checkpointer.latest_step()}). Set nan_policy='skip' to skip such steps.")
        if is_log:
          last_metrics = {k: float(v) for k, v in metrics.items()}
          # this step's batch: its text length and share of padded text positions (this
          # process's rows; all of them on one host)
          last_metrics.update(text_len=text_len,
                              padded_share=buckets_lib.padded_share(local["text_mask"]))
          if read_failures:
            last_metrics.update(read_failures=read_failures)
          if window.steps:  # no timing when the window only held a compiling step
            last_metrics.update(window.rates(peak_total))
          logger.write(step, last_metrics)
          window.reset()
        if is_save or stop_now:
          save(step)
        else:
          checkpointer.check()  # a failed background save stops the run here
        if stop_now:
          preempted = step < total
          log.warning("preemption signal: saved step %d, exiting", step)
          break
  finally:
    logger.close()
    if fingerprints:
      fingerprints.close()
    try:
      checkpointer.wait()  # raises CheckpointSaveError if the last save failed
    finally:
      checkpointer.close()

  final_step = int(jax.device_get(state.step))
  plot = workdir / "loss_curve.png"
  if jax.process_index() == 0 and logger.path.exists() and logger.path.read_text().strip():
    plot_loss_curve(logger.path, plot)
  return dict(step=final_step, metrics=last_metrics, preempted=preempted,
              checkpoints=str(checkpointer.directory), metrics_file=str(logger.path),
              plot=str(plot), tensorboard=str(workdir / "tensorboard"), state=state,
              setup=setup)
