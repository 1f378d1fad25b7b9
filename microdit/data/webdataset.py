"""Read the raw webdataset shards the download stage writes (`<raw>/00000.tar`, ...).

A sample is the run of consecutive tar members sharing a key: `<key>.jpg` (or png/webp),
`<key>.txt` (caption) and `<key>.json` (metadata). Bad input never stops a whole source:
- a truncated or garbled shard yields the samples completed before the damage, then stops
  and is listed in `ReadStats.truncated_shards`; the sample it was reading when the damage came
  is dropped and counted in `cut_samples` (samples after it are not seen at all);
- a member that cannot be decoded (non-UTF-8 caption, malformed json) is skipped and counted;
- a key without an image member is skipped and counted.
Image bytes are handed over undecoded: whether they are a valid image is the caller's call.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = tarfile.BLOCKSIZE


@dataclass
class Sample:
    key: str
    image: bytes
    ext: str  # image extension, lower case, e.g. "jpg"
    caption: str | None  # the .txt member; None when the sample has none
    meta: dict  # the .json member; {} when the sample has none
    shard: str  # shard file name, for error messages


@dataclass
class ReadStats:
    shards: int = 0
    samples: int = 0
    truncated_shards: list[str] = field(default_factory=list)
    bad_members: int = 0
    no_image: int = 0
    cut_samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def list_shards(raw_dir: str | os.PathLike) -> list[Path]:
    """The `.tar` shards of a raw source directory, in name order."""
    return sorted(p for p in Path(raw_dir).glob("*.tar") if p.is_file())


def iter_samples(shards: str | os.PathLike | Iterable[str | os.PathLike], stats: ReadStats | None = None) -> Iterator[Sample]:
    """Every sample of a raw directory (or of the given shard files), shard by shard."""
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards] if Path(shards).is_file() else list_shards(shards)
    stats = ReadStats() if stats is None else stats
    for shard in shards:
        yield from iter_shard(shard, stats)


def iter_shard(path: str | os.PathLike, stats: ReadStats) -> Iterator[Sample]:
    path = Path(path)
    stats.shards += 1
    group_key: str | None = None
    group: dict[str, bytes] = {}
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if key != group_key:
                    if group_key is not None:
                        sample = _assemble(group_key, group, path.name, stats)
                        if sample is not None:
                            yield sample
                    group_key, group = key, {}
                group[ext] = tar.extractfile(member).read()
            ended_cleanly = _has_end_marker(raw, tar.offset)
    except (tarfile.TarError, EOFError, OSError):
        ended_cleanly = False
    # A group cut short by damage may be missing members; only a clean end vouches for it.
    if ended_cleanly:
        if group_key is not None:
            sample = _assemble(group_key, group, path.name, stats)
            if sample is not None:
                yield sample
    else:
        stats.truncated_shards.append(path.name)
        stats.cut_samples += group_key is not None


def shard_keys(path: str | os.PathLike) -> set[str]:
    """The keys in a shard, from its headers alone (cheap: member data is skipped, not read)."""
    keys = set()
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(split_name(member.name)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass  # a damaged shard: its readable keys are all iter_shard will yield
    return keys


def split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key ends at the first dot of the file's base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def _assemble(key: str, members: dict[str, bytes], shard: str, stats: ReadStats) -> Sample | None:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    caption = None
    if "txt" in members:
        try:
            caption = members["txt"].decode("utf-8")
        except UnicodeDecodeError:
            stats.bad_members += 1
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError("metadata is not an object")
        except ValueError:  # json.JSONDecodeError and bad UTF-8 are both ValueErrors
            stats.bad_members += 1
            meta = {}
    if ext is None:
        stats.no_image += 1
        return None
    stats.samples += 1
    return Sample(key=key, image=members[ext], ext=ext, caption=caption, meta=meta, shard=shard)


def _has_end_marker(raw, offset: int) -> bool:
    """tarfile stops quietly at a missing or garbled header; a real end is a zero block."""
    raw.seek(offset)
    tail = raw.read(2 * BLOCK)
    return len(tail) >= BLOCK and not any(tail)


def write_shard(path: str | os.PathLike, samples: Iterable[dict]) -> None:
    """Write samples `{"key", "image": bytes, "ext", "caption"?, "meta"?}` as one tar shard,
    atomically, in the layout `iter_shard` reads (for tests, benchmarks and fetchers)."""
    from microdit.io import atomic_path

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            add(tar, f"{s['key']}.{s.get('ext', 'jpg')}", s["image"])
            if s.get("caption") is not None:
                add(tar, f"{s['key']}.txt", s["caption"].encode("utf-8"))
            if s.get("meta") is not None:
                add(tar, f"{s['key']}.json", json.dumps(s["meta"]).encode("utf-8"))
