"""COCO-2014 validation, the paper's evaluation set: `val2014.zip` (40,504 images named
`val2014/COCO_val2014_<12-digit id>.jpg`) and `annotations_trainval2014.zip`, whose
`annotations/captions_val2014.json` holds `images` [{id, file_name, width, height}] and
`annotations` [{image_id, caption}] (about five captions per image).

One sample per image, keyed by its file name stem; all its captions go to the json, the first
(or a seeded random one) to `.txt`. `--input` is the host (default the official one) or a local
directory holding `zips/val2014.zip` and `annotations/annotations_trainval2014.zip`.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit
from microdit.data.sources.archives import open_zip
from microdit.data.sources.layout import UnitError
from microdit.data.sources.remote import RemoteError, fetch_file, join
from microdit.data.sources.zipped import Item, fill_slice, image_members, parse_caption_pick, slice_units

DEFAULT_INPUT = "http://images.cocodataset.org"
IMAGES = "zips/val2014.zip"
ANNOTATIONS = "annotations/annotations_trainval2014.zip"
CAPTIONS_MEMBER = "captions_val2014.json"
OPTIONS = {
    "caption_pick": (parse_caption_pick, "first", "first | random: which caption goes to .txt (all go to .json)"),
    "seed": (int, 0, "seed of caption_pick=random"),
}

fill = fill_slice


def _fetch(ctx: FetchContext, relpath: str) -> Path:
    location = join(ctx.input or DEFAULT_INPUT, relpath)
    try:
        return fetch_file(location, ctx.downloads, ctx.timeout, ctx.retries)
    except RemoteError as e:
        raise UserError(f"{ctx.source}: cannot fetch {location}: {e}") from None


def read_captions(annotations_zip: Path) -> tuple[list[dict], dict[int, list[str]]]:
    try:
        with open_zip(annotations_zip) as zf:
            member = next((n for n in zf.namelist() if n.endswith(CAPTIONS_MEMBER)), None)
            if member is None:
                raise UserError(f"{annotations_zip.name} has no {CAPTIONS_MEMBER}")
            doc = json.loads(zf.read(member))
    except (UnitError, ValueError) as e:
        if annotations_zip.parent.name == "_downloads":  # ours: fetch it anew next time
            annotations_zip.unlink(missing_ok=True)
        raise UserError(f"cannot read COCO captions from {annotations_zip.name}: {e}") from None
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in doc.get("annotations", []):
        text = " ".join(str(ann.get("caption", "")).split())  # some captions carry newlines
        if text:
            captions[ann["image_id"]].append(text)
    return doc.get("images", []), captions


def plan(ctx: FetchContext) -> list[Unit]:
    images, captions = read_captions(_fetch(ctx, ANNOTATIONS))
    zip_path = _fetch(ctx, IMAGES)
    members = image_members(zip_path, join(ctx.input or DEFAULT_INPUT, IMAGES), ctx.source)
    items = [
        Item(key=Path(img["file_name"]).stem, member=members.get(Path(img["file_name"]).name),
             captions=captions.get(img["id"], []),
             extra={"image_id": img["id"], "file_name": img["file_name"]})
        for img in images
    ]
    return slice_units(items, zip_path, Path(IMAGES).name, ctx.samples_per_shard)
