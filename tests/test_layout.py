"""layout.position_ids and layout.dst_mask against the paper's equations built by hand."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mashvlm_jax import layout
from reference import paper_ids, paper_mask

SIZES = [(5, 8, 4), (23, 64, 7), (47, 256, 3), (11, 4, 6), (9, 9, 2), (7, 0, 3), (3, 4, 0)]
SWITCHES = list(itertools.product(layout.ATTENTION_KINDS, layout.ATTENTION_KINDS,
                                  (False, True), (False, True)))


def test_video_token_counts():
  assert layout.video_token_counts(16, 16) == (47, 256)
  assert layout.video_token_counts(8, (8, 4)) == (23, 32)
  with pytest.raises(ValueError, match="even"):
    layout.video_token_counts(8, (7, 8))
  with pytest.raises(ValueError, match="num_frames"):
    layout.video_token_counts(3, 8)


def test_token_types_layout_and_padding():
  types = layout.token_types(2, 3, 2, pad_to=9)
  assert types.dtype == np.int32
  expect = [layout.TEMPORAL] * 2 + [layout.SPATIAL] * 3 + [layout.TEXT] * 2 + [layout.PAD] * 2
  np.testing.assert_array_equal(types, expect)
  with pytest.raises(ValueError, match="pad_to"):
    layout.token_types(2, 3, 2, pad_to=6)


@pytest.mark.parametrize("m,n,l", SIZES)
@pytest.mark.parametrize("pad", [0, 3])
def test_position_ids_match_paper(m, n, l, pad):
  types = layout.token_types(m, n, l, pad_to=m + n + l + pad)
  distinct, balanced = paper_ids(m, n, l)
  s = m + n + l
  expected = {"distinct": (distinct, distinct), "balanced": (balanced, balanced),
              "harmonic": (balanced, distinct)}
  for mode, (even_row, odd_row) in expected.items():
    ids = layout.position_ids(types, mode)
    assert ids.shape == (2, s + pad) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :s], even_row, err_msg=mode)
    np.testing.assert_array_equal(ids[1, :s], odd_row, err_msg=mode)
    # padding ids stay finite and do not disturb the real tokens
    assert (np.diff(ids[:, s - 1 if s else 0:], axis=-1) >= 0).all()


def test_balanced_equal_distance_to_text():
  """Eq. (5)'s purpose: the last temporal and last spatial token share an id, so both
  blocks end equally far from the first text token."""
  types = layout.token_types(23, 64, 5)
  ids = layout.position_ids(types, "balanced")[0]
  assert ids[22] == ids[23 + 63] == ids[87] - 1


def test_position_ids_batched_ragged_text():
  lengths = [4, 1, 6]
  types = np.stack([layout.token_types(7, 4, l, pad_to=7 + 4 + 6) for l in lengths])
  ids = layout.position_ids(types, "harmonic")
  assert ids.shape == (3, 2, 17)
  for row, l in enumerate(lengths):
    np.testing.assert_array_equal(ids[row], layout.position_ids(types[row], "harmonic"))
    distinct, balanced = paper_ids(7, 4, l)
    np.testing.assert_array_equal(ids[row, 0, :11 + l], balanced)


def test_position_ids_jax_equals_numpy():
  types = layout.token_types(5, 8, 4, pad_to=20)
  for mode in layout.ROPE_MODES:
    out = jax.jit(lambda t: layout.position_ids(t, mode))(jnp.asarray(types))
    np.testing.assert_array_equal(np.asarray(out), layout.position_ids(types, mode))


def test_bad_mode():
  with pytest.raises(ValueError, match="rope mode"):
    layout.position_ids(layout.token_types(1, 2, 3), "rotary")
  with pytest.raises(ValueError, match="temporal attention"):
    layout.dst_mask(layout.token_types(1, 2, 3), temporal="sideways")


@pytest.mark.parametrize("m,n,l", SIZES)
@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("temporal,spatial,tss,sst", SWITCHES)
def test_dst_mask_matches_block_construction(m, n, l, pad, temporal, spatial, tss, sst):
  types = layout.token_types(m, n, l, pad_to=m + n + l + pad)
  got = layout.dst_mask(types, temporal=temporal, spatial=spatial,
                        temporal_sees_spatial=tss, spatial_sees_temporal=sst)
  want = paper_mask(m, n, l, pad, temporal, spatial, tss, sst)
  np.testing.assert_array_equal(got, want)
  assert got.any(axis=-1).all(), "every row must see at least one key (no NaN softmax)"


@pytest.mark.parametrize("m,n,l", SIZES)
def test_plain_causal_switches_give_tril(m, n, l):
  types = layout.token_types(m, n, l, pad_to=m + n + l + 2)
  got = layout.dst_mask(types, **layout.plain_causal_switches())
  s = m + n + l
  np.testing.assert_array_equal(got[:s, :s], np.tril(np.ones((s, s), bool)))
  assert not got[:s, s:].any()


def test_dst_default_disentangles():
  m, n, l = 5, 8, 4
  types = layout.token_types(m, n, l)
  mask = layout.dst_mask(types)
  assert not mask[:m, m:m + n].any() and not mask[m:m + n, :m].any()
  assert mask[m:m + n, m:m + n].all()  # spatial bidirectional
  np.testing.assert_array_equal(mask[:m, :m], np.tril(np.ones((m, m), bool)))
  assert mask[m + n:, :m + n].all()  # text sees every video token


def test_dst_mask_batched_and_jax():
  types = np.stack([layout.token_types(5, 8, l, pad_to=16) for l in (3, 1)])
  got = layout.dst_mask(types)
  assert got.shape == (2, 16, 16)
  for row in range(2):
    np.testing.assert_array_equal(got[row], layout.dst_mask(types[row]))
  np.testing.assert_array_equal(np.asarray(jax.jit(layout.dst_mask)(jnp.asarray(types))), got)


def test_text_token_types_from_mask():
  text_mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
  types = layout.text_token_types(text_mask, 2, 4)
  np.testing.assert_array_equal(types[0], layout.token_types(2, 4, 2, pad_to=9))
  np.testing.assert_array_equal(types[1], layout.token_types(2, 4, 3))
