"""SA-1B (Segment Anything 1B): ~1000 tar archives, each of `sa_<id>.jpg` + `sa_<id>.json` (masks).

Meta hands out the archive links, after you accept the licence at
https://ai.meta.com/datasets/segment-anything-downloads/, as a text file of
`file_name<TAB>cdn_link` lines under a header line. The links expire, so there is no default:
`--input` is that file (path or URL), or a local directory of already fetched `sa_*.tar`.
Each archive becomes one shard, streamed (never stored). Only images are kept; SA-1B has no
captions, the caption stage adds LLaVA's. A shard is named after the archive's line in the
links file, so refreshed links resume the same shards.
"""
from __future__ import annotations

from pathlib import Path

from microdit.errors import UserError
from microdit.data.sources import FetchContext, Unit, as_parts
from microdit.data.sources.archives import is_image_name, iter_tar_files, member_path
from microdit.data.sources.layout import ShardWriter
from microdit.data.sources.remote import RemoteError, is_url, local_path, open_location, read_bytes

DEFAULT_INPUT = None
OPTIONS = {
    "parts": (as_parts, None, "archives to fetch, as 0-based positions in the links file, e.g. 0-9 (default all)"),
}
LINKS_PAGE = "https://ai.meta.com/datasets/segment-anything-downloads/"


def read_links(location: str, timeout: float, retries: int) -> list[tuple[str, str]]:
    """(file name, link) pairs of a links file, or of the sa_*.tar files in a local directory."""
    if not is_url(location) and local_path(location).is_dir():
        return [(p.name, str(p)) for p in sorted(local_path(location).glob("*.tar"))]
    try:
        text = read_bytes(location, timeout, retries).decode("utf-8")
    except (RemoteError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the SA-1B links file {location}: {e}") from None
    links = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.strip().split("\t")
        if fields == [""] or [f.lower() for f in fields[:2]] == ["file_name", "cdn_link"]:
            continue
        if len(fields) < 2 or not fields[0].endswith(".tar"):
            raise UserError(f"{location}: line {n}: expected 'sa_XXXXXX.tar<TAB>link', got {line[:80]!r}")
        links.append((fields[0], fields[1]))
    return links


def plan(ctx: FetchContext) -> list[Unit]:
    if not ctx.input:
        raise UserError(f"sa1b needs --input: the links file from {LINKS_PAGE} (links expire) "
                        "or a directory of sa_*.tar archives")
    links = read_links(ctx.input, ctx.timeout, ctx.retries)
    if not links:
        raise UserError(f"{ctx.input}: no SA-1B archive listed")
    chosen = ctx.options.get("parts") or range(len(links))
    beyond = [i for i in chosen if i >= len(links)]
    if beyond:
        raise UserError(f"sa1b part {beyond[0]} does not exist: {ctx.input} lists {len(links)} archives")
    return [Unit(i, links[i][0], links[i][1]) for i in chosen]


def fill(unit: Unit, ctx: FetchContext, shard: ShardWriter) -> None:
    def refused(path: str, reason: str) -> None:
        if is_image_name(path):
            shard.skip(reason, f"{unit.name}/{path}")

    with open_location(unit.payload, ctx.timeout) as stream:
        for path, data in iter_tar_files(stream, unit.name, refused):
            path = member_path(path)
            if not path.lower().endswith((".jpg", ".jpeg")):
                continue  # the per-image mask json: not needed for text-to-image training
            shard.add_image(Path(path).stem, data, None, f"{unit.name}/{path}", {"archive": unit.name})
