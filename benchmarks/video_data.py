"""Video storage formats at pretraining scale: bytes per clip, build time, decode rate.

  python benchmarks/video_data.py [--videos=12] [--batches=6] [--out=/tmp/video_data]

Writes natural-looking test videos with PyAV (moving shapes over drifting gradients and
noise textures, a slow camera pan; 320x240 to 1280x720, 3 to 8 s, h264 and mpeg4), builds
the same annotations as each storage format (data.storage raw / jpeg / source,
storage.py), and prints per format: bytes per clip on disk, build time per clip, decoded
clips through the Grain train pipeline (``rand`` sampling, 16 frames at 224 px as the
7B config reads them) per CPU second with 0 workers (one fully used core, independent of
other load), per wall-clock second with 0 workers, and with one worker per core. Build
time is CPU seconds per clip too (one build thread). Beside them:
the clips/s per host the 7B train step consumes on v5p-64 at 50% MFU (analytic FLOPs of
train/flops.py) and the cores per host each format needs to keep up with it.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (width, height, seconds, fps, codec) of the test videos, cycled.
VIDEO_SHAPES = ((320, 240, 4, 24, "libx264"), (640, 360, 6, 30, "libx264"),
                (1280, 720, 6, 25, "libx264"), (480, 270, 3, 30, "mpeg4"),
                (640, 480, 8, 24, "libx264"), (854, 480, 5, 30, "mpeg4"))
V5P_CHIPS, V5P_CHIPS_PER_HOST, MFU, V5P_VCPUS_PER_HOST = 64, 4, 0.5, 208


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
  """float32 [height, width] value noise in [0, 1]: a random grid of ``cell`` pixels,
  bilinearly upsampled (a cloudy texture)."""
  gh, gw = height // cell + 2, width // cell + 2
  grid = rng.random((gh, gw)).astype(np.float32)
  y = np.arange(height, dtype=np.float32) / cell
  x = np.arange(width, dtype=np.float32) / cell
  y0, x0 = y.astype(int), x.astype(int)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
  c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
  return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def natural_frames(num_frames: int, width: int, height: int, seed: int = 0):
  """Yields uint8 [height, width, 3] frames: a drifting two-colour gradient modulated by
  a panning cloud texture, with 3 to 6 shapes (discs and boxes) moving and bouncing."""
  rng = np.random.default_rng(seed)
  pad = width // 4
  texture = smooth_noise(rng, height, width + pad, max(8, width // 12))
  fine = smooth_noise(rng, height, width + pad, 3) * 0.25
  c0, c1 = rng.uniform(30, 220, 3).astype(np.float32), rng.uniform(30, 220, 3).astype(np.float32)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  xs, ys = xx[0] / width, yy[:, 0] / height
  shapes = []
  for _ in range(int(rng.integers(3, 7))):
    shapes.append(dict(kind=rng.choice(["disc", "box"]), r=rng.uniform(0.05, 0.15) * height,
                       pos=rng.uniform([0, 0], [width, height]),
                       vel=rng.uniform(-1, 1, 2) * width / 60,
                       colour=rng.uniform(0, 255, 3)))
  for t in range(num_frames):
    shift = int(pad * 0.5 * (1 + np.sin(t / 40)))  # slow camera pan
    tex = texture[:, shift:shift + width] * 0.6 + fine[:, shift:shift + width]
    mix = ((xs * np.float32(np.cos(t / 50)))[None, :]
           + (ys * np.float32(np.sin(t / 50)))[:, None]) * 0.5 + 0.5
    img = (c1 + (c0 - c1) * mix[..., None]) * (0.6 + tex[..., None])
    for s in shapes:
      s["pos"] += s["vel"]
      for k, limit in enumerate((width, height)):
        if not 0 <= s["pos"][k] <= limit:
          s["vel"][k] *= -1
      x0, y0 = (int(max(0, p - s["r"])) for p in s["pos"])
      x1, y1 = int(min(width, s["pos"][0] + s["r"] + 1)), int(min(height, s["pos"][1] + s["r"] + 1))
      if x1 <= x0 or y1 <= y0:
        continue
      dx, dy = xx[y0:y1, x0:x1] - s["pos"][0], yy[y0:y1, x0:x1] - s["pos"][1]
      inside = (dx ** 2 + dy ** 2 < s["r"] ** 2) if s["kind"] == "disc" else (
          (np.abs(dx) < s["r"]) & (np.abs(dy) < s["r"] * 0.7))
      box = img[y0:y1, x0:x1]
      box[inside] = s["colour"] * (0.8 + 0.4 * tex[y0:y1, x0:x1][inside, None])
    yield np.clip(img, 0, 255).astype(np.uint8)


def write_natural_video(path, num_frames: int, width: int, height: int, fps: int = 25,
                        codec: str = "libx264", seed: int = 0) -> str:
  """Encodes ``natural_frames`` with PyAV (yuv420p; h264 at crf 23 or mpeg4 at qscale 4)."""
  import av
  with av.open(str(path), "w") as out:
    stream = out.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "23"} if codec == "libx264" else {"qscale": "4"}
    for img in natural_frames(num_frames, width, height, seed):
      for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return str(path)


def make_videos(root: pathlib.Path, count: int) -> list[dict]:
  """``count`` videos under root/videos and a VideoChat2-IT annotation file; the shapes."""
  videos = root / "videos"
  videos.mkdir(parents=True, exist_ok=True)
  records, shapes = [], []
  for k in range(count):
    w, h, seconds, fps, codec = VIDEO_SHAPES[k % len(VIDEO_SHAPES)]
    name = f"v{k:03d}.mp4"
    if not (videos / name).exists():
      write_natural_video(videos / name, seconds * fps, w, h, fps, codec, seed=k)
    records.append({"video": name, "QA": [{"i": "", "q": "What happens in the video?",
                                           "a": "Shapes move over a textured background."}]})
    shapes.append(dict(width=w, height=h, seconds=seconds, fps=fps, codec=codec,
                       bytes=(videos / name).stat().st_size))
  (root / "train.json").write_text(json.dumps(records))
  return shapes


def word_tokenizer(root: pathlib.Path) -> str:
  from mashvlm_jax.data import tokenizer
  path = root / "tokenizer.json"
  words = ["What happens in the video?", "Shapes move over a textured background.",
           "USER:", "ASSISTANT:"]
  tokenizer.save_atomic(tokenizer.build_word_tokenizer(words), path)
  return str(path)


def bench_config(root: pathlib.Path, storage: str, num_workers, batch: int):
  """The tiny model config with the 7B data shape (16 frames at 224 px) on these videos."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny_synthetic.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  config.model.num_frames, config.model.vision.image_size = 16, 224
  d = config.data
  d.name, d.data_dir = "local_video_qa", str(root / f"data_{storage}")
  d.annotations, d.video_root = {"train": str(root / "train.json")}, str(root / "videos")
  d.tokenizer.update(kind="hf", path=str(root / "tokenizer.json"))
  d.batch_size, d.num_workers, d.num_threads = batch, num_workers, 1
  d.prefetch_buffer_size = 2
  d.augment.random_resized_crop = False
  d.storage = storage
  d.jpeg = dict(quality=90, short_side=256, max_frames=32, fps=0.0)
  d.build_threads = 1
  return config


def dir_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*.array_record*") if p.is_file())


def decode_rate(config, batches: int) -> tuple[float, float]:
  """(clips per wall-clock second, clips per CPU second of this process) of the train
  iterator over ``batches`` batches after the first. With 0 workers every stage runs in
  this process, so the second is the rate of one fully used core, whatever else loads
  the machine."""
  from mashvlm_jax.data import pipeline
  with registry_quiet():
    it = pipeline.make_iterator(config, "train", process_index=0, process_count=1)
    next(it)
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  clips = batches * int(config.data.batch_size)
  rates = clips / (time.perf_counter() - t), clips / (time.process_time() - cpu)
  it.close()
  return rates


def registry_quiet():
  from mashvlm_jax.data import registry
  return registry.tfds_quiet()


def clips_per_host_needed(text_len: int = 512) -> float:
  """Clips/s one v5p host (4 chips) trains on at 50% MFU: the 7B config's analytic
  FLOPs per row (train/flops.py) against the chips' bf16 peak."""
  import importlib.util
  from mashvlm_jax.model.config import ModelConfig
  from mashvlm_jax.train import flops
  spec = importlib.util.spec_from_file_location("m7b", ROOT / "configs" / "mashvlm_7b.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = ModelConfig.from_dict(module.get_config(None).model)
  per_row = flops.train_flops_per_row(cfg, text_len)
  return V5P_CHIPS_PER_HOST * flops.PEAK_FLOPS["TPU v5p"] * MFU / per_row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--videos", type=int, default=12)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--out", default="/tmp/video_data_bench")
  parser.add_argument("--formats", default="raw,jpeg,source")
  args = parser.parse_args()
  import logging
  logging.basicConfig(level=logging.WARNING)
  from mashvlm_jax.data import registry
  root = pathlib.Path(args.out)
  root.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  shapes = make_videos(root, args.videos)
  word_tokenizer(root)
  print(f"{len(shapes)} test videos written in {time.perf_counter() - t:.1f} s: "
        + ", ".join(f"{s['width']}x{s['height']} {s['seconds']}s {s['codec']}"
                    for s in shapes[:len(VIDEO_SHAPES)])
        + f"; mean file {np.mean([s['bytes'] for s in shapes]) / 1e6:.2f} MB")
  need = clips_per_host_needed()
  print(f"7B train step on v5p-{V5P_CHIPS} at {MFU:.0%} MFU: {need:.1f} clips/s per host "
        f"({V5P_CHIPS_PER_HOST} chips; 16 frames at 224 px, text_len 512)")
  print(f"load: {os.getloadavg()[0]:.2f} (1 min), {len(os.sched_getaffinity(0))} cores here")
  head = (f"{'format':8} {'KB/clip':>9} {'build s/clip':>13} {'clips/CPU-s':>15} "
          f"{'0 workers/s':>13} {str(args.workers) + ' workers/s':>15} "
          f"{'cores/host':>11} {'feeds v5p':>9}")
  print(head)
  rows = []
  for fmt in args.formats.split(","):
    config = bench_config(root, fmt, 0, args.batch)
    shutil.rmtree(config.data.data_dir, ignore_errors=True)
    t = time.process_time()
    with registry.tfds_quiet():
      registry.ensure_built(config)
    build = (time.process_time() - t) / len(shapes)  # CPU s (build_threads=1)
    size = dir_bytes(pathlib.Path(config.data.data_dir)) / len(shapes)
    wall, one = decode_rate(config, args.batches)
    many, _ = decode_rate(bench_config(root, fmt, args.workers, args.batch), args.batches)
    cores = need / one
    row = dict(format=fmt, kb_per_clip=size / 1024, build_s_per_clip=build,
               clips_per_cpu_s=one, clips_per_s_0_workers_wall=wall,
               clips_per_s_workers=many, workers=args.workers, cores_needed=cores,
               feeds_v5p_host=cores <= V5P_VCPUS_PER_HOST)
    rows.append(row)
    print(f"{fmt:8} {row['kb_per_clip']:9.0f} {build:13.3f} {one:15.2f} {wall:13.2f} "
          f"{many:15.2f} {cores:11.1f} {('yes' if row['feeds_v5p_host'] else 'no'):>9}")
  (root / "results.json").write_text(json.dumps(dict(need=need, rows=rows), indent=2))


if __name__ == "__main__":
  main()
