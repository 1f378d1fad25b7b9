"""JourneyDB (Midjourney images with their prompts), from its Hugging Face dataset repo.

Layout of `JourneyDB/JourneyDB`: images in `data/{train,valid}/imgs/NNN.tgz` (train 000-199),
each holding `NNN/<hash>.jpg`; prompts in `data/train/train_anno_realease_repath.jsonl.tgz` and
`data/valid/valid_anno_repath.jsonl.tgz`, one json per line with `img_path` ("./NNN/<hash>.jpg")
and `prompt`. The repo is gated: accept its terms on the hub, then set HF_TOKEN (or run
`huggingface-cli login`); the token is sent to huggingface.co only. `--input` is the repo's
resolve URL (default) or a local directory with the same relative paths.

Each image archive becomes one shard, streamed; an image without a prompt is skipped and counted.
"""
from __future__ import annotations

import json
from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit, as_list, as_parts
from microdit.data.sources.archives import STREAM_ERRORS, is_image_name, iter_tar_files, iter_tar_members, truncated
from microdit.data.sources.layout import ShardWriter, UnitError
from microdit.data.sources.remote import AccessDenied, RemoteError, join, open_location

DEFAULT_INPUT = "https://huggingface.co/datasets/JourneyDB/JourneyDB/resolve/main"
ANNOTATIONS = {
    "train": "data/train/train_anno_realease_repath.jsonl.tgz",
    "valid": "data/valid/valid_anno_repath.jsonl.tgz",
}
OPTIONS = {
    "splits": (as_list, ["train"], "comma list of train, valid"),
    "parts": (as_parts, list(range(200)), "image archive numbers, e.g. 0-199 (train has 000-199)"),
}
ACCESS_HINT = ("JourneyDB is gated: accept its terms at https://huggingface.co/datasets/JourneyDB/JourneyDB, "
               "then set HF_TOKEN or run `huggingface-cli login`")


def archive_path(split: str, part: int) -> str:
    return f"data/{split}/imgs/{part:03d}.tgz"


def image_ref(path: str) -> str:
    """'./000/abc.jpg' and 'imgs/000/abc.jpg' -> '000/abc.jpg': archive folder + file name."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts[-2:])


def read_prompts(ctx: FetchContext, split: str, folders: set[str]) -> dict[str, dict[str, str]]:
    """{archive folder: {image ref: prompt}} for the chosen archives, streamed from the jsonl.tgz."""
    location = join(ctx.input or DEFAULT_INPUT, ANNOTATIONS[split])
    prompts: dict[str, dict[str, str]] = {f: {} for f in folders}
    try:
        with open_location(location, ctx.timeout) as stream:
            for name, f in iter_tar_members(stream, ANNOTATIONS[split]):
                if not name.endswith(".jsonl"):
                    continue
                try:
                    for line in f:
                        if not line.strip():
                            continue
                        row = json.loads(line)
                        ref = image_ref(str(row.get("img_path", "")))
                        folder = ref.split("/")[0]
                        if folder in prompts and row.get("prompt"):
                            prompts[folder][ref] = str(row["prompt"])
                except STREAM_ERRORS as e:
                    raise truncated(ANNOTATIONS[split], e) from e
    except AccessDenied as e:
        raise UserError(f"{ctx.source}: {e}; {ACCESS_HINT}") from None
    except (RemoteError, UnitError) as e:
        raise UserError(f"{ctx.source}: cannot read the {split} prompts {location}: {e}") from None
    except ValueError as e:
        raise UserError(f"{location}: a line is not JSON ({e})") from None
    return prompts


def plan(ctx: FetchContext) -> list[Unit]:
    splits = ctx.options.get("splits") or ["train"]
    bad = [s for s in splits if s not in ANNOTATIONS]
    if bad:
        raise UserError(f"journeydb split {bad[0]!r}: expected train and/or valid")
    parts = ctx.options.get("parts") or list(range(200))
    units = []
    for split in splits:
        prompts = read_prompts(ctx, split, {f"{p:03d}" for p in parts})
        for part in parts:
            path = archive_path(split, part)
            units.append(Unit(len(units), path, (split, prompts[f"{part:03d}"])))
    return units


def fill(unit: Unit, ctx: FetchContext, shard: ShardWriter) -> None:
    split, prompts = unit.payload

    def refused(path: str, reason: str) -> None:
        if is_image_name(path):
            shard.skip(reason, f"{unit.name}/{path}")

    with open_location(join(ctx.input or DEFAULT_INPUT, unit.name), ctx.timeout) as stream:
        for path, data in iter_tar_files(stream, unit.name, refused):
            if not is_image_name(path):
                continue
            ref = image_ref(path)
            url = f"{unit.name}/{ref}"
            prompt = prompts.get(ref)
            if prompt is None:
                shard.skip("no caption", url, Path(ref).stem)
                continue
            shard.add_image(Path(ref).stem, data, prompt, url, {"img_path": ref, "split": split})
