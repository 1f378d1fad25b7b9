"""How the shapes world's objects look and where they stand: their names and colours, the mask
that draws each shape in its box, GenEval's rule for relative positions, and rendering a scene.

Everything that reads pixels or boxes shares this module with the world (`microdit.data.shapes`):
the exact detector (`microdit.data.shapes_detect`) re-renders `shape_mask` to recognise a shape,
and GenEval's scoring (`microdit.metrics.geneval`) judges positions by `relative_position`, the
rule the world's captions are made true under.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- vocabulary
# Saturated colours, far from each other and from the light, low-chroma backgrounds; names are a
# subset of GenEval's colour classes so prompts read the same.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 125, 15),
    "yellow": (240, 220, 30),
    "green": (40, 165, 70),
    "blue": (40, 90, 225),
    "purple": (145, 60, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default: box dimensions that do not count towards the offset

_REAL_BACKGROUNDS = [(245, 245, 240), (250, 248, 242), (240, 243, 247), (247, 245, 250)]
_SYNTH_BACKGROUNDS = [(222, 232, 250), (250, 232, 222), (228, 248, 236), (246, 228, 246), (250, 246, 220)]
_OUTLINE = (35, 35, 45)


# ---------------------------------------------------------------- geometry
def _unit_star(points: int = 5, inner: float = 0.5) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    return (xy - xy.min(0)) / (xy.max(0) - xy.min(0))  # stretch to touch all four sides of the unit box


_POLYGONS = {"triangle": np.array([[0.5, 0.0], [1.0, 1.0], [0.0, 1.0]]), "star": _unit_star()}


@functools.lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` filling the box: every edge row and column is touched.

    Pixels are in where their centre is; for polygons the pixels holding the vertices that lie on
    the box's sides are set too, so the mask's tight extent is always the whole box (a thin star
    tip could otherwise fall between pixel centres). The detector relies on this to re-render the
    ideal shape from a component's bounding box and compare pixel for pixel.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if width < 1 or height < 1:
        raise ValueError(f"shape box must be at least 1x1, got {width}x{height}")
    v, u = (np.mgrid[0:height, 0:width] + 0.5) / np.array([height, width])[:, None, None]
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    else:
        poly = _POLYGONS[shape]
        mask = np.zeros((height, width), dtype=bool)
        for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):  # even-odd crossing rule
            if y1 == y2:
                continue
            crosses = (y1 > v) != (y2 > v)
            mask ^= crosses & (u < x1 + (v - y1) * (x2 - x1) / (y2 - y1))
        for x, y in poly[(poly == 0).any(1) | (poly == 1).any(1)]:
            mask[min(int(y * height), height - 1), min(int(x * width), width - 1)] = True
    mask.setflags(write=False)
    return mask


def relative_position(bbox_a, bbox_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B by GenEval's rule (image y grows downwards).

    The centre offset loses `threshold` x (sum of the two boxes' sizes) on each axis; a relation
    holds when that shrunken offset, divided by the full centre distance, passes 0.5 on its axis.
    """
    a, b = np.asarray(bbox_a, dtype=float), np.asarray(bbox_b, dtype=float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def group_relation(objects_a: list[dict], objects_b: list[dict]) -> str | None:
    """The one relation every object of A has to every object of B (and no other), else None."""
    relations = {frozenset(relative_position(a["bbox"], b["bbox"])) for a in objects_a for b in objects_b}
    if len(relations) == 1:
        (only,) = relations
        if len(only) == 1:
            return next(iter(only))
    return None


def make_object(shape: str, color: str, x0: int, y0: int, side: int) -> dict:
    """Ground-truth record of a shape drawn in the square box at (x0, y0) with the given side."""
    x1, y1 = x0 + side, y0 + side
    return {"shape": shape, "color": color, "bbox": [x0, y0, x1, y1], "center": [(x0 + x1) / 2, (y0 + y1) / 2]}


def outline_width(size: int) -> int:
    """Width in pixels of the synth style's outlines on a size x size image (layouts leave room for it)."""
    return max(1, size // 64)


# ---------------------------------------------------------------- rendering
def render(objects: list[dict], size: int, style: str = "real", rng: np.random.Generator | None = None) -> Image.Image:
    """Draw objects on a light background: "real" is a flat backdrop, "synth" a gradient with outlines.

    Fills are crisp (no anti-aliasing) so every object pixel is exactly its palette colour.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if style == "real":
        canvas = np.empty((size, size, 3), dtype=np.uint8)
        canvas[:] = _REAL_BACKGROUNDS[int(rng.integers(len(_REAL_BACKGROUNDS)))]
    elif style == "synth":
        i, j = rng.choice(len(_SYNTH_BACKGROUNDS), size=2, replace=False)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(2) + 0.5  # 0..1 corner to corner
        t = np.clip(t, 0, 1)[..., None]
        canvas = np.rint((1 - t) * _SYNTH_BACKGROUNDS[i] + t * _SYNTH_BACKGROUNDS[j]).astype(np.uint8)
        width = outline_width(size)
        for obj in objects:  # all outlines first: a fill is never painted over
            x0, y0, x1, y1 = obj["bbox"]
            ring = _dilate(shape_mask(obj["shape"], x1 - x0, y1 - y0), width)
            _paint(canvas, ring, x0 - width, y0 - width, _OUTLINE)
    else:
        raise ValueError(f"unknown render style {style!r}; expected 'real' or 'synth'")
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        _paint(canvas, shape_mask(obj["shape"], x1 - x0, y1 - y0), x0, y0, PALETTE[obj["color"]])
    return Image.fromarray(canvas, "RGB")


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros((h + 2 * width, w + 2 * width), dtype=bool)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            out[dy : dy + h, dx : dx + w] |= mask
    return out


def _paint(canvas: np.ndarray, mask: np.ndarray, x0: int, y0: int, color) -> None:
    h, w = mask.shape
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + h, canvas.shape[0]), min(x0 + w, canvas.shape[1])
    sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    canvas[cy0:cy1, cx0:cx1][sub] = color
