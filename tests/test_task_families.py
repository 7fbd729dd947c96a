"""data.train_tasks: extra task families in the synthetic training split, and rows that the
pipeline re-renders at every visit (data/tasks/families.py)."""
import numpy as np
import pytest

from mashvlm_jax.data import builders, pipeline, synthetic
from mashvlm_jax.data.tasks import families, qa


@pytest.fixture
def echo_family(monkeypatch):
  """A family adding one row per clip whose answer the visit renderer redraws."""
  def rows(spec, rng, ctx):
    return [qa(f"frames {ctx.num_frames}?", "stored", task="test_echo")]

  def render(row, rng):
    return dict(row, a=f"drawn {int(rng.integers(1_000_000))}")

  monkeypatch.setitem(families.TRAIN_FAMILIES, "test_echo", rows)
  monkeypatch.setitem(families.VISIT_RENDERERS, "test_echo", render)


def test_family_rows_join_train_clips_only(echo_family):
  ctx = families.BuildContext(num_frames=8, size=64)
  train = synthetic.clip_specs("train", 4)[0]
  plain = builders.synthetic_questions(train)
  extra = builders.synthetic_questions(train, train_tasks=("test_echo",), ctx=ctx)
  assert extra[:-1] == plain  # the ordinary rows are unchanged (own rng stream)
  assert extra[-1] == qa("frames 8?", "stored", task="test_echo")
  test = synthetic.clip_specs("test_unusual", 4)[0]
  assert (builders.synthetic_questions(test, train_tasks=("test_echo",), ctx=ctx)
          == builders.synthetic_questions(test))


def test_builder_name_spells_the_families_and_rejects_unknown(echo_family):
  name = builders.synthetic_config("tiny", train_tasks=("test_echo",)).name
  assert "_tasks-test_echo_v" in name
  assert "_tasks" not in builders.synthetic_config("tiny").name
  with pytest.raises(ValueError, match=r"unknown task families \['nope'\]"):
    builders.synthetic_config("tiny", train_tasks=("nope",))
  with pytest.raises(ValueError, match="repeats"):
    builders.synthetic_config("tiny", train_tasks=("test_echo", "test_echo"))


def test_visit_renderer_draws_afresh_and_leaves_other_rows(echo_family):
  row = qa("q?", "stored", task="test_echo")
  drawn = {families.render_visit(row, np.random.default_rng(s))["a"] for s in range(20)}
  assert len(drawn) > 15 and row["a"] == "stored"  # the stored row is not mutated
  plain = qa("q?", "Yes", task="yes_no")
  assert families.render_visit(plain, np.random.default_rng(0)) == plain

  transform = pipeline.ExampleTransform.__new__(pipeline.ExampleTransform)  # turns() only
  transform.qa_mode = "all"
  turns = transform.turns([row, plain], np.random.default_rng(1))
  assert turns[0]["a"].startswith("drawn ") and turns[1] == plain


def test_ordinary_rows_are_never_re_rendered():
  """A visit renderer registered under a task name the ordinary rows use (train_mix's
  "caption", say) would silently rewrite stage-1 training: every stored row of the plain
  synthetic set must pass through unchanged."""
  for split in synthetic.SPLITS:
    for spec in synthetic.clip_specs(split, 24):
      for row in builders.synthetic_questions(spec):
        assert families.render_visit(row, np.random.default_rng(0)) == row, (split, row)
