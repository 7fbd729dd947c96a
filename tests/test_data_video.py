"""PyAV decoding and VideoChat2 frame sampling, on real mp4 files written here whose
frames carry their own index (8 horizontal bands = the index's 8 bits)."""
import os

import av
import numpy as np
import pytest

from mashvlm_jax.data import video

BANDS = 8


def write_indexed_mp4(path, num_frames, fps=10, width=96, height=64, first=0):
  """Frame i shows band b white iff bit b of ``first + i`` is set (survives lossy coding
  and shorter-side resize + centre crop, since bands span the whole width)."""
  with av.open(str(path), "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "10", "g": "12"}
    band = height // BANDS
    for i in range(num_frames):
      img = np.zeros((height, width, 3), np.uint8)
      for b in range(BANDS):
        if ((first + i) >> b) & 1:
          img[b * band:(b + 1) * band] = 255
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return str(path)


def frame_index(frame):
  """Reads the index back from band means."""
  bands = np.array_split(frame.mean(axis=(1, 2)), BANDS)
  return sum(1 << b for b, v in enumerate(bands) if v[len(v) // 2] > 128)


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
  return write_indexed_mp4(tmp_path_factory.mktemp("video") / "indexed.mp4", 40)


def test_rule_by_hand():
  # 40 frames, 8 segments of 5: middles (a + b) // 2.
  assert video.sample_frame_indices(40, 8, "middle").tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
  # linspace(0, 15, 9) -> 0 1 3 5 7 9 11 13 15: segments [0,0] [1,2] [3,4] ... [13,14].
  assert video.sample_frame_indices(15, 8, "middle").tolist() == [0, 1, 3, 5, 7, 9, 11, 13]
  # Shorter than the sample count: every frame once, then the last repeated.
  assert video.sample_frame_indices(5, 8, "middle").tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
  # start/end in seconds: frames shown at 1.0 <= t < 2.5 s at 10 fps are 10..24.
  got = video.sample_frame_indices(40, 8, "middle", start=1.0, end=2.5, fps=10)
  assert got.tolist() == [10, 11, 13, 15, 17, 19, 21, 23]
  with pytest.raises(ValueError, match="fps"):
    video.sample_frame_indices(40, 8, "middle", start=1.0)
  with pytest.raises(ValueError, match="rng"):
    video.sample_frame_indices(40, 8, "rand")


def test_rand_rule_stays_in_segments_and_covers_them():
  seen = [set() for _ in range(8)]
  for seed in range(200):
    got = video.sample_frame_indices(40, 8, "rand", rng=seed)
    np.testing.assert_array_equal(got, video.sample_frame_indices(40, 8, "rand", rng=seed))
    for k, index in enumerate(got):
      assert 5 * k <= index <= 5 * k + 4
      seen[k].add(int(index))
  assert all(s == set(range(5 * k, 5 * k + 5)) for k, s in enumerate(seen))
  short = video.sample_frame_indices(3, 6, "rand", rng=0)
  assert short.tolist() == [0, 1, 2, 2, 2, 2]


def test_read_video_returns_the_predicted_frames(mp4):
  assert video.probe(mp4) == (40, 10.0)
  frames = video.read_video(mp4, 8, "middle", size=None)
  assert frames.dtype == np.uint8 and frames.shape == (8, 64, 96, 3)
  assert [frame_index(f) for f in frames] == [2, 7, 12, 17, 22, 27, 32, 37]
  for seed in (0, 1, 2):
    expected = video.sample_frame_indices(40, 8, "rand", rng=seed)
    got = video.read_video(mp4, 8, "rand", size=32, rng=seed)
    assert got.shape == (8, 32, 32, 3)
    assert [frame_index(f) for f in got] == expected.tolist()
  bounded = video.read_video(mp4, 8, "middle", size=48, start=1.0, end=2.5)
  assert [frame_index(f) for f in bounded] == [10, 11, 13, 15, 17, 19, 21, 23]
  tail = video.read_video(mp4, 4, "middle", size=None, start=3.5)
  assert [frame_index(f) for f in tail] == [35, 36, 37, 38]


def test_short_video_repeats_last_frame(tmp_path):
  path = write_indexed_mp4(tmp_path / "short.mp4", 5)
  got = video.read_video(path, 8, "middle", size=None)
  assert [frame_index(f) for f in got] == [0, 1, 2, 3, 4, 4, 4, 4]


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.mp4"):
    video.read_video(tmp_path / "nope.mp4", 8)
  bad = tmp_path / "corrupt.mp4"
  bad.write_bytes(os.urandom(4096))
  with pytest.raises(video.VideoDecodeError, match="corrupt.mp4"):
    video.read_video(bad, 8)
