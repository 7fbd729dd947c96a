"""Procedural action/scene videos: a miniature of the paper's UNSCENE setting (Sec. 4).

Every clip is a static scene background (8 classes, each with its own texture, palette and
layout) with, optionally, one actor performing one of 8 actions. The actor is a rigid
figure whose colours and size are drawn independently of the action, so a single frame
says nothing about the action: only the trajectory across frames does (skiing descends
diagonally, boxing jabs back and forth, jumping bounces, ...). Every action has a typical
scene; ``train`` pairs them with probability ``typical_prob``, the test splits take them
apart (``test_unusual``) or remove the actor (``test_scene_only``).

Everything is a pure function of (seed, split, index): ``clip_specs`` decides labels,
``render_clip`` draws uint8 [T, H, W, 3] frames. Positions and speeds are fractions of the
frame and of the clip, so any resolution and frame count (T >= 2) shows the same motion.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# Action i's typical scene is scene i.
ACTIONS = ("skiing", "boxing", "jumping", "swimming", "running", "climbing", "walking",
           "falling")
SCENES = ("snowy mountain", "boxing ring", "basketball court", "swimming pool", "beach",
          "forest", "library", "ice rink")
# Preposition + article for each scene, used by the question/answer templates.
SCENE_PHRASES = {"snowy mountain": "on a snowy mountain", "boxing ring": "in a boxing ring",
                 "basketball court": "on a basketball court",
                 "swimming pool": "in a swimming pool", "beach": "on a beach",
                 "forest": "in a forest", "library": "in a library",
                 "ice rink": "on an ice rink"}
TYPICAL_SCENE = dict(zip(ACTIONS, SCENES))
TYPICAL_ACTION = dict(zip(SCENES, ACTIONS))

SPLITS = ("train", "test_typical", "test_unusual", "test_scene_only")
KINDS = ("typical", "unusual", "scene_only")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
# Independent random streams per clip: labels, appearance, motion, scene, questions.
_LABELS, _APPEARANCE, _MOTION, _SCENE, QUESTIONS, TASKS = range(6)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What one clip shows. ``action`` is "" for scene-only clips."""
  split: str
  index: int
  action: str
  scene: str
  kind: str  # "typical" | "unusual" | "scene_only"
  seed: int

  @property
  def id(self) -> str:
    return f"{self.split}/{self.index:06d}"

  def rng(self, stream: int) -> np.random.Generator:
    """The clip's own generator for one stream (labels, appearance, motion, scene, QA)."""
    return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], self.index, stream])


def kind_of(action: str, scene: str) -> str:
  if not action:
    return "scene_only"
  return "typical" if TYPICAL_SCENE[action] == scene else "unusual"


def clip_specs(split: str, size: int, *, seed: int = 0, typical_prob: float = 0.9,
               scene_only_share: float = 0.05) -> list[ClipSpec]:
  """Labels of every clip of a split, balanced over classes.

  train: round(size * scene_only_share) scene-only clips (scenes cycle), the rest cycle
    through the actions; each takes the action's typical scene with probability
    ``typical_prob``, otherwise one of the 7 other scenes uniformly.
  test_typical: actions cycle, typical scene. test_unusual: actions cycle and each action's
    7 atypical scenes cycle (every atypical pair equally often). test_scene_only: scenes
    cycle, no actor.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown synthetic split {split!r}; known: {SPLITS}")
  if not 0.0 <= typical_prob <= 1.0 or not 0.0 <= scene_only_share <= 1.0:
    raise ValueError(f"typical_prob and scene_only_share must be in [0, 1], found "
                     f"{typical_prob}, {scene_only_share}")
  n_cls = len(ACTIONS)
  specs = []
  num_scene_only = {"train": int(round(size * scene_only_share)), "test_scene_only": size}
  num_scene_only = num_scene_only.get(split, 0)
  for index in range(size):
    if index < num_scene_only:
      action, scene = "", SCENES[index % n_cls]
    else:
      k = index - num_scene_only
      a = k % n_cls
      action = ACTIONS[a]
      if split == "test_typical":
        scene = TYPICAL_SCENE[action]
      elif split == "test_unusual":
        scene = SCENES[(a + 1 + (k // n_cls) % (n_cls - 1)) % n_cls]
      else:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, _LABELS])
        if rng.random() < typical_prob:
          scene = TYPICAL_SCENE[action]
        else:
          scene = SCENES[(a + 1 + rng.integers(n_cls - 1)) % n_cls]
    specs.append(ClipSpec(split, index, action, scene, kind_of(action, scene), seed))
  return specs


# ------------------------------------------------------------------------------ scenes

def _grid(h: int, w: int):
  """Pixel-centre coordinates as fractions: y [h, 1], x [1, w]."""
  return ((np.arange(h) + 0.5) / h)[:, None], ((np.arange(w) + 0.5) / w)[None, :]


def _jitter(rng, color, amount=0.08):
  """A palette colour with a per-clip random tint (+-amount relative per channel)."""
  return np.asarray(color, np.float32) * rng.uniform(1 - amount, 1 + amount, 3)


def _vgradient(y, top, bottom):
  """[h, 1, 3] linear blend from colour ``top`` to ``bottom`` down the frame."""
  return (1 - y)[..., None] * top + y[..., None] * bottom


def _snowy_mountain(rng, h, w):
  y, x = _grid(h, w)
  img = np.broadcast_to(_vgradient(y, _jitter(rng, (90, 145, 225)),
                                   _jitter(rng, (200, 220, 245))), (h, w, 3)).copy()
  horizon = rng.uniform(0.52, 0.62)
  for _ in range(3):
    peak_x, peak_y = rng.uniform(0.0, 1.0), rng.uniform(0.12, 0.32)
    slope = rng.uniform(0.9, 1.5)
    body = (y > peak_y + slope * np.abs(x - peak_x)) & (y <= horizon)
    img[body] = _jitter(rng, (115, 125, 150))
    img[body & (y < peak_y + rng.uniform(0.08, 0.14))] = (245, 248, 252)
  img[np.broadcast_to(y > horizon, (h, w))] = _jitter(rng, (236, 240, 250), 0.02)
  img += (y > horizon)[..., None] * rng.normal(0, 5, (h, w, 1))
  return img


def _boxing_ring(rng, h, w):
  y, x = _grid(h, w)
  img = np.empty((h, w, 3), np.float32)
  img[:] = _jitter(rng, (28, 24, 36))
  lights = rng.random((h, w)) < 0.03
  img[lights] = (230, 220, 160)
  floor = rng.uniform(0.55, 0.62)
  img[np.broadcast_to(y > floor, (h, w))] = _jitter(rng, (45, 85, 175))
  thick = max(1.0 / h, 0.02)
  for k in range(3):
    rope_y = floor - 0.08 - 0.1 * k
    img[np.broadcast_to(np.abs(y - rope_y) < thick, (h, w))] = _jitter(rng, (205, 30, 35))
  posts = (np.abs(x - 0.05) < 0.025) | (np.abs(x - 0.95) < 0.025)
  img[posts & (y > floor - 0.32) & (y < floor + 0.02)] = (200, 200, 210)
  return img


def _basketball_court(rng, h, w):
  y, x = _grid(h, w)
  img = np.empty((h, w, 3), np.float32)
  wall = rng.uniform(0.26, 0.32)
  img[:] = _jitter(rng, (205, 145, 80))
  plank = np.floor(y / 0.055 + rng.uniform(0, 1)).astype(int)
  shade = rng.uniform(0.88, 1.08, 64)[plank % 64]
  img *= shade[..., None]
  img[np.broadcast_to(y < wall, (h, w))] = _jitter(rng, (30, 40, 95))
  cx = rng.uniform(0.4, 0.6)
  radius = np.sqrt((x - cx) ** 2 + ((y - 1.05) * 1.3) ** 2)
  img[(np.abs(radius - 0.42) < 0.018) & (y > wall)] = (245, 245, 245)
  img[np.broadcast_to(np.abs(y - (wall + 0.02)) < 0.012, (h, w))] = (245, 245, 245)
  board = (np.abs(x - cx) < 0.12) & (y > 0.06) & (y < 0.2)
  img[board] = (240, 240, 240)
  img[(np.abs(x - cx) < 0.06) & (np.abs(y - 0.22) < 0.015)] = (250, 110, 20)
  return img


def _swimming_pool(rng, h, w):
  y, x = _grid(h, w)
  base = _jitter(rng, (30, 115, 205))
  k1, k2, p1, p2 = rng.uniform(3, 5), rng.uniform(4, 7), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
  caustic = np.sin(2 * np.pi * k1 * x + p1 + 3 * y) * np.sin(2 * np.pi * k2 * y + p2 + 2 * x)
  img = base + (np.clip(caustic, 0, 1) * 55)[..., None] * np.array([0.7, 1.0, 0.6])
  deck = rng.uniform(0.1, 0.15)
  tiles = ((np.floor(x * 16) + np.floor(y * 16)) % 2)[..., None]
  img = np.where((y < deck)[..., None], _jitter(rng, (225, 215, 190)) - 18 * tiles, img)
  for lane_y in (deck + 0.2, deck + 0.45, deck + 0.7):
    dash = (np.floor(x * 10) % 2 == 0)
    rope = np.broadcast_to(np.abs(y - lane_y) < 0.018, (h, w))
    img[rope & dash] = (220, 40, 40)
    img[rope & ~dash] = (240, 240, 240)
  return img.astype(np.float32)


def _beach(rng, h, w):
  y, x = _grid(h, w)
  sky_end, sea_end = rng.uniform(0.28, 0.34), rng.uniform(0.46, 0.52)
  img = np.empty((h, w, 3), np.float32)
  img[:] = _jitter(rng, (225, 200, 140))
  img += rng.normal(0, 7, (h, w, 1))
  sea = np.broadcast_to(y < sea_end + 0.015 * np.sin(12 * x + rng.uniform(0, 6.3)), (h, w))
  img[sea] = _jitter(rng, (20, 100, 150))
  img[sea & (y > sea_end - 0.03)] = (235, 245, 250)
  img[np.broadcast_to(y < sky_end, (h, w))] = _jitter(rng, (140, 200, 240))
  sun = (x - rng.uniform(0.1, 0.9)) ** 2 + (y - 0.12) ** 2 < 0.004
  img[sun] = (255, 235, 120)
  return img


def _forest(rng, h, w):
  y, x = _grid(h, w)
  img = np.empty((h, w, 3), np.float32)
  img[:] = _jitter(rng, (28, 70, 34))
  for _ in range(14):
    cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.6), rng.uniform(0.06, 0.14)
    img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = _jitter(rng, (55, 125, 50), 0.2)
  for _ in range(int(rng.integers(4, 7))):
    cx, half = rng.uniform(0, 1), rng.uniform(0.02, 0.045)
    img[np.broadcast_to(np.abs(x - cx) < half, (h, w)) & (y > 0.15)] = _jitter(rng, (95, 62, 32))
  ground = rng.uniform(0.8, 0.86)
  img[np.broadcast_to(y > ground, (h, w))] = _jitter(rng, (72, 60, 30))
  return img


def _library(rng, h, w):
  y, x = _grid(h, w)
  img = np.empty((h, w, 3), np.float32)
  img[:] = _jitter(rng, (110, 72, 40))
  carpet = rng.uniform(0.84, 0.9)
  shelf_h = (carpet - 0.02) / 3
  palette = np.array([(150, 35, 35), (35, 95, 50), (40, 55, 130), (170, 140, 60),
                      (90, 40, 100), (200, 190, 170)], np.float32)
  num_books = 22
  cols = np.minimum(np.floor(x[0] * num_books).astype(int), num_books - 1)  # book per column
  book_color = palette[rng.integers(0, len(palette), (3, num_books))]
  book_top = rng.uniform(0.15, 0.4, (3, num_books))
  for row in range(3):
    top, bottom = 0.02 + row * shelf_h, 0.02 + (row + 1) * shelf_h
    rel = (y - top) / shelf_h
    books = (rel > book_top[row][cols][None, :]) & (rel < 0.9) & (y > top) & (y < bottom)
    colors = np.broadcast_to(book_color[row][cols][None], (h, w, 3))
    img[books] = colors[books]
    img[np.broadcast_to(np.abs(y - bottom) < 0.02, (h, w))] = _jitter(rng, (70, 42, 20))
  img[np.broadcast_to(y > carpet, (h, w))] = _jitter(rng, (115, 30, 38))
  return img


def _ice_rink(rng, h, w):
  y, x = _grid(h, w)
  img = np.empty((h, w, 3), np.float32)
  img[:] = _jitter(rng, (222, 234, 246), 0.03)
  img += rng.normal(0, 3, (h, w, 1))
  boards_top, boards_bottom = rng.uniform(0.2, 0.24), rng.uniform(0.3, 0.33)
  crowd = np.broadcast_to(y < boards_top, (h, w))
  img[crowd] = _jitter(rng, (40, 40, 55))
  img[crowd & (rng.random((h, w)) < 0.15)] = (200, 60, 60)
  img[np.broadcast_to((y >= boards_top) & (y < boards_bottom), (h, w))] = (250, 250, 250)
  img[np.broadcast_to(np.abs(y - boards_bottom) < 0.015, (h, w))] = (240, 200, 40)
  below = y > boards_bottom + 0.02
  img[(np.abs(x - 0.5) < 0.02) & below] = (210, 40, 45)
  img[((np.abs(x - 0.2) < 0.015) | (np.abs(x - 0.8) < 0.015)) & below] = (40, 70, 200)
  ring = np.sqrt((x - 0.5) ** 2 + (y - 0.68) ** 2)
  img[np.abs(ring - 0.16) < 0.012] = (210, 40, 45)
  return img


SCENE_RENDERERS: dict[str, Callable] = dict(zip(SCENES, (
    _snowy_mountain, _boxing_ring, _basketball_court, _swimming_pool, _beach, _forest,
    _library, _ice_rink)))


def render_scene(scene: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """float32 [H, W, 3] in 0..255: one random instance of a scene class."""
  return SCENE_RENDERERS[scene](rng, height, width).astype(np.float32)


# ------------------------------------------------------------------------------ actor

SHIRTS = ((220, 30, 30), (30, 160, 40), (30, 60, 220), (240, 210, 20), (150, 40, 180),
          (250, 130, 20), (20, 200, 210), (230, 50, 160), (25, 25, 25), (245, 245, 245))
PANTS = ((30, 30, 80), (20, 20, 20), (90, 60, 30), (70, 70, 70), (120, 20, 30), (30, 80, 40))
SKIN = ((255, 220, 185), (230, 180, 140), (190, 135, 95), (140, 95, 60), (95, 65, 40))


@dataclasses.dataclass(frozen=True)
class Appearance:
  """The actor's look, drawn independently of the action."""
  shirt: tuple
  pants: tuple
  skin: tuple
  height: float  # figure height as a fraction of the frame height


def draw_appearance(rng: np.random.Generator) -> Appearance:
  return Appearance(SHIRTS[rng.integers(len(SHIRTS))], PANTS[rng.integers(len(PANTS))],
                    SKIN[rng.integers(len(SKIN))], float(0.42 * rng.uniform(0.85, 1.15)))


def trajectory(action: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
  """float [T, 2] actor centre (x, y) per frame, as fractions of the frame width/height.

  u = t / (T - 1) is the clip phase; d = +-1 a random horizontal direction.
  """
  u = np.linspace(0.0, 1.0, num_frames)
  t = np.arange(num_frames)
  d = rng.choice((-1.0, 1.0))

  def start_x(travel):  # a start that keeps a horizontal travel of ``travel`` in frame
    lo = rng.uniform(0.12, max(0.12, 0.88 - travel))
    return lo if d > 0 else 1.0 - lo

  if action == "skiing":  # steady diagonal descent
    x, y = start_x(0.5) + d * 0.5 * u, rng.uniform(0.26, 0.32) + 0.36 * u
  elif action == "boxing":  # fast short jabs: forward and back every frame
    x, y = rng.uniform(0.25, 0.75) + d * 0.12 * (t % 2), rng.uniform(0.45, 0.68) + 0 * u
  elif action == "jumping":  # vertical bounce, two jumps per clip
    x = rng.uniform(0.15, 0.85) + 0 * u
    y = rng.uniform(0.55, 0.7) - 0.3 * 0.5 * (1 - np.cos(4 * np.pi * u))
  elif action == "swimming":  # horizontal glide on a vertical wave
    x, y = start_x(0.4) + d * 0.4 * u, rng.uniform(0.42, 0.62) + 0.1 * np.sin(4 * np.pi * u)
  elif action == "running":  # fast straight horizontal
    x, y = start_x(0.7) + d * 0.7 * u, rng.uniform(0.45, 0.68) + 0 * u
  elif action == "climbing":  # steady ascent
    x, y = rng.uniform(0.15, 0.85) + 0 * u, rng.uniform(0.66, 0.76) - 0.4 * u
  elif action == "walking":  # slow straight horizontal
    x, y = start_x(0.25) + d * 0.25 * u, rng.uniform(0.45, 0.68) + 0 * u
  elif action == "falling":  # accelerating descent
    x, y = rng.uniform(0.15, 0.85) + 0 * u, rng.uniform(0.22, 0.28) + 0.55 * u ** 2
  else:
    raise ValueError(f"unknown action {action!r}; known: {ACTIONS}")
  return np.stack([x, y], axis=-1)


# ------------------------------------------------------------------------------ held clips

# Temporal-detection clips (issue 18, LLaVAction): the actor holds still before the action
# starts and after it ends; the stored frames are FRAME_SECONDS apart. Only the clips a
# temporal-detection family picks are rendered this way (render_held_clip); render_clip
# is unchanged.
STILL = 6  # the clip's rng stream for its still segments (after _LABELS .. TASKS)
HOLD_PICK = 7  # the clip's rng stream that picks whether a training clip holds still
FRAME_SECONDS = 0.25
MIN_MOVING_FRAMES = 4  # every action moves between consecutive frames of 4+ frames


def still_segment(spec: ClipSpec, num_frames: int) -> tuple[int, int]:
  """(first, last) frame of the action in a held clip of ``num_frames`` frames, from the
  clip's STILL stream: D ~ U{1, ..., T - MIN_MOVING_FRAMES} still frames in all, split by
  rho ~ U(0, 1): first = round(rho * D), last = first + T - 1 - D."""
  still = num_frames - MIN_MOVING_FRAMES
  if still < 1:
    raise ValueError(f"a clip that holds still needs at least {MIN_MOVING_FRAMES + 1} "
                     f"frames, found {num_frames}")
  rng = spec.rng(STILL)
  d = int(rng.integers(1, still + 1))
  first = int(round(rng.uniform(0.0, 1.0) * d))
  return first, first + num_frames - 1 - d


def held_trajectory(action: str, num_frames: int, first: int, last: int,
                    rng: np.random.Generator) -> np.ndarray:
  """float [T, 2]: the action's trajectory over frames first..last (its whole motion
  compressed into last - first + 1 frames), held at its start before and at its end
  after."""
  if not 0 <= first < last < num_frames:
    raise ValueError(f"the action must satisfy 0 <= first < last < {num_frames}, found "
                     f"first={first}, last={last}")
  path = trajectory(action, last - first + 1, rng)
  return path[np.clip(np.arange(num_frames) - first, 0, last - first)]


def render_held_clip(spec: ClipSpec, num_frames: int, height: int, width: int, first: int,
                     last: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: render_clip's scene and actor, the actor still outside frames
  first..last (held_trajectory; the same scene, look and motion streams)."""
  if not spec.action:
    raise ValueError(f"clip {spec.id} has no actor: it cannot hold still around an action")
  background = render_scene(spec.scene, spec.rng(_SCENE), height, width)
  frames = np.repeat(background[None], num_frames, axis=0)
  look = draw_appearance(spec.rng(_APPEARANCE))
  path = held_trajectory(spec.action, num_frames, first, last, spec.rng(_MOTION))
  for frame, center in zip(frames, path):
    draw_actor(frame, center, look)
  return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def _figure_parts(y, x, cx, cy, size, aspect):
  """Boolean masks (head, shirt, pants) of a figure centred at (cx, cy), height ``size``.

  y, x are frame fractions; ``aspect`` = height / width converts x offsets to y units.
  """
  dx = (x - cx) * aspect  # horizontal offsets measured in frame-height units
  dy = y - cy
  head = dx ** 2 + (dy + 0.36 * size) ** 2 < (0.12 * size) ** 2
  torso = (np.abs(dx) < 0.14 * size) & (dy > -0.25 * size) & (dy < 0.15 * size)
  arms = (np.abs(np.abs(dx) - 0.19 * size) < 0.04 * size) & (dy > -0.22 * size) & (
      dy < 0.08 * size)
  legs = (np.abs(np.abs(dx) - 0.075 * size) < 0.05 * size) & (dy >= 0.15 * size) & (
      dy < 0.5 * size)
  return head, torso | arms, legs


def _dilate(mask):
  out = mask.copy()
  out[1:] |= mask[:-1]
  out[:-1] |= mask[1:]
  out[:, 1:] |= mask[:, :-1]
  out[:, :-1] |= mask[:, 1:]
  return out


def draw_actor(frame: np.ndarray, center, look: Appearance) -> None:
  """Paints the actor (dark outline, head, shirt+arms, pants) into float [H, W, 3] in place."""
  h, w = frame.shape[:2]
  y, x = _grid(h, w)
  head, shirt, pants = _figure_parts(y, x, center[0], center[1], look.height, h / w)
  body = head | shirt | pants
  frame[_dilate(body) & ~body] = (15, 15, 15)
  frame[pants] = look.pants
  frame[shirt] = look.shirt
  frame[head] = look.skin


def render_clip(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
  """uint8 [T, H, W, 3]: the spec's scene, plus the actor moving along its trajectory."""
  if num_frames < 2:
    raise ValueError(f"synthetic clips need at least 2 frames to show motion, found "
                     f"{num_frames}")
  background = render_scene(spec.scene, spec.rng(_SCENE), height, width)
  frames = np.repeat(background[None], num_frames, axis=0)
  if spec.action:
    look = draw_appearance(spec.rng(_APPEARANCE))
    path = trajectory(spec.action, num_frames, spec.rng(_MOTION))
    for frame, center in zip(frames, path):
      draw_actor(frame, center, look)
  return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def actor_boxes(spec: ClipSpec, num_frames: int, height: int, width: int) -> np.ndarray:
  """float64 [T, 4] pixel boxes (x1, y1, x2, y2) of every pixel ``render_clip`` paints for
  the actor (figure and dark outline) in each frame: x1, y1 the first painted column/row,
  x2, y2 one past the last (so pixel column c lies in the box iff x1 <= c < x2). Rows of
  NaN where no actor pixel is in the frame (always for scene-only clips). Uses the same
  appearance, trajectory, _figure_parts and _dilate as the renderer."""
  out = np.full((num_frames, 4), np.nan)
  if not spec.action:
    return out
  look = draw_appearance(spec.rng(_APPEARANCE))
  path = trajectory(spec.action, num_frames, spec.rng(_MOTION))
  y, x = _grid(height, width)
  for t, (cx, cy) in enumerate(path):
    head, shirt, pants = _figure_parts(y, x, cx, cy, look.height, height / width)
    painted = _dilate(head | shirt | pants)  # the body and its one-pixel outline
    rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
    if rows.size:
      out[t] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
  return out


def actor_look(spec: ClipSpec) -> Appearance:
  """The actor's appearance as ``render_clip`` draws it (ValueError for scene-only clips)."""
  if not spec.action:
    raise ValueError(f"clip {spec.id} has no actor")
  return draw_appearance(spec.rng(_APPEARANCE))
