"""TextCaps 0.1 (captions of images with text in them; the images are OpenImages ones from TextVQA).

Captions: `data/textcaps/TextCaps_0.1_{train,val}.json`, `{"data": [...]}` with one entry per
caption: `image_id`, `caption_str`, `reference_strs` (all captions of that image), `image_path`,
`image_width`, `image_height`. Images: `images/train_val_images.zip`, members
`train_images/<image_id>.jpg` (val images live there too). The test split has no captions.

One sample per image, keyed by `image_id`; all its captions go to the json, the first (or a
seeded random one) to `.txt`. `--input` is the host (default the official one) or a local
directory with the same relative paths.
"""
from __future__ import annotations

import json
from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit, as_list
from microdit.data.sources.remote import RemoteError, fetch_file, join, read_bytes
from microdit.data.sources.zipped import Item, fill_slice, image_members, parse_caption_pick, slice_units

DEFAULT_INPUT = "https://dl.fbaipublicfiles.com/textvqa"
CAPTIONS = {"train": "data/textcaps/TextCaps_0.1_train.json", "val": "data/textcaps/TextCaps_0.1_val.json"}
IMAGES = "images/train_val_images.zip"
OPTIONS = {
    "splits": (as_list, ["train", "val"], "comma list of train, val"),
    "caption_pick": (parse_caption_pick, "first", "first | random: which caption goes to .txt (all go to .json)"),
    "seed": (int, 0, "seed of caption_pick=random"),
}

fill = fill_slice


def read_captions(ctx: FetchContext, split: str) -> list[dict]:
    location = join(ctx.input or DEFAULT_INPUT, CAPTIONS[split])
    try:
        doc = json.loads(read_bytes(location, ctx.timeout, ctx.retries))
        return list(doc["data"])
    except RemoteError as e:
        raise UserError(f"{ctx.source}: cannot fetch {location}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{location}: not a TextCaps caption file ({e})") from None


def collect(entries: list[dict], split: str, images: dict[str, Item]) -> None:
    """Merge caption entries (one per caption) into one item per image."""
    for entry in entries:
        image_id = str(entry["image_id"])
        item = images.setdefault(image_id, Item(image_id, None, [], {
            "image_id": image_id, "split": split, "image_path": entry.get("image_path"),
            "image_width": entry.get("image_width"), "image_height": entry.get("image_height")}))
        refs = [" ".join(str(r).split()) for r in entry.get("reference_strs") or []]
        for text in refs or [" ".join(str(entry.get("caption_str", "")).split())]:
            if text and text not in item.captions:
                item.captions.append(text)


def plan(ctx: FetchContext) -> list[Unit]:
    splits = ctx.options.get("splits") or list(CAPTIONS)
    bad = [s for s in splits if s not in CAPTIONS]
    if bad:
        raise UserError(f"textcaps split {bad[0]!r}: expected train and/or val (test has no captions)")
    images: dict[str, Item] = {}
    for split in splits:
        collect(read_captions(ctx, split), split, images)
    location = join(ctx.input or DEFAULT_INPUT, IMAGES)
    try:
        zip_path = fetch_file(location, ctx.downloads, ctx.timeout, ctx.retries)
    except RemoteError as e:
        raise UserError(f"{ctx.source}: cannot fetch {location}: {e}") from None
    members = image_members(zip_path, location, ctx.source)
    for item in images.values():
        item.member = members.get(f"{item.key}.jpg") or members.get(Path(item.extra["image_path"] or "").name)
    return slice_units(list(images.values()), zip_path, Path(IMAGES).name, ctx.samples_per_shard)
