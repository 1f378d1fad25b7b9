"""DiffusionDB Large (Stable Diffusion images with the prompts users wrote), from its hub repo.

Layout of `poloclub/diffusiondb`: `diffusiondb-large-part-1/part-000001.zip` ... `part-010000.zip`
and `diffusiondb-large-part-2/part-010001.zip` ... `part-014000.zip`, each zip holding ~1000
`<uuid>.webp` images and `part-NNNNNN.json` = {image file name: {"p": prompt, "se": seed,
"c": cfg, "st": steps, "sa": sampler}}. `metadata-large.parquet` has one row per image with
`image_name`, `part_id`, `image_nsfw` and `prompt_nsfw` scores; like the paper's code we drop
images whose either score is above 0.2. `--input` is the repo's resolve URL (default) or a local
directory with the same relative paths.

Each part becomes one shard; a zip needs its end to be read, so it is fetched to
`<out>/_downloads` first (resumable) and deleted once its shard is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit, as_optional_float, as_parts
from microdit.data.sources.archives import is_image_name, open_zip, read_member, zip_refusal
from microdit.data.sources.layout import ShardWriter, UnitError
from microdit.data.sources.remote import RemoteError, fetch_file, is_url, join

DEFAULT_INPUT = "https://huggingface.co/datasets/poloclub/diffusiondb/resolve/main"
METADATA = "metadata-large.parquet"
LAST_PART = 14000
OPTIONS = {
    "parts": (as_parts, list(range(1, LAST_PART + 1)), f"part numbers, e.g. 1-140 (Large has 1-{LAST_PART})"),
    "nsfw_threshold": (as_optional_float, 0.2,
                       f"drop images whose image_nsfw or prompt_nsfw ({METADATA}) is above it; none: keep all"),
}


def part_path(part: int) -> str:
    folder = "diffusiondb-large-part-1" if part <= 10000 else "diffusiondb-large-part-2"
    return f"{folder}/part-{part:06d}.zip"


def unsafe_images(ctx: FetchContext, parts: list[int], threshold: float) -> dict[int, list[str]]:
    """{part: [image file names scored above the threshold]} from the metadata table."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    location = join(ctx.input or DEFAULT_INPUT, METADATA)
    try:
        path = fetch_file(location, ctx.downloads, ctx.timeout, ctx.retries)
        table = pq.read_table(path, columns=["image_name", "part_id", "image_nsfw", "prompt_nsfw"])
    except RemoteError as e:
        raise UserError(f"{ctx.source}: cannot fetch {location} ({e}); "
                        "or pass --opt nsfw_threshold=none to keep every image") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{location}: not DiffusionDB metadata ({e})") from None
    table = table.filter(pc.is_in(table["part_id"].cast(pa.int64()), value_set=pa.array(parts, pa.int64())))
    flagged = table.filter(pc.or_(pc.greater(table["image_nsfw"], threshold),
                                  pc.greater(table["prompt_nsfw"], threshold)))
    unsafe: dict[int, list[str]] = {}
    for name, part in zip(flagged["image_name"].to_pylist(), flagged["part_id"].to_pylist()):
        unsafe.setdefault(int(part), []).append(name)
    return unsafe


def plan(ctx: FetchContext) -> list[Unit]:
    parts = ctx.options.get("parts") or OPTIONS["parts"][1]
    if parts[0] < 1 or parts[-1] > LAST_PART:
        raise UserError(f"diffusiondb parts run 1-{LAST_PART}, got {parts[0]}-{parts[-1]}")
    threshold = ctx.options.get("nsfw_threshold", 0.2)
    unsafe = {} if threshold is None else unsafe_images(ctx, parts, threshold)
    return [Unit(i, part_path(p), (p, sorted(unsafe.get(p, [])))) for i, p in enumerate(parts)]


def fill(unit: Unit, ctx: FetchContext, shard: ShardWriter) -> None:
    part, unsafe = unit.payload
    location = join(ctx.input or DEFAULT_INPUT, unit.name)
    zip_path = fetch_file(location, ctx.downloads / "parts", ctx.timeout, retries=0)
    downloaded = is_url(location)
    try:
        with open_zip(zip_path) as zf:
            fill_from_zip(zf, part, set(unsafe), unit.name, shard)
    except UnitError as e:
        if downloaded:  # a damaged download: fetch it afresh on the retry
            zip_path.unlink(missing_ok=True)
            e.transient = True
        raise
    if downloaded and not ctx.options.get("keep_downloads"):
        zip_path.unlink(missing_ok=True)


def fill_from_zip(zf, part: int, unsafe: set[str], label: str, shard: ShardWriter) -> None:
    index_name = f"part-{part:06d}.json"
    index_member = next((n for n in zf.namelist() if Path(n).name == index_name), None)
    try:
        prompts = json.loads(read_member(zf, index_member)) if index_member else {}
    except ValueError:
        prompts = {}  # every image of the part is then counted as "no caption"
    for member in sorted(n for n in zf.namelist() if is_image_name(n)):
        name = Path(member).name
        key, url, info = Path(name).stem, f"{label}/{name}", prompts.get(name) or {}
        caption = info.get("p")
        if name in unsafe:
            shard.skip("nsfw", url, key, caption)
            continue
        if not caption:
            shard.skip("no caption", url, key)
            continue
        if (reason := zip_refusal(zf.getinfo(member))) is not None:
            shard.skip(reason, url, key, caption)
            continue
        try:
            data = read_member(zf, member)
        except ValueError:
            shard.skip("corrupt image", url, key, caption)
            continue
        extra = {"part": part, "seed": info.get("se"), "cfg": info.get("c"), "steps": info.get("st"),
                 "sampler": info.get("sa")}
        shard.add_image(key, data, caption, url, extra)
