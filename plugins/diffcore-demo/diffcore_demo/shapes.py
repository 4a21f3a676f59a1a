"""The demo model's world: a caption grammar, a renderer and a measuring classifier (numpy + PIL only).

Captions read "a red circle on a blue background": one shape (circle or square) of one of 8 colours on
a background of another. The training script draws (caption, image) pairs from here; the
prompt-following test draws fresh captions and seeds from here and measures generated images with
``classify``. Shapes are big (half-side 0.22-0.34 of the image) so each spans several of the 8x8
image tokens: with smaller ones and a broader grammar the model learnt colours but drew blobs.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square")
FILL_RATIO = {"circle": math.pi / 4, "square": 1.0}  # shape area / bounding-box area
# The tokenizers' vocabulary is that of the first, broader grammar (counts, triangles, positions): keeping
# it keeps the frozen random text encoders, and so the fine-tuned transformer's conditioning, identical.
VOCAB = tuple(dict.fromkeys(
    ["a", "two", "on", "the", "background"] + list(COLOURS)
    + [s + e for s in ("circle", "square", "triangle") for e in ("", "s")] + ["left", "right", "top", "bottom"]))


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(len(COLOURS), size=2, replace=False)
    return Scene(colour=COLOURS[colour], shape=SHAPES[rng.integers(len(SHAPES))], background=COLOURS[background])


def render(scene: Scene, rng: np.random.Generator, size: int = 128, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) uint8 image of ``scene`` with a random shape size and position (anti-aliased)."""
    s = size * supersample
    img = Image.new("RGB", (s, s), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.34)  # half-side, image units
    cx, cy = rng.uniform(0.3, 0.7, size=2)
    cx, cy = min(max(cx, r + 0.03), 0.97 - r), min(max(cy, r + 0.03), 0.97 - r)
    box = [(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s]
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.rectangle(box, fill=fill)
    return np.asarray(img.resize((size, size), Image.BOX))


# ------------------------------------------------------------------------------------------ measuring
def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour (Euclidean RGB) of each pixel."""
    pal = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
    d = ((pixels[..., None, :].astype(np.float32) - pal) ** 2).sum(-1)
    return d.argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x) coordinates."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pts = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pts.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pts))
    return out


def classify(image: np.ndarray) -> dict:
    """Measure an RGB image (H, W, 3; uint8 or floats in [0, 1]).

    - background: the palette colour nearest to the per-channel median of the 2-pixel border;
    - colour: the most frequent nearest-palette colour among the other pixels (those whose nearest
      palette colour is not the background's);
    - count: connected components (4-neighbour) of that colour's mask larger than 1/4 of the largest;
    - shape: the largest component's fill ratio (pixels / bounding-box area), nearest of
      circle pi/4 ~ 0.785 and square 1.0.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3),
                             img[:, -2:].reshape(-1, 3)])
    bg = int(_nearest_palette(np.median(border, axis=0)))
    labels = _nearest_palette(img)
    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    counts[bg] = 0
    fg = int(counts.argmax())
    result = {"background": COLOURS[bg], "colour": None, "shape": None, "count": 0, "fill": None}
    if counts[fg] < 20:
        return result
    comps = sorted(_components(labels == fg), key=len, reverse=True)
    big = comps[0]
    (y0, x0), (y1, x1) = big.min(0), big.max(0)
    fill = len(big) / float((y1 - y0 + 1) * (x1 - x0 + 1))
    result.update(colour=COLOURS[fg], fill=fill, count=sum(len(c) > len(big) / 4 for c in comps),
                  shape=min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill)))
    return result
