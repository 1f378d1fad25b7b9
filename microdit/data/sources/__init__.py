"""Fetchers for the paper's sources that are not plain URL lists, and the loop that runs them.

Each fetcher module (`sa1b`, `textcaps`, `journeydb`, `diffusiondb`, `coco`) defines
- `DEFAULT_INPUT`: the dataset's real location (base URL), or None when the user must give one;
- `OPTIONS`: its `--opt key=value` options as {key: (parser, default, help)};
- `plan(ctx) -> list[Unit]`: the shards to make, one per archive or per slice of a big archive;
- `fill(unit, ctx, shard)`: stream that unit's images into a `ShardWriter`.
The loop here skips finished shards, retries failed units, and writes nothing half-done, so a
rerun resumes where the last one stopped. Output is the same layout img2dataset writes.
"""
from __future__ import annotations

import importlib
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from tqdm import tqdm

from microdit.errors import UserError
from microdit.lifetime import die_with_parent
from microdit.data.sources.images import ImageOptions
from microdit.data.sources.layout import ShardWriter, UnitError, shard_name, shard_stats, summarize

FETCHERS = {
    "sa1b": "microdit.data.sources.sa1b",
    "textcaps": "microdit.data.sources.textcaps",
    "journeydb": "microdit.data.sources.journeydb",
    "diffusiondb": "microdit.data.sources.diffusiondb",
    "coco": "microdit.data.sources.coco",
}


# ---------------------------------------------------------------- option parsers
def as_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def as_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def as_parts(text: str) -> list[int]:
    """'0-199' / '1-140,200' / '3' -> sorted unique ints (inclusive ranges)."""
    parts: set[int] = set()
    for piece in as_list(text):
        lo, sep, hi = piece.partition("-")
        if sep:
            if int(hi) < int(lo):
                raise ValueError(f"empty range {piece!r}")
            parts.update(range(int(lo), int(hi) + 1))
        else:
            parts.add(int(lo))
    if not parts:
        raise ValueError(f"no part in {text!r}")
    return sorted(parts)


def _is_none(text: str) -> bool:
    return str(text).strip().lower() in ("", "none", "null", "off")


def as_optional_float(text: str) -> float | None:
    return None if _is_none(text) else float(text)


def as_optional_str(text: str) -> str | None:
    return None if _is_none(text) else str(text).strip()


# Options every fetcher takes besides its own.
COMMON_OPTIONS: dict[str, tuple[Callable[[str], Any], Any, str]] = {
    "encode_format": (str, "jpg", "jpg | png | webp: format of the images in the shards"),
    "encode_quality": (int, 95, "JPEG/WebP quality when an image is re-encoded"),
    "keep_downloads": (as_bool, False, "keep fetched archives under <out>/_downloads when done"),
}


@dataclass(frozen=True)
class Unit:
    shard_id: int
    name: str  # where the shard comes from (an archive URL, a slice); recorded in its stats
    payload: Any = None


@dataclass
class FetchContext:
    source: str
    kind: str
    input: str | None  # base URL / local directory, or a links file (sa1b)
    out: Path
    image: ImageOptions
    samples_per_shard: int  # these four: the `download` config keys (microdit.settings.Download)
    workers: int
    timeout: float
    retries: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def downloads(self) -> Path:
        return self.out / "_downloads"


def fetcher(kind: str) -> ModuleType:
    if kind not in FETCHERS:
        raise UserError(f"unknown fetcher kind {kind!r}; expected one of {', '.join(FETCHERS)}")
    return importlib.import_module(FETCHERS[kind])


def parse_options(kind: str, raw: dict[str, str]) -> dict[str, Any]:
    """Convert `--opt key=value` strings with the fetcher's parsers; fill in defaults."""
    return parse_with(kind, {**COMMON_OPTIONS, **fetcher(kind).OPTIONS}, raw)


def parse_with(kind: str, spec: dict[str, tuple[Callable[[str], Any], Any, str]], raw: dict[str, str]) -> dict:
    unknown = sorted(set(raw) - set(spec))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)} for kind {kind}; "
                        f"known: {', '.join(sorted(spec))}")
    parsed = {}
    for key, (parse, default, _) in spec.items():
        if key not in raw:
            parsed[key] = default
            continue
        try:
            parsed[key] = parse(raw[key])
        except ValueError as e:
            raise UserError(f"option {key}={raw[key]!r}: {e}") from None
    return parsed


# ---------------------------------------------------------------- the loop
def fetch(ctx: FetchContext) -> dict:
    """Make every planned shard that is not finished yet; return the source's summary."""
    module = fetcher(ctx.kind)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for stale in ctx.out.glob(".[0-9]*.tmp"):  # temp shard files of a run that was killed
        stale.unlink()
    units = module.plan(ctx)
    if not units:
        raise UserError(f"{ctx.source}: nothing to fetch from {ctx.input} (check the parts/splits options)")
    _check_no_foreign_shards(ctx.out, units)
    todo = [u for u in units if not _is_done(ctx.out, u)]
    print(f"{ctx.source}: {len(units) - len(todo)} of {len(units)} shards already done", flush=True)
    if ctx.workers > 1 and len(todo) > 1:
        # workers die with us: a kill -9 here must not leave them fetching beside the rerun, or idle for good
        with ProcessPoolExecutor(min(ctx.workers, len(todo)), mp_context=get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            for _ in tqdm(pool.map(make_shard, [ctx] * len(todo), todo), total=len(todo),
                          desc=ctx.source, unit="shard", disable=None):
                pass
    else:
        for unit in tqdm(todo, desc=ctx.source, unit="shard", disable=None):
            make_shard(ctx, unit)
    stats = shard_stats(ctx.out)
    if not ctx.options.get("keep_downloads") and not any(s.get("unit_error") for s in stats.values()):
        shutil.rmtree(ctx.downloads, ignore_errors=True)
    return summarize(ctx.out, ctx.source, ctx.kind)


def make_shard(ctx: FetchContext, unit: Unit) -> None:
    """One unit -> one shard. Transient failures are retried from scratch; a unit that still
    fails keeps the samples it got and is counted as one failure (and retried on the next run)."""
    from microdit.data.sources.remote import RETRY_BACKOFF_S, AccessDenied

    module = fetcher(ctx.kind)
    for attempt in range(ctx.retries + 1):
        shard = ShardWriter(ctx.out, unit.shard_id, unit.name, ctx.image)
        try:
            module.fill(unit, ctx, shard)
        except AccessDenied as e:
            shard.discard()
            hint = getattr(module, "ACCESS_HINT", "check that the URL is readable")
            raise UserError(f"{ctx.source}: {e}; {hint}") from None
        except UnitError as e:
            if e.transient and attempt < ctx.retries:
                shard.discard()
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
                continue
            print(f"{ctx.source}: shard {shard_name(unit.shard_id)}: {e}", flush=True)
            shard.close(unit_error=e)
            return
        except BaseException:
            shard.discard()
            raise
        shard.close()
        return


def _is_done(out: Path, unit: Unit) -> bool:
    stats = shard_stats_of(out, unit.shard_id)
    if stats is None:
        return False
    if stats.get("unit") != unit.name:
        raise UserError(f"{out}/{shard_name(unit.shard_id)}_stats.json was made from {stats.get('unit')!r}, "
                        f"this run plans {unit.name!r} there; use a fresh --out or delete the old one")
    return not stats.get("unit_error")


def shard_stats_of(out: Path, shard_id: int) -> dict | None:
    from microdit.io import read_json

    path = out / f"{shard_name(shard_id)}_stats.json"
    return read_json(path) if path.exists() else None


def _check_no_foreign_shards(out: Path, units: list[Unit]) -> None:
    planned = {u.shard_id for u in units}
    foreign = sorted(set(shard_stats(out)) - planned)
    if foreign:
        raise UserError(f"{out} holds shards this run does not plan ({shard_name(foreign[0])}, ...), "
                        "left by a run with another selection; use a fresh --out or delete them")
