"""GenEval: does an image contain what its prompt asks for? Six tasks, scored by detection rules.

Our implementation of the protocol of Ghosh et al. (djghosh13/geneval): 553 prompts, each with
`include` clauses `{class, count, color?, position?: [relation, index of another clause]}` and
optional `exclude` clauses `{class, count}`; four images per prompt. An image is correct when:

- detections above a confidence threshold (0.3; 0.9 for counting prompts, compared in float32),
  most confident first (equal scores: the later detection first, as the official reversed argsort)
  and at most 16 per class, give every include clause at least `count` objects of its class;
- for a clause with a colour, the colours of its `count` most confident objects include the colour
  `count` times (colour by CLIP zero-shot on the object's crop, outside its mask painted grey);
- for a clause with a position, each of its objects stands in that relation to every object of the
  clause it points at, by `relative_position` (a margin of 0.1 x the two boxes' sizes);
- no exclude clause has `count` or more objects (counting prompts exclude count+1: exact counts).

A task's score is the fraction of its images that are correct; overall is the mean over tasks.

The detector is pluggable (`Detector`): Mask2Former from transformers for the paper preset (the
official code uses the mmdetection Mask2Former Swin-S checkpoint, so numbers may differ slightly),
or the exact shapes detector for the smoke world, which also reports colours, so no CLIP is needed.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from microdit.io import atomic_path

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# GenEval's colour classes and the three phrasings whose CLIP text embeddings are averaged per colour
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
CROP_BACKGROUND = (153, 153, 153)  # grey painted outside the object's mask before colour classification

# The 553-prompt metadata, pinned to a commit of the official repository.
PROMPTS_URL = (
    "https://raw.githubusercontent.com/djghosh13/geneval/"
    "af4902f24d3ca90ebbb446dd9891a59e0f82725f/prompts/evaluation_metadata.jsonl"
)
PROMPTS_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


@dataclass(frozen=True)
class Rules:
    """The protocol's constants (GenEval's defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16  # per class, most confident first
    position_margin: float = 0.1  # fraction of the two boxes' summed sizes ignored in the offset


# ---------------------------------------------------------------- prompts
def fetch_prompts(url: str, sha256: str, dest: str | os.PathLike) -> Path:
    """Download the prompt metadata to `dest` unless a copy with the right checksum is there."""
    from microdit.errors import UserError

    dest = Path(dest)
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download GenEval prompts from {url} ({e}); put the file at {dest} by hand") from e
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise UserError(f"GenEval prompts from {url} have sha256 {got}, expected {sha256}; check the URL")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def load_prompts(path: str | os.PathLike) -> list[dict]:
    """GenEval metadata (one JSON object per line), checked clause by clause."""
    from microdit.errors import UserError

    path = Path(path)
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            meta = json.loads(line)
            _check_prompt(meta)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{number}: not a GenEval prompt ({e})") from e
        prompts.append(meta)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _check_prompt(meta: dict) -> None:
    if not isinstance(meta.get("prompt"), str) or not isinstance(meta.get("tag"), str):
        raise ValueError("needs string 'prompt' and 'tag'")
    include = meta["include"]
    for i, clause in enumerate(include):
        if not isinstance(clause["class"], str) or int(clause["count"]) < 1:
            raise ValueError(f"include[{i}] needs a class and a count >= 1")
        if "position" in clause:
            relation, target = clause["position"]
            if relation not in RELATIONS or not 0 <= target < i:
                raise ValueError(f"include[{i}] position must be [one of {RELATIONS}, an earlier clause index]")
    for clause in meta.get("exclude", []):
        if not isinstance(clause["class"], str) or int(clause["count"]) < 1:
            raise ValueError("exclude clauses need a class and a count >= 1")


# ---------------------------------------------------------------- detectors
class Detector(Protocol):
    """Objects in an image: `[{label, score, bbox: [x0, y0, x1, y1], mask?: (H, W) bool, ...}]`."""

    gives_colour: bool  # detections carry a `color` (no colour classifier needed)

    def detect(self, image: Image.Image) -> list[dict]: ...


class ShapesDetector:
    """The smoke world's exact detector (`microdit.data.shapes_detect`) in the `Detector` format."""

    gives_colour = True

    def detect(self, image: Image.Image) -> list[dict]:
        from microdit.data.shapes_detect import detect

        return shapes_detections(detect(image))


def shapes_detections(found: list[dict]) -> list[dict]:
    """The shapes detector's output (`{shape, color, bbox, score, ...}`) in the `Detector` format."""
    return [{"label": d["shape"], "score": d["score"], "bbox": d["bbox"], "color": d["color"]} for d in found]


# Detector vocabularies name a few COCO classes differently from GenEval's prompts.
_LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "sofa": "couch",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "hair dryer": "hair drier",
    "brocolli": "broccoli",
}


def geneval_label(name: str) -> str:
    """A detector's class name in GenEval's vocabulary."""
    name = name.strip().lower().replace("_", " ").replace("-", " ")
    return _LABEL_ALIASES.get(name, name)


def mask_box(mask: np.ndarray) -> list[int]:
    """Tight box [x0, y0, x1, y1] (x1, y1 exclusive) of a non-empty boolean mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def instances_to_detections(result: dict, id2label: dict[int, str]) -> list[dict]:
    """One image's `post_process_instance_segmentation(..., return_binary_maps=True)` output as detections."""
    segments = result["segments_info"]
    if not segments:
        return []
    masks = result["segmentation"].bool().cpu().numpy()  # (instances, H, W) when any were kept
    detections = []
    for segment, mask in zip(segments, masks):
        if mask.any():
            label = geneval_label(id2label[int(segment["label_id"])])
            detections.append({"label": label, "score": float(segment["score"]), "bbox": mask_box(mask), "mask": mask})
    return sorted(detections, key=lambda d: -d["score"])


class Mask2FormerDetector:
    """COCO instance segmentation with transformers' Mask2Former (paper preset).

    Score = class probability x mean mask probability, as Mask2Former ranks instances.
    Instances below `min_score` (the lowest threshold the rules use) are dropped early.
    """

    gives_colour = False

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu", min_score: float = 0.3):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.min_score = min_score

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[dict]:
        image = image.convert("RGB")
        inputs = self.processor(images=[image], return_tensors="pt").to(self.model.device)
        outputs = self.model(**inputs)
        (result,) = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.min_score, target_sizes=[image.size[::-1]], return_binary_maps=True
        )
        return instances_to_detections(result, self.id2label)


def load_detector(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Detector:
    """The detector in the models stage's `detector` directory (`kind` shapes or mask2former)."""
    from microdit.errors import UserError

    model_dir = Path(model_dir)
    kind = None
    for name in ("MODEL_INFO.json", "config.json"):
        if (model_dir / name).is_file():
            meta = json.loads((model_dir / name).read_text())
            kind = meta.get("kind") or (meta.get("model_type") if name == "config.json" else None)
            if kind:
                break
    if kind == "shapes":
        return ShapesDetector()
    if kind == "mask2former":
        return Mask2FormerDetector(model_dir, device)
    raise UserError(f"no GenEval detector at {model_dir} (kind {kind!r}); expected kind shapes or mask2former")


# ---------------------------------------------------------------- colour of an object
ColourFn = Callable[[Image.Image | None, list[dict], str], list[str]]


def detection_colour(image, detections: list[dict], classname: str) -> list[str]:
    """Colours reported by the detector itself (the shapes detector knows them exactly)."""
    return [d["color"] for d in detections]


def object_crop(image: Image.Image, detection: dict, background=CROP_BACKGROUND) -> Image.Image:
    """The object's box, with everything outside its mask (when it has one) painted `background`."""
    image = image.convert("RGB")
    if detection.get("mask") is not None:
        mask = Image.fromarray(np.asarray(detection["mask"], dtype=np.uint8) * 255)
        image = Image.composite(image, Image.new("RGB", image.size, background), mask)
    x0, y0, x1, y1 = (int(round(v)) for v in detection["bbox"][:4])
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ClipColour:
    """Zero-shot colour of each object: its crop against GenEval's colour prompts for its class."""

    def __init__(self, model_dir: str | os.PathLike, device: str | torch.device = "cpu", colours: Sequence[str] = COLORS):
        from microdit.metrics.clip_score import load_clip

        self.model, self.processor, self.name = load_clip(model_dir, device)
        self.colours = list(colours)
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _classifier(self, classname: str) -> torch.Tensor:
        """(colours, D): per colour, the normalised mean of its normalised template embeddings."""
        if classname not in self._classifiers:
            texts = [t.format(color=c, object=classname) for c in self.colours for t in COLOR_TEMPLATES]
            max_length = self.model.config.text_config.max_position_embeddings
            tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            embeds = self.model.get_text_features(**tokens.to(self.model.device)).float()
            embeds = torch.nn.functional.normalize(embeds, dim=-1).view(len(self.colours), len(COLOR_TEMPLATES), -1)
            self._classifiers[classname] = torch.nn.functional.normalize(embeds.mean(1), dim=-1)
        return self._classifiers[classname]

    @torch.no_grad()
    def __call__(self, image, detections: list[dict], classname: str) -> list[str]:
        if not detections:
            return []
        image = _open_image(image)
        crops = [object_crop(image, d) for d in detections]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(self.model.device)
        embeds = torch.nn.functional.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)
        best = (embeds @ self._classifier(classname).T).argmax(-1)
        return [self.colours[i] for i in best.tolist()]


# ---------------------------------------------------------------- the rules
def relative_position(box_a, box_b, margin: float = Rules.position_margin) -> set[str]:
    """Relations of box A to box B by GenEval's rule (one implementation, shared with the shapes
    world, whose captions must be true under the same rule)."""
    from microdit.data.shapes_draw import relative_position as rule

    return rule(np.asarray(box_a, dtype=float)[:4], np.asarray(box_b, dtype=float)[:4], margin)


def confident_objects(detections: list[dict], tag: str, rules: Rules = Rules()) -> dict[str, list[dict]]:
    """Class -> its detections above the prompt's threshold, most confident first, at most max_objects.

    As the official scorer, which orders a class's detections with a reversed ascending argsort and
    compares float32 scores: detections with equal scores come latest first (it decides which
    objects of a class the colour and position checks look at, and the exact shapes detector gives
    every object 1.0), and the comparison with the threshold is in float32, so a score of exactly
    float32(0.3) is not above 0.3."""
    cut = np.float32(rules.counting_threshold if tag == "counting" else rules.threshold)
    by_class: dict[str, list[tuple[int, dict]]] = {}
    for index, d in enumerate(detections):
        if np.float32(d["score"]) > cut:
            by_class.setdefault(d["label"], []).append((index, d))
    return {label: [d for _, d in sorted(found, key=lambda t: (np.float32(t[1]["score"]), t[0]), reverse=True)
                    ][:rules.max_objects]
            for label, found in by_class.items()}


def judge(
    meta: dict,
    detections: list[dict],
    colour_fn: ColourFn = detection_colour,
    image=None,
    rules: Rules = Rules(),
) -> tuple[bool, list[str]]:
    """Is one image correct for its prompt? (correct, reasons it is not)."""
    objects = confident_objects(detections, meta["tag"], rules)
    reasons: list[str] = []
    matched: list[list[dict] | None] = []  # per include clause: its objects if it was satisfied
    for clause in meta["include"]:
        name, count = clause["class"], int(clause["count"])
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {count} {name}, found {len(found)}")
        if ok and "color" in clause:
            colours = colour_fn(image, found, name)
            hits = colours.count(clause["color"])
            if hits < count:
                ok = False
                reasons.append(f"expected {count} {clause['color']} {name}, found colours {', '.join(colours)}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            anchors = matched[target]
            if anchors is None:
                ok = False
                reasons.append(f"no {meta['include'][target]['class']} for {name} to be {relation}")
            else:
                for obj in found:
                    wrong = [relative_position(obj["bbox"], t["bbox"], rules.position_margin) for t in anchors]
                    wrong = [r for r in wrong if relation not in r]
                    if wrong:
                        ok = False
                        seen = " and ".join(sorted(wrong[0])) or "overlapping"
                        reasons.append(f"expected {name} {relation} {meta['include'][target]['class']}, found {seen}")
                        break
        matched.append(found if ok else None)
    for clause in meta.get("exclude", []):
        n = len(objects.get(clause["class"], []))
        if n >= int(clause["count"]):
            reasons.append(f"expected fewer than {clause['count']} {clause['class']}, found {n}")
    return not reasons, reasons


def evaluate_prompt(
    meta: dict, detections: list[dict], threshold: float = Rules.threshold,
    counting_threshold: float = Rules.counting_threshold,
) -> tuple[bool, str]:
    """One image's shapes-detector output (`microdit.data.shapes_detect.detect`) against its GenEval
    metadata, by `judge` with the detector's colours; returns (correct, reasons joined)."""
    correct, reasons = judge(meta, shapes_detections(detections), detection_colour, None,
                             Rules(threshold=threshold, counting_threshold=counting_threshold))
    return correct, "; ".join(reasons)


def summarize(metadata: list[dict], verdicts: list[list[tuple[bool, list[str]]]], rules: Rules = Rules()) -> dict:
    """Task accuracies over images, their mean, and the per-prompt record."""
    if len(verdicts) != len(metadata):
        raise ValueError(f"{len(metadata)} prompts but results for {len(verdicts)}")
    per_task: dict[str, list[bool]] = {}
    per_prompt = []
    for i, (meta, results) in enumerate(zip(metadata, verdicts)):
        if not results:
            raise ValueError(f"prompt {i} ({meta['prompt']!r}) has no images")
        correct = [ok for ok, _ in results]
        per_task.setdefault(meta["tag"], []).extend(correct)
        per_prompt.append({"prompt": meta["prompt"], "tag": meta["tag"], "correct": correct, "reasons": ["; ".join(r) for _, r in results]})
    tasks = {tag: float(np.mean(c)) for tag, c in per_task.items()}
    every_image = [ok for p in per_prompt for ok in p["correct"]]
    return {
        "tasks": tasks,
        "overall": float(np.mean(list(tasks.values()))),
        "images": len(every_image),
        "prompts": len(per_prompt),
        "correct_images": float(np.mean(every_image)),
        "correct_prompts": float(np.mean([any(p["correct"]) for p in per_prompt])),
        "rules": asdict(rules),
        "per_prompt": per_prompt,
    }


def score(
    metadata: list[dict],
    detections_per_image: list[list[list[dict]]],
    colour_fn: ColourFn = detection_colour,
    images: list[list] | None = None,
    rules: Rules = Rules(),
) -> dict:
    """GenEval scores from detections: `detections_per_image[i][k]` is image k of prompt i.

    `images` (same nesting; PIL images or paths) is needed only by colour classifiers that look
    at pixels. Returns `{"tasks": {task: accuracy}, "overall", "per_prompt": [...], ...}`.
    """
    if len(detections_per_image) != len(metadata) or (images is not None and len(images) != len(metadata)):
        raise ValueError(f"{len(metadata)} prompts but detections (and images) for a different number")
    verdicts = []
    for i, (meta, per_image) in enumerate(zip(metadata, detections_per_image)):
        prompt_images = images[i] if images is not None else [None] * len(per_image)
        verdicts.append([judge(meta, dets, colour_fn, img, rules) for dets, img in zip(per_image, prompt_images)])
    return summarize(metadata, verdicts, rules)


def _open_image(image) -> Image.Image:
    from microdit.errors import UserError

    if isinstance(image, Image.Image):
        return image
    if image is None:
        raise ValueError("this colour classifier needs the image; pass images= to score()")
    try:
        with Image.open(image) as f:
            return f.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read generated image {image}: {e}") from e


def evaluate_images(
    metadata: list[dict],
    image_paths: list[list],
    detector: Detector,
    colour_fn: ColourFn | None = None,
    rules: Rules = Rules(),
) -> dict:
    """Detect and judge every image (`image_paths[i][k]`: image k of prompt i), one at a time."""
    from tqdm import tqdm

    if colour_fn is None:
        if not detector.gives_colour:
            raise ValueError("this detector reports no colours; pass colour_fn (e.g. ClipColour)")
        colour_fn = detection_colour
    if len(image_paths) != len(metadata):
        raise ValueError(f"{len(metadata)} prompts but images for {len(image_paths)}")
    verdicts = []
    for meta, paths in tqdm(list(zip(metadata, image_paths)), desc="GenEval", disable=None):
        results = []
        for path in paths:
            image = _open_image(path)
            results.append(judge(meta, detector.detect(image), colour_fn, image, rules))
        verdicts.append(results)
    return summarize(metadata, verdicts, rules)
