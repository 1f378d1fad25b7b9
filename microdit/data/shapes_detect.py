"""Object detector for the shapes world, exact by construction.

A pixel takes the nearest palette colour when it lies within `max_color_distance` of it (RGB);
pixels sharing a colour form 8-connected components; a component's shape is the ideal shape that,
re-rendered in the component's bounding box with the world's own rasteriser, agrees with it best
(intersection over union). World images have crisp fills in exact palette colours and objects that
never touch, so every object is one component matching its ideal pixel for pixel: the detector
returns the ground truth, each with score 1.

On generated images colours drift and edges blur. Drifted pixels are left out, components smaller
than `min_area` are ignored as noise, and the score - shape IoU x colour fit - falls with how far a
blob is from an ideal shape in a palette colour, so a GenEval-style confidence threshold separates
clean objects from smudges. GenEval scores these detections in `microdit.metrics.geneval`
(`ShapesDetector`, `evaluate_prompt`); this module knows nothing of GenEval.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from microdit.data.shapes_draw import PALETTE, SHAPES, shape_mask

MIN_AREA_FRACTION = 0.004  # of the image: ~65 px at 128 px, half the smallest world object (a small star)
# An irregular blob still overlaps some ideal shape by ~0.5-0.7 IoU; confidence starts above that,
# so speckle and noise (an untrained model's output) do not pass as shapes.
IOU_FLOOR = 0.6
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)
_EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)  # thin star tips meet the body at a corner


def _rgb_array(image) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image or an array (uint8, or floats in 0..1 or 0..255)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got an array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    arr = arr.astype(np.float32)
    return arr * 255.0 if arr.size and arr.max() <= 1.0 else arr


def detect(image, max_color_distance: float = 60.0, min_area: int | None = None) -> list[dict]:
    """Shapes in `image`, most confident first.

    Each detection is `{shape, color, bbox: [x0, y0, x1, y1], center: [x, y], score, iou,
    color_distance}` with the world's box convention (pixel edges, x1/y1 exclusive); `iou` is the
    match to the ideal shape and `color_distance` the mean RGB distance to the palette colour.
    """
    from scipy import ndimage

    rgb = _rgb_array(image)
    height, width = rgb.shape[:2]
    if min_area is None:
        min_area = max(4, round(MIN_AREA_FRACTION * height * width))
    distance = np.linalg.norm(rgb[:, :, None, :] - _PALETTE_RGB, axis=-1)  # (H, W, colours)
    nearest, nearest_distance = distance.argmin(-1), distance.min(-1)
    nearest[nearest_distance > max_color_distance] = -1

    detections = []
    for color_index, color in enumerate(PALETTE):
        labels, _ = ndimage.label(nearest == color_index, structure=_EIGHT_NEIGHBOURS)
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[box] == label
            if component.sum() < min_area:
                continue
            h, w = component.shape
            ious = {shape: _iou(component, shape_mask(shape, w, h)) for shape in SHAPES}
            shape = max(ious, key=ious.get)
            color_distance = float(nearest_distance[box][component].mean())
            color_fit = max(0.0, 1.0 - color_distance / max_color_distance)
            shape_fit = max(0.0, (ious[shape] - IOU_FLOOR) / (1.0 - IOU_FLOOR))
            y0, x0 = box[0].start, box[1].start
            detections.append(
                {
                    "shape": shape,
                    "color": color,
                    "bbox": [x0, y0, x0 + w, y0 + h],
                    "center": [x0 + w / 2, y0 + h / 2],
                    "score": shape_fit * color_fit,
                    "iou": ious[shape],
                    "color_distance": color_distance,
                }
            )
    detections.sort(key=lambda d: -d["score"])
    return detections


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0

