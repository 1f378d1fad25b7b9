"""The data funnel: how many items each source had at every stage, and why the rest were dropped.

Each stage leaves a small summary beside its output (see the stage modules); this command only
gathers them into one JSON file for the report:

    urls -> downloaded (failed by reason) -> captioned -> in MDS (dropped by reason) -> encoded
"""
from __future__ import annotations

import argparse
from pathlib import Path

from microdit.errors import UserError
from microdit.io import read_json, write_json


def _maybe(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def source_funnel(root: Path, source: str, raw_source: str | None = None) -> dict:
    """Collect one source's stage summaries; stages that did not run for it are left out."""
    raw = _maybe(root / "raw" / (raw_source or source) / "_summary.json")
    if raw is None:
        raise UserError(f"source '{source}': no download summary under {root / 'raw' / (raw_source or source)}")
    funnel: dict = {
        "source": source,
        "urls": raw.get("urls"),
        "downloaded": raw.get("downloaded"),
        "download_failed": raw.get("failed", {}),
    }
    if raw.get("repaired"):  # kept, but changed on the way in (e.g. captions that were not UTF-8)
        funnel["download_repaired"] = raw["repaired"]
    if raw_source and raw_source != source:
        funnel["raw_from"] = raw_source
    captions = _maybe(root / "captions" / f"{source}.stats.json")
    if captions is not None:
        funnel["captioned"] = captions.get("captioned")
        funnel["caption_empty"] = captions.get("empty", 0)
        funnel["caption_failed"] = captions.get("failed", 0)
    mds = _maybe(root / "mds" / source / "_summary.json")
    if mds is not None:
        funnel["in_mds"] = mds.get("written")
        funnel["mds_dropped"] = mds.get("dropped", {})
    latents = _maybe(root / "latents" / source / "_summary.json")
    if latents is not None:
        funnel["encoded"] = latents.get("encoded")
        funnel["encode_failed"] = latents.get("failed", {})
    # the last stage reached is what training (or evaluation) actually sees
    for stage in ("encoded", "in_mds", "captioned", "downloaded"):
        if funnel.get(stage) is not None:
            funnel["final"] = funnel[stage]
            funnel["final_stage"] = stage
            break
    return funnel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path, help="data root")
    parser.add_argument(
        "--source", action="append", required=True, metavar="NAME[=RAW]",
        help="a source to include; RAW names the source whose download it reuses",
    )
    parser.add_argument("--out", required=True, type=Path, help="funnel JSON to write")


def run(args: argparse.Namespace) -> int:
    sources = {}
    for item in args.source:
        name, _, raw = item.partition("=")
        sources[name] = source_funnel(args.root, name, raw or None)
    write_json(args.out, {"sources": sources})
    for name, f in sources.items():
        print(f"{name}: {f['urls']} urls -> {f['downloaded']} downloaded -> {f['final']} {f['final_stage']}")
    return 0
