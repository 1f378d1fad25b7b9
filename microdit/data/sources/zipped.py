"""Sources that are one big zip of images plus a caption index (COCO, TextCaps).

The fetcher builds the list of images with their captions; here it is cut into slices of
`samples_per_shard` (sorted by key, so the slicing is stable across runs), one shard per slice.
Every caption goes to the sample's json; one of them (the first, or a seeded random one) is the
`.txt` caption.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit
from microdit.data.sources.archives import is_image_name, open_zip, read_member, zip_refusal
from microdit.data.sources.layout import ShardWriter, UnitError
from microdit.data.sources.remote import is_url

CAPTION_PICKS = ("first", "random")


@dataclass
class Item:
    key: str
    member: str | None  # path inside the zip; None when the index names an image the zip lacks
    captions: list[str]
    extra: dict = field(default_factory=dict)


def pick_caption(captions: list[str], how: str, seed: int, key: str) -> str | None:
    """Deterministic per key, so re-running or re-slicing picks the same caption."""
    if not captions:
        return None
    if how == "random":
        return random.Random(f"{seed}:{key}").choice(captions)
    return captions[0]


def image_members(zip_path: Path, location: str, source: str) -> dict[str, str]:
    """Image base name -> member path. A damaged download is deleted so that a rerun fetches it anew.
    A member `fill_slice` will refuse (`../x.jpg`, a link) is listed only where no safe one has its
    base name, so it is counted under its reason but never shadows an honest image."""
    try:
        with open_zip(zip_path) as zf:
            images = [i for i in zf.infolist() if is_image_name(i.filename) and not i.is_dir()]
            safe_last = sorted(images, key=lambda i: zip_refusal(i) is None)
            return {Path(i.filename).name: i.filename for i in safe_last}
    except UnitError as e:
        if is_url(location):
            zip_path.unlink(missing_ok=True)
            raise UserError(f"{source}: {e} (fetched from {location}; deleted, rerun to fetch it again)") from None
        raise UserError(f"{source}: {e}") from None


def slice_units(items: list[Item], zip_path: Path, label: str, per_shard: int) -> list[Unit]:
    items = sorted(items, key=lambda it: it.key)
    units = []
    for shard_id, start in enumerate(range(0, len(items), per_shard)):
        chunk = items[start:start + per_shard]
        units.append(Unit(shard_id, f"{label}[{chunk[0].key}..{chunk[-1].key}]", (str(zip_path), label, chunk)))
    return units


def fill_slice(unit: Unit, ctx: FetchContext, shard: ShardWriter) -> None:
    zip_path, label, items = unit.payload
    how, seed = ctx.options.get("caption_pick", "first"), ctx.options.get("seed", 0)
    with open_zip(Path(zip_path)) as zf:
        for it in items:
            url = f"{label}/{it.member or it.key}"
            caption = pick_caption(it.captions, how, seed, it.key)
            extra = {**it.extra, "captions": it.captions}
            if it.member is None:
                shard.skip("missing image", url, it.key, caption, extra)
            elif caption is None:
                shard.skip("no caption", url, it.key, None, extra)
            elif (reason := zip_refusal(zf.getinfo(it.member))) is not None:
                shard.skip(reason, url, it.key, caption, extra)
            else:
                try:
                    data = read_member(zf, it.member)
                except ValueError:
                    shard.skip("corrupt image", url, it.key, caption, extra)
                    continue
                shard.add_image(it.key, data, caption, url, extra)


def parse_caption_pick(text: str) -> str:
    if text not in CAPTION_PICKS:
        raise ValueError(f"expected one of {', '.join(CAPTION_PICKS)}")
    return text
