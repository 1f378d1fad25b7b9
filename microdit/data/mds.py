"""`microdit mds`: turn a downloaded source (+ LLaVA captions) into mosaicml-streaming MDS shards.

Columns: `key` str, `image` (MDS `jpeg` encoding by default, `png` on request; both decode to
a PIL image), `caption` str, `width`/`height` int32 (of the stored image). As in the paper,
an image whose short side is below `--min-size` is dropped and one whose short side exceeds
`--max-size` is downscaled to it (bicubic, like the official converter). A JPEG that needs no
resize is stored byte for byte; anything else is encoded once at `--quality`.

One dropped reason per image, checked in this order: empty_file -> corrupt -> too_small ->
no_caption -> empty_caption. Samples a truncated tar lost (never read back) count as
truncated_shard: how many the download wrote (its `NNNNN_stats.json`) minus how many were read,
and at least the sample cut short. Counts go to `<out>/_summary.json` {input, written, dropped,
...} with input = written + every dropped count.

Each tar shard becomes its own MDS directory in `<out>.parts/` (atomic, so a rerun skips the
finished ones; `--workers` convert several at once, and die with the stage). At the end the
parts move into a temp dir, streaming's `merge_index` joins their indexes, and the whole dir is
renamed to `<out>`; if that fails (a full disk) the parts move back, so the rerun only merges.

Every MDS shard's xxh3_64 goes into index.json; `shard_hash.shard_matches` is how readers check it.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from microdit.errors import UserError
from microdit.settings import add_flags
from microdit.lifetime import die_with_parent
from microdit.data.shard_hash import SHARD_HASH
from microdit.data.webdataset import ReadStats, Sample, iter_samples, list_shards, shard_keys
from microdit.io import read_json, write_json

DROP_REASONS = ("empty_file", "corrupt", "too_small", "no_caption", "empty_caption", "truncated_shard")
CAPTION_COLUMNS = ("key", "caption")  # of the `microdit caption` parquet
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--raw", required=True, help="raw webdataset source directory (tar shards)")
    p.add_argument("--out", required=True, help="output MDS directory, e.g. <root>/mds/SRC")
    p.add_argument("--captions", default=None,
                   help="parquet (key, caption) from `microdit caption`; overrides --caption-field")
    p.add_argument("--caption-field", default="txt",
                   help="where captions live in the shards: `txt` or `json:<field>` of the metadata")
    add_flags(p, "mds")  # --min-size, --max-size, ...: the `mds` config keys
    p.add_argument("--workers", type=int, default=1, help="tar shards converted in parallel")


class CaptionLookup:
    """Finds a sample's caption in the shards (`txt` / `json:<field>`) or in a captions parquet
    (only the rows of `keys` are loaded: a paper-scale parquet holds millions)."""

    def __init__(self, field: str, captions: str | None = None, keys: set[str] | None = None):
        self.table: dict[str, str] | None = None
        if captions is not None:
            import pandas as pd

            # pushing the key filter down needs string keys; other key types are read whole
            text_keys = check_captions_parquet(captions)
            filters = [("key", "in", sorted(keys))] if keys and text_keys else None
            frame = pd.read_parquet(captions, columns=list(CAPTION_COLUMNS), filters=filters)
            self.table = dict(zip(frame["key"].astype(str), frame["caption"]))
        self.json_field = field[5:] if field.startswith("json:") else None

    def __call__(self, sample: Sample) -> str | None:
        if self.table is not None:
            found = self.table.get(sample.key)
        elif self.json_field is not None:
            found = sample.meta.get(self.json_field)
        else:
            found = sample.caption
        return None if found is None or (isinstance(found, float) and found != found) else str(found)


def check_captions_parquet(path: str | os.PathLike) -> bool:
    """Fail in one line unless `path` is a parquet with the columns `microdit caption` writes;
    returns whether its keys are strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a non-parquet file
        raise UserError(f"{path}: cannot read it as parquet ({e}); rerun `microdit caption`") from None
    missing = [c for c in CAPTION_COLUMNS if c not in schema.names]
    if missing:
        raise UserError(f"{path}: captions parquet has columns {schema.names}, expected {list(CAPTION_COLUMNS)} "
                        f"(missing {missing}); rerun `microdit caption` or rename the columns")
    key_type = schema.field("key").type
    return pa.types.is_string(key_type) or pa.types.is_large_string(key_type)


def decode(data: bytes) -> tuple[Image.Image, bool] | None:
    """(RGB image, whether `data` is already an RGB JPEG), or None for unreadable bytes."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # PIL raises many types on bad bytes; every one means "corrupt"
        return None
    plain_jpeg = image.format == "JPEG" and image.mode == "RGB"
    return (image if image.mode == "RGB" else image.convert("RGB")), plain_jpeg


def fit_short_side(image: Image.Image, max_size: int, resample: int) -> Image.Image:
    w, h = image.size
    short = min(w, h)
    if short <= max_size:
        return image
    size = (max_size, round(h * max_size / w)) if w == short else (round(w * max_size / h), max_size)
    return image.resize(size, resample=resample)


class JpegStager:
    """Hands MDSWriter JPEG images as files: its `jpeg` encoder copies the bytes of an image
    opened from a file (no quality loss) but re-encodes in-memory images at PIL's default
    quality 75. Staging our own bytes in a scratch file keeps both passthrough and `--quality`."""

    def __init__(self, scratch: Path):
        self.path = scratch / "stage.jpg"

    def __call__(self, data: bytes) -> Image.Image:
        self.path.write_bytes(data)
        return Image.open(self.path)


def convert_shard(shard: str, part: str, opts: dict) -> dict:
    """Convert one tar shard into the MDS directory `part` (renamed into place when complete)."""
    from streaming import MDSWriter

    shard, part = Path(shard), Path(part)
    keys = shard_keys(shard) if opts["captions"] else None
    caption_of = CaptionLookup(opts["caption_field"], opts["captions"], keys)
    resample = RESAMPLE[opts["resample"]]
    columns = {"key": "str", "image": opts["image_format"], "caption": "str", "width": "int32", "height": "int32"}
    reader = ReadStats()
    counts = {"input": 0, "written": 0, "dropped": dict.fromkeys(DROP_REASONS, 0), "resized": 0, "jpeg_passthrough": 0}
    work = make_work_dir(part)
    try:
        stage = JpegStager(work)
        with MDSWriter(out=str(work / "mds"), columns=columns, compression=None, size_limit=opts["shard_size"],
                       hashes=[SHARD_HASH]) as writer:
            for sample in iter_samples(shard, reader):
                counts["input"] += 1
                reason, row = _prepare(sample, caption_of, opts, resample, counts, stage)
                if reason is not None:
                    counts["dropped"][reason] += 1
                    continue
                writer.write(row)
                row["image"].close()
                counts["written"] += 1
        lost = lost_to_truncation(shard, reader)
        counts["dropped"]["truncated_shard"] += lost
        counts["input"] += lost
        counts["reader"] = reader.as_dict()
        counts["shard_stat"] = _stat(shard)
        write_json(work / "mds" / "_counts.json", counts)
        if part.exists():
            shutil.rmtree(part)
        os.replace(work / "mds", part)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return counts


def _prepare(sample: Sample, caption_of: CaptionLookup, opts: dict, resample: int, counts: dict,
             stage: JpegStager) -> tuple[str | None, dict | None]:
    """(drop reason, None) or (None, the MDS row) for one sample."""
    if not sample.image:
        return "empty_file", None
    decoded = decode(sample.image)
    if decoded is None:
        return "corrupt", None
    image, plain_jpeg = decoded
    if min(image.size) < opts["min_size"]:
        return "too_small", None
    caption = caption_of(sample)
    if caption is None:
        return "no_caption", None
    caption = caption.strip()
    if not caption:
        return "empty_caption", None
    stored = fit_short_side(image, opts["max_size"], resample)
    counts["resized"] += stored is not image
    if opts["image_format"] == "png":
        payload = stored
    elif stored is image and plain_jpeg:
        payload = stage(sample.image)  # untouched JPEG: keep its bytes
        counts["jpeg_passthrough"] += 1
    else:
        buf = io.BytesIO()
        stored.save(buf, format="JPEG", quality=opts["quality"])
        payload = stage(buf.getvalue())
    return None, {"key": sample.key, "image": payload, "caption": caption,
                  "width": stored.width, "height": stored.height}


def lost_to_truncation(shard: Path, reader: ReadStats) -> int:
    """Samples of a truncated `shard` that were never read: what the download says it wrote
    (`NNNNN_stats.json` beside the tar) minus what came back, and at least the one cut short."""
    if shard.name not in reader.truncated_shards:
        return 0
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        written = int(read_json(stats)["successes"]) if stats.is_file() else 0
    except (ValueError, KeyError, TypeError):  # a damaged stats file: fall back to what we know
        written = 0
    return max(written - reader.samples - reader.no_image, reader.cut_samples)


def make_work_dir(beside: Path) -> Path:
    """A fresh temp dir next to `beside`, with the mode a plain mkdir gives: mkdtemp makes it 0700,
    and the dir becomes the stage's output, which others on a shared filesystem must read."""
    work = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=".tmp", dir=beside.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)
    return work


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _convert_job(job: tuple[str, str, dict]) -> dict:
    return convert_shard(*job)


def convert_source(args: argparse.Namespace) -> dict:
    from streaming.base.util import merge_index

    raw, out = Path(args.raw), Path(args.out)
    shards = list_shards(raw)
    if not shards:
        raise UserError(f"{raw}: no .tar shards; run `microdit download` for this source first")
    if not 0 < args.min_size <= args.max_size:
        raise UserError(f"--min-size {args.min_size} / --max-size {args.max_size}: need 0 < min <= max")
    if args.caption_field != "txt" and not (args.caption_field.startswith("json:") and len(args.caption_field) > 5):
        raise UserError(f"--caption-field {args.caption_field!r}: use `txt` or `json:<field>`, e.g. json:caption")
    if args.captions is not None and not Path(args.captions).is_file():
        raise UserError(f"{args.captions}: captions parquet not found; run `microdit caption` first")
    if args.captions is not None:
        check_captions_parquet(args.captions)  # here, once, rather than in every worker
    if not 1 <= args.quality <= 100:
        raise UserError(f"--quality {args.quality}: use 1..100")
    opts = {k: getattr(args, k) for k in
            ("min_size", "max_size", "image_format", "quality", "resample", "shard_size", "caption_field")}
    opts["captions"] = str(Path(args.captions).resolve()) if args.captions else None

    # parts from an earlier run count only if made with the same options from the same inputs
    parts = out.with_name(out.name + ".parts")
    signature = {**opts, "captions_stat": _stat(Path(args.captions)) if args.captions else None}
    if parts.is_dir() and (not (parts / "_options.json").is_file() or read_json(parts / "_options.json") != signature):
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json(parts / "_options.json", signature)

    def finished(shard: Path) -> bool:
        counts = parts / shard.stem / "_counts.json"
        return counts.is_file() and read_json(counts).get("shard_stat") == _stat(shard)

    todo = [(str(s), str(parts / s.stem), opts) for s in shards if not finished(s)]
    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc=f"mds {raw.name}", unit="shard", disable=None)
    if args.workers > 1 and len(todo) > 1:
        # spawn, not fork: the parent may hold threads (tqdm, torch) that fork would copy mid-lock;
        # workers die with us, not after finishing the shard in hand beside the rerun
        with multiprocessing.get_context("spawn").Pool(min(args.workers, len(todo)), initializer=die_with_parent,
                                                       initargs=(os.getpid(),)) as pool:
            for _ in pool.imap_unordered(_convert_job, todo):
                bar.update()
    else:
        for job in todo:
            _convert_job(job)
            bar.update()
    bar.close()

    results = {s.stem: read_json(parts / s.stem / "_counts.json") for s in shards}
    summary = _total(raw.name, results, opts)
    if summary["written"] == 0:
        shutil.rmtree(parts, ignore_errors=True)
        dropped = summary["dropped"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]) if v) or "none"
        raise UserError(f"{raw.name}: no image left to write ({summary['input']} read; dropped: {reasons}; "
                        f"truncated shards: {len(summary['reader']['truncated_shards'])}); "
                        "check the download and the captions")

    out.parent.mkdir(parents=True, exist_ok=True)
    work = make_work_dir(out)
    kept = [stem for stem, counts in results.items() if counts["written"]]
    try:
        for stem in kept:
            os.replace(parts / stem, work / stem)
        merge_index([str(work / stem / "index.json") for stem in kept], str(work))
        write_json(work / "_summary.json", summary)
        _swap_into_place(work, out)
    except BaseException:
        # a full disk or a kill while merging: the converted parts stay for the rerun
        for stem in kept:
            if (work / stem).is_dir():
                os.replace(work / stem, parts / stem)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _total(source: str, results: dict[str, dict], opts: dict) -> dict:
    dropped = dict.fromkeys(DROP_REASONS, 0)
    reader = ReadStats()
    for counts in results.values():
        for reason, n in counts["dropped"].items():
            dropped[reason] += n
        for name, value in counts["reader"].items():
            setattr(reader, name, getattr(reader, name) + value)
    return {
        "source": source,
        "input": sum(c["input"] for c in results.values()),
        "written": sum(c["written"] for c in results.values()),
        "dropped": dropped,
        "resized": sum(c["resized"] for c in results.values()),
        "jpeg_passthrough": sum(c["jpeg_passthrough"] for c in results.values()),
        "columns": {"key": "str", "image": opts["image_format"], "caption": "str", "width": "int32", "height": "int32"},
        "min_size": opts["min_size"],
        "max_size": opts["max_size"],
        "captions": "parquet" if opts["captions"] else opts["caption_field"],
        "reader": reader.as_dict(),
    }


def _swap_into_place(new: Path, out: Path) -> None:
    """Replace `out` by `new`; a directory cannot be os.replace'd over a non-empty one."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    summary = convert_source(args)
    print(json.dumps({k: summary[k] for k in ("source", "input", "written", "dropped")}))
    return 0
