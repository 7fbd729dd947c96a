"""Entailment pairs and retrieval (eval/entailment.py): the metrics against hand-computed
cases, and `mashvlm eval --benchmark=entailment|retrieval` end to end on a random tiny
checkpoint, every P(yes) checked against a full forward of the prompt written out here."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli
from mashvlm_jax.convert import params_io
from mashvlm_jax.data import pipeline, registry, synthetic
from mashvlm_jax.eval import entailment
from mashvlm_jax.model import mashvlm
from mashvlm_jax.model.config import ModelConfig
from test_eval_values import FullForward, count_work, sharpened, tiny_eval_config


# ------------------------------------------------------------------------------ metrics

def test_pair_accuracy_hand_computed_and_strict():
  # pairs: 0.9 > 0.1 right; 0.5 = 0.5 a tie, wrong; 0.3 < 0.4 wrong; 0.2 > 0.1 right
  assert entailment.pair_accuracy([0.9, 0.5, 0.3, 0.2], [0.1, 0.5, 0.4, 0.1]) == 0.5
  assert entailment.pair_accuracy([1.0], [0.0]) == 1.0
  with pytest.raises(ValueError, match="equal-length"):
    entailment.pair_accuracy([0.1, 0.2], [0.1])


def test_average_precision_hand_computed():
  # ranked: 0.9 (rel) 0.8 0.7 (rel) 0.6 0.5 (rel): precisions 1/1, 2/3, 3/5
  scores = [0.7, 0.5, 0.9, 0.6, 0.8]
  relevant = [1, 1, 1, 0, 0]
  want = (1 / 1 + 2 / 3 + 3 / 5) / 3
  assert entailment.average_precision(scores, relevant) == pytest.approx(want, abs=1e-12)
  # the relevant item last of four: 1/4; first: 1
  assert entailment.average_precision([0.4, 0.3, 0.2, 0.1], [0, 0, 0, 1]) == 0.25
  assert entailment.average_precision([0.4, 0.3], [1, 0]) == 1.0
  # ties keep the given order: the relevant item second at equal scores: 1/2
  assert entailment.average_precision([0.5, 0.5], [0, 1]) == 0.5
  with pytest.raises(ValueError, match="no relevant item"):
    entailment.average_precision([0.1, 0.2], [0, 0])


def test_mean_average_precision_is_the_mean_over_queries():
  scores = [[0.7, 0.5, 0.9, 0.6, 0.8], [0.4, 0.3, 0.2, 0.1, 0.0]]
  relevant = [[1, 1, 1, 0, 0], [0, 0, 0, 1, 0]]
  want = ((1 + 2 / 3 + 3 / 5) / 3 + 1 / 4) / 2
  assert entailment.mean_average_precision(scores, relevant) == pytest.approx(want, abs=1e-12)
  with pytest.raises(ValueError, match=r"\[Q, N\]"):
    entailment.mean_average_precision([0.1, 0.2], [1, 0])


def test_score_pairs_per_type_and_split():
  def rows(split, clip, pair, kind, p_pos, p_neg):
    return [dict(split=split, id=clip, pair=pair, type=kind, answer="Yes", p_yes=p_pos),
            dict(split=split, id=clip, pair=pair, type=kind, answer="No", p_yes=p_neg)]
  predictions = (rows("a", "c0", 0, "action", 0.9, 0.1) + rows("a", "c0", 1, "scene", 0.2, 0.3)
                 + rows("b", "c1", 0, "action", 0.4, 0.4) + rows("b", "c1", 1, "scene", 0.6, 0.5)
                 + [dict(split="b", id="c2", pair=0, type="action", answer="Yes", p_yes=1.0)])
  result = entailment.score_pairs(predictions)
  assert result["pair_accuracy"] == 50.0  # 2 of 4
  assert result["by_type"] == {"action": 50.0, "scene": 50.0}
  assert result["by_split"] == {"a": 50.0, "b": 50.0}
  assert result["incomplete_pairs"] == 1 and result["counts"]["pairs"] == 4


# ------------------------------------------------------------------------------ end to end


OVERRIDES = [f"--config={ROOT / 'configs' / 'tiny_synthetic.py'}",
             "--config.model.vision.image_size=32", "--config.model.llm.num_layers=2",
             "--config.model.llm.vocab_size=256", "--config.data.builder_config=tiny",
             "--config.data.train_size=2", "--config.data.test_size=4",
             "--config.data.data_dir=data"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A random sharpened checkpoint in a fresh directory, both benchmarks run on it by the
  CLI with relative paths; (root, config, cfg, params)."""
  root = tmp_path_factory.mktemp("haca_eval")
  config = tiny_eval_config(root / "data")
  config.data.test_size = 4
  registry.ensure_built(config)
  cfg = ModelConfig.from_dict(config.model)
  params = sharpened(nn.unbox(mashvlm.init_params(cfg, jax.random.PRNGKey(0))))
  params_io.save_params(root / "ckpt", params, cfg)
  for benchmark in ("entailment", "retrieval"):
    run_cli("eval", *OVERRIDES, "--checkpoint=ckpt", f"--benchmark={benchmark}",
            f"--out=out/{benchmark}", cwd=root)
  return root, config, cfg, params


def reference_p_yes(config, cfg, params, rows, frames_of):
  """P(yes) of each row by a full forward of ``<s> USER: {question} ASSISTANT:`` with the
  question written out here, as the word tokenizer's own ids."""
  import tokenizers
  tok = registry.load_tokenizer(config)
  raw = tokenizers.Tokenizer.from_file(tok.path)
  enc = lambda text: raw.encode(text, add_special_tokens=False).ids  # noqa: E731
  prompts = [[tok.bos_id] + enc("USER:") + enc(
      "Does this caption accurately describe the video? Caption: " + r["caption"])
      + enc("ASSISTANT:") for r in rows]
  reference = FullForward(cfg, params, width=max(map(len, prompts)))
  yes = enc("Yes")[0]
  logp = reference.next_logprobs([frames_of[r["id"]] for r in rows], prompts)
  return np.array([np.exp(lp[yes]) for lp in logp])


def frames_by_id(config, splits):
  out = {}
  for split in splits:
    for record in pipeline.make_eval_records(config, split):
      out[record["id"]] = record["frames"]
  return out


def read_jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_eval_entailment_end_to_end(evaluated):
  root, config, cfg, params = evaluated
  out = root / "out" / "entailment"
  rows = read_jsonl(out / "predictions.jsonl")
  result = json.loads((out / "result.json").read_text())
  splits = ("test_typical", "test_unusual", "test_scene_only")
  assert len(rows) == 3 * 4 * 2 * 2  # splits x clips x pairs x (positive, negative)
  # The synthetic pairs: the true caption and per contrast type its swap.
  specs = {s.id: s for split in splits for s in synthetic.clip_specs(split, 4)}
  for r in rows:
    spec = specs[r["id"]]
    phrase = synthetic.SCENE_PHRASES[spec.scene]
    truth = (f"A person is {spec.action} {phrase}." if spec.action
             else f"There is no one {phrase}.")
    assert (r["caption"] == truth) == (r["answer"] == "Yes")
    if r["answer"] == "No" and r["type"] == "action" and spec.kind == "unusual":
      assert r["caption"] == f"A person is {synthetic.TYPICAL_ACTION[spec.scene]} {phrase}."
    if r["answer"] == "No" and r["type"] == "person":
      assert r["caption"] == f"A person is {synthetic.TYPICAL_ACTION[spec.scene]} {phrase}."
  want = reference_p_yes(config, cfg, params, rows, frames_by_id(config, splits))
  got = np.array([r["p_yes"] for r in rows])
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-7)
  assert np.ptp(got) > 1e-3  # the sharpened model's P(yes) depends on the row
  # Pair accuracy by hand from the reference probabilities.
  by_pair = {}
  for r, p in zip(rows, want):
    by_pair.setdefault((r["split"], r["id"], r["pair"], r["type"]), {})[r["answer"]] = p
  right = {k: v["Yes"] > v["No"] for k, v in by_pair.items()}
  assert result["pair_accuracy"] == pytest.approx(100 * np.mean(list(right.values())))
  for kind in ("action", "scene", "person"):
    marks = [v for k, v in right.items() if k[3] == kind]
    assert result["by_type"][kind] == pytest.approx(100 * np.mean(marks))
  for split in splits:
    marks = [v for k, v in right.items() if k[0] == split]
    assert result["by_split"][split] == pytest.approx(100 * np.mean(marks))
  assert json.loads((out / "checkpoint.json").read_text())["checkpoint"] == str(root / "ckpt")
  # A rerun on the same directory computes nothing and gives the same result.
  with count_work() as work:
    again = entailment.evaluate_pairs(config, params, out, show_progress=False)
  assert dict(work) == {} and again["pair_accuracy"] == result["pair_accuracy"]


def brute_force_ap(scores, relevant):
  """AP by walking the ranking one item at a time."""
  order = sorted(range(len(scores)), key=lambda i: -scores[i])
  found, total = 0, 0.0
  for rank, i in enumerate(order, start=1):
    if relevant[i]:
      found += 1
      total += found / rank
  return total / found


def test_eval_retrieval_end_to_end(evaluated):
  root, config, cfg, params = evaluated
  out = root / "out" / "retrieval"
  rows = read_jsonl(out / "predictions.jsonl")
  result = json.loads((out / "result.json").read_text())
  # Pools of 4 clips (test_size) from test_unusual and test_typical: actions skiing,
  # boxing, jumping, swimming (the splits cycle through the actions), 4 queries each.
  assert result["pool_size"] == {"unusual": 4, "typical": 4}
  assert len(rows) == 2 * 4 * 4
  actions = synthetic.ACTIONS[:4]
  specs = {s.id: s for split in ("test_unusual", "test_typical")
           for s in synthetic.clip_specs(split, 4)}
  want = reference_p_yes(config, cfg, params, rows,
                         frames_by_id(config, ("test_unusual", "test_typical")))
  np.testing.assert_allclose([r["p_yes"] for r in rows], want, rtol=2e-4, atol=1e-7)
  for pool in ("unusual", "typical"):
    aps = []
    for action in actions:
      mine = [(r, p) for r, p in zip(rows, want) if r["pool"] == pool
              and r["caption"] == f"A person is {action}."]
      assert len(mine) == 4
      aps.append(brute_force_ap([p for _, p in mine],
                                [specs[r["id"]].action == action for r, _ in mine]))
      assert result["ap"][pool][f"A person is {action}."] == pytest.approx(100 * aps[-1],
                                                                          abs=1e-6)
    assert result["map"][pool] == pytest.approx(100 * np.mean(aps), abs=1e-6)


# ------------------------------------------------------------------------------ users' data

def test_users_pairs_and_retrieval_pools_come_from_their_rows(monkeypatch):
  from conftest import load_config
  from mashvlm_jax.data.tasks import haca, qa
  from mashvlm_jax.eval import common
  pair = [qa("A dog runs.", "Yes", task=haca.PAIR, aspect="action", pair=0),
          qa("A dog sits.", "No", task=haca.PAIR, aspect="action", pair=0)]
  record = dict(id="velociti/000000", task="velociti", kind="", action="", scene="", qa=pair)
  rows = entailment.pair_rows(record, "velociti")
  assert [(r["caption"], r["answer"], r["type"], r["pair"]) for r in rows] == [
      ("A dog runs.", "Yes", "action", 0), ("A dog sits.", "No", "action", 0)]

  labels = ["A dog runs.", "A dog sits.", "A dog runs."]
  records = [dict(id=f"ssv2/{k:06d}", qa=[qa(x, "", task=haca.RETRIEVAL)], frames=None)
             for k, x in enumerate(labels)]
  monkeypatch.setattr(common, "eval_records",
                      lambda config, splits, max_items=0: [("ssv2", r) for r in records])
  config = load_config("tiny_synthetic")
  config.data.name = "local_video_qa"
  pools = entailment.retrieval_pools(config, splits=["ssv2"])
  got, queries, relevant = pools["ssv2"]
  assert queries == ["A dog runs.", "A dog sits."] and len(got) == 3
  np.testing.assert_array_equal(relevant, [[1, 0, 1], [0, 1, 0]])
