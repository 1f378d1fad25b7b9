"""`microdit latents`: VAE latents and caption embeddings for every image of an MDS source.

Training never sees pixels: each image is center-cropped at every training resolution
(short side resized to R with bicubic, then the central R x R), encoded by the VAE, and the
latent (minus `shift_factor` when the VAE has one, times `scaling_factor`) is stored as float16;
its caption goes through the text encoder into a 77 x D float16 embedding. Like the official
precompute we draw a sample of the VAE posterior (`latent_dist.sample()`, seeded per part so a
rerun is bit-identical) rather than taking its mean; `--posterior mode` takes the mean.

Output, an MDS dataset whose columns match the official precompute scripts, so either side's
loader reads the other's data (all float16 arrays stored as raw bytes, C order):
    key               str
    caption           str
    caption_latents   bytes  (77, D) float16
    latents_<R>       bytes  (C, R/f, R/f) float16, one column per resolution
The shapes live in `_summary.json` ("latent_shape", "caption_shape"), which the loader reads.

Resumable and parallel by construction: input shard i becomes output part `part-0000i/` (its own
MDS index, written in a temp dir and renamed when complete). A rerun skips a finished part only
if it was made from the same bytes: the input shard's xxh3 (from the MDS index) and a digest of
the VAE's and text encoder's files are part of its identity, so a rebuilt MDS shard or a retrained
model makes its parts again. An input shard whose bytes no longer match the xxh3 its index
recorded is an error naming it, before anything is encoded from it. Under
torchrun rank r takes the parts with i % world_size == r on its own GPU, and rank 0 merges the
parts' indexes into `<out>/index.json` once all parts exist. The models and what a latent is made
with live in `microdit.data.encoders`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from microdit.data.encoders import Encoders, load_encoders
from microdit.data.shard_hash import SHARD_HASH, file_xxh3, shard_matches
from microdit.distributed import Runtime
from microdit.errors import UserError
from microdit.io import read_json, write_json
from microdit.settings import add_flags

PART_META = "_part.json"
SUMMARY = "_summary.json"
CAPTION_COLUMN = "caption_latents"
SHARD_SIZE_LIMIT = 1 << 28  # bytes per output shard, as the official precompute uses


def latent_column(resolution: int) -> str:
    return f"latents_{resolution}"


def part_name(index: int) -> str:
    return f"part-{index:05d}"


# ---------------------------------------------------------------- images


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) float tensor in [-1, 1]: short side to `size`, central crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = image.convert("RGB")
    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = TF.center_crop(image, [size, size])
    return TF.to_tensor(image) * 2.0 - 1.0


class ShardImages(torch.utils.data.Dataset):
    """The samples of one input MDS shard, decoded and center-cropped at every resolution.

    A sample that cannot be read or whose image cannot be decoded comes back as
    {"failed": reason} so the caller counts it instead of dying on it.
    """

    def __init__(self, reader, resolutions: list[int], image_column: str, caption_column: str):
        self.reader = reader
        self.resolutions = resolutions
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return self.reader.samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            data = self.reader.get_sample_data(i)
        except Exception:  # truncated shard, offsets past the end
            return {"failed": "unreadable"}
        try:
            sample = self.reader.decode_sample(data)
            image = sample[self.image_column]
            if isinstance(image, (bytes, bytearray)):
                image = Image.open(io.BytesIO(image))
            image.load()  # PIL decodes lazily; force it here so corrupt bytes fail here
            crops = {r: center_crop(image, r) for r in self.resolutions}
        except Exception:
            return {"failed": "corrupt"}
        caption = sample.get(self.caption_column)
        key = sample.get("key")
        return {"key": str(key if key is not None else f"{self.reader.raw_data.basename}:{i}"),
                "caption": "" if caption is None else str(caption), "crops": crops}


def _collate(items: list[dict]) -> list[dict]:
    return items


# ---------------------------------------------------------------- input shards


def input_shards(mds_dir: str | os.PathLike) -> list[dict]:
    """The shard entries of an MDS dataset's index.json, in order."""
    index = Path(mds_dir) / "index.json"
    if not index.is_file():
        raise UserError(f"{mds_dir} is not an MDS dataset (no index.json): run `microdit mds` first")
    try:
        shards = read_json(index)["shards"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{index} is not a valid MDS index ({e}): rerun `microdit mds`") from e
    for shard in shards:
        if shard.get("format") != "mds":
            raise UserError(f"{index}: shard format {shard.get('format')!r} is not supported, only mds")
    return shards


def shard_file(mds_dir: Path, shard: dict) -> tuple[Path, dict]:
    """The file an input shard is read from (raw, else compressed) and the info of that file."""
    raw = mds_dir / shard["raw_data"]["basename"]
    if raw.is_file():
        return raw, shard["raw_data"]
    zipped = shard.get("zip_data")
    if not zipped or not (mds_dir / zipped["basename"]).is_file():
        raise UserError(f"input shard {raw} listed in {mds_dir / 'index.json'} is missing: rerun `microdit mds`")
    return mds_dir / zipped["basename"], zipped


def input_digest(mds_dir: Path, shard: dict) -> str:
    """What an input shard's content is known by: the xxh3 its index recorded, else its file's."""
    path, info = shard_file(mds_dir, shard)
    return (info.get("hashes") or {}).get(SHARD_HASH) or file_xxh3(path)


def open_shard(mds_dir: Path, shard: dict, scratch: Path):
    """An MDSReader for one shard, checked against the xxh3 its index recorded; a compressed
    shard is decompressed into `scratch` first."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    path, info = shard_file(mds_dir, shard)
    if not shard_matches(path, info.get("hashes")):
        raise UserError(f"input shard {path} does not match the {SHARD_HASH} in {mds_dir / 'index.json'} "
                        f"(changed or damaged after the mds stage wrote it): delete {mds_dir} and rerun the mds stage")
    if path == mds_dir / shard["raw_data"]["basename"]:
        return reader_from_json(str(mds_dir), None, shard)
    target = scratch / shard["raw_data"]["basename"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(decompress(shard["compression"], path.read_bytes()))
    return reader_from_json(str(scratch), None, shard)


# ---------------------------------------------------------------- one part


def _part_identity(shard: dict, source_digest: str, encoders: Encoders, resolutions: list[int], seed: int) -> dict:
    """What a finished part must have been made from for a rerun to reuse it: the input's bytes,
    the models' files and the settings."""
    return {"source_shard": shard["raw_data"]["basename"], "source_samples": shard["samples"],
            "source_xxh3": source_digest, "models": dict(encoders.digests),
            "resolutions": list(resolutions), "posterior": encoders.posterior, "seed": seed,
            "latent_shape": [encoders.latent_shape(r) for r in resolutions],
            "scaling_factor": encoders.scaling_factor, "caption_dim": int(encoders.text_encoder.dim)}


def encode_batch(encoders: Encoders, items: list[dict], resolutions: list[int],
                 generator: torch.Generator) -> list[dict]:
    """Decoded samples -> output rows (float16 arrays as raw bytes)."""
    latents = {r: encoders.encode_images(torch.stack([it["crops"][r] for it in items]), generator).numpy()
               for r in resolutions}
    captions = encoders.encode_captions([it["caption"] for it in items]).numpy()
    rows = []
    for j, it in enumerate(items):
        row = {"key": it["key"], "caption": it["caption"], CAPTION_COLUMN: captions[j].tobytes()}
        row.update({latent_column(r): latents[r][j].tobytes() for r in resolutions})
        rows.append(row)
    return rows


def part_is_complete(part_dir: Path, identity: dict) -> bool:
    meta_path = part_dir / PART_META
    if not meta_path.is_file():
        return False
    meta = read_json(meta_path)
    return all(meta.get(k) == v for k, v in identity.items())


def encode_part(index: int, shard: dict, mds_dir: Path, out_dir: Path, encoders: Encoders,
                resolutions: list[int], *, batch_size: int = 32, workers: int = 0, seed: int = 0,
                image_column: str = "image", caption_column: str = "caption",
                on_batch: Callable[[int], None] | None = None) -> dict:
    """Encode input shard `index` into `out_dir/part-<index>/`; returns the part's counts."""
    identity = _part_identity(shard, input_digest(mds_dir, shard), encoders, resolutions, seed)
    final = out_dir / part_name(index)
    if part_is_complete(final, identity):
        return read_json(final / PART_META)
    if final.exists():  # made from other input, models or settings: redo it
        shutil.rmtree(final)

    tmp = out_dir / f".{part_name(index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = _write_part(index, shard, mds_dir, tmp, encoders, resolutions, identity, batch_size=batch_size,
                             workers=workers, seed=seed, image_column=image_column,
                             caption_column=caption_column, on_batch=on_batch)
        write_json(tmp / PART_META, {**identity, **counts})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: give back the space of the half part
        raise
    os.replace(tmp, final)  # the part exists only once it is complete
    return read_json(final / PART_META)


def _write_part(index: int, shard: dict, mds_dir: Path, tmp: Path, encoders: Encoders, resolutions: list[int],
                identity: dict, *, batch_size: int, workers: int, seed: int, image_column: str,
                caption_column: str, on_batch: Callable[[int], None] | None) -> dict:
    """Encode one input shard into the MDS dataset `tmp`; returns its counts."""
    from streaming import MDSWriter

    columns = {"key": "str", "caption": "str", CAPTION_COLUMN: "bytes"}
    columns.update({latent_column(r): "bytes" for r in resolutions})
    counts = {"input": 0, "encoded": 0, "failed": {}}
    # The posterior noise comes from a CPU generator seeded per part: identical on CPU and GPU,
    # and identical whichever rank or rerun encodes the part.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".scratch-") as scratch:
        reader = open_shard(mds_dir, shard, Path(scratch))
        for column in (image_column, caption_column):
            if column not in reader.column_names:
                raise UserError(f"{mds_dir}: shard {identity['source_shard']} has no column {column!r} "
                                f"(has {reader.column_names}); pass --image-column/--caption-column")
        images = ShardImages(reader, resolutions, image_column, caption_column)
        batches = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                              collate_fn=_collate)
        # xxh3 of every shard in index.json: what a training stage's fingerprint knows the data by
        writer = MDSWriter(out=str(tmp), columns=columns, compression=None, size_limit=SHARD_SIZE_LIMIT,
                           hashes=[SHARD_HASH], exist_ok=True)
        for items in batches:
            counts["input"] += len(items)
            good = [it for it in items if "failed" not in it]
            for it in items:
                if "failed" in it:
                    counts["failed"][it["failed"]] = counts["failed"].get(it["failed"], 0) + 1
            if good:
                for row in encode_batch(encoders, good, resolutions, generator):
                    writer.write(row)
                counts["encoded"] += len(good)
            if on_batch is not None:
                on_batch(len(items))
        writer.finish()
    return counts


# ---------------------------------------------------------------- ranks and merge


def encode_rank(mds_dir: str | os.PathLike, out_dir: str | os.PathLike, encoders: Encoders,
                resolutions: list[int], *, rank: int = 0, world_size: int = 1, batch_size: int = 32,
                workers: int = 0, seed: int = 0, image_column: str = "image",
                caption_column: str = "caption", progress: bool | None = None) -> list[int]:
    """Encode this rank's parts (i % world_size == rank); returns their indices."""
    from tqdm import tqdm

    mds_dir, out_dir = Path(mds_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = input_shards(mds_dir)
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    total = sum(shards[i]["samples"] for i in mine)
    bar = tqdm(total=total, unit="img", desc=f"latents {mds_dir.name} rank {rank}", disable=None if progress is None
               else not progress, smoothing=0.1)
    for i in mine:
        seen = bar.n
        counts = encode_part(i, shards[i], mds_dir, out_dir, encoders, resolutions, batch_size=batch_size,
                             workers=workers, seed=seed, image_column=image_column,
                             caption_column=caption_column, on_batch=bar.update)
        if bar.n == seen:  # finished by an earlier run
            bar.update(counts["input"])
    bar.close()
    return mine


def wait_for_parts(out_dir: Path, n_parts: int, timeout: float, poll: float = 5.0) -> None:
    """Block until every part directory exists (other ranks finished), or fail naming the missing ones."""
    deadline = time.monotonic() + timeout
    while True:
        missing = [part_name(i) for i in range(n_parts) if not (out_dir / part_name(i) / PART_META).is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{out_dir}: parts {missing[:5]}{'...' if len(missing) > 5 else ''} did not appear "
                               f"within {timeout:.0f}s; did another rank fail? Rerun to resume.")
        time.sleep(poll)


def merge_parts(out_dir: str | os.PathLike, n_parts: int) -> dict:
    """Write `<out>/index.json` listing every part's shards, so `<out>` is one MDS dataset.

    Same result as `streaming.base.util.merge_index` over the parts, but written atomically and
    in part order. Returns the summed counts of the parts.
    """
    out_dir = Path(out_dir)
    shards, totals = [], {"input": 0, "encoded": 0, "failed": {}}
    for i in range(n_parts):
        part = out_dir / part_name(i)
        for shard in read_json(part / "index.json")["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part.name}/{shard[key]['basename']}"
            shards.append(shard)
        meta = read_json(part / PART_META)
        totals["input"] += meta["input"]
        totals["encoded"] += meta["encoded"]
        for reason, n in meta["failed"].items():
            totals["failed"][reason] = totals["failed"].get(reason, 0) + n
    write_json(out_dir / "index.json", {"version": 2, "shards": shards})
    return totals


def precompute(mds_dir: str | os.PathLike, out_dir: str | os.PathLike, encoders: Encoders,
               resolutions: list[int], *, batch_size: int = 32, workers: int = 0, seed: int = 0,
               image_column: str = "image", caption_column: str = "caption", rank: int | None = None,
               world_size: int | None = None, wait_timeout: float = 3600.0,
               progress: bool | None = None) -> dict | None:
    """Encode this rank's parts; on rank 0 also wait for the others, merge and write the summary.

    Rank and world size come from torchrun's environment unless given. Rank 0 waits for the other
    ranks' parts by watching for them, up to `wait_timeout` (the stage joins no process group)."""
    rt = Runtime.from_env()
    rt.rank = rt.rank if rank is None else rank
    rt.world_size = rt.world_size if world_size is None else world_size
    mds_dir, out_dir = Path(mds_dir), Path(out_dir)
    n_parts = len(input_shards(mds_dir))
    encode_rank(mds_dir, out_dir, encoders, resolutions, rank=rt.rank, world_size=rt.world_size,
                batch_size=batch_size, workers=workers, seed=seed, image_column=image_column,
                caption_column=caption_column, progress=progress)
    rt.barrier()  # when the ranks do share a process group, rank 0 waits here for everyone
    if not rt.main:
        return None
    wait_for_parts(out_dir, n_parts, wait_timeout)
    totals = merge_parts(out_dir, n_parts)
    summary = {
        "source": mds_dir.name,
        **totals,
        "resolutions": list(resolutions),
        "latent_shape": {latent_column(r): encoders.latent_shape(r) for r in resolutions},
        "caption_shape": [int(encoders.text_encoder.max_length), int(encoders.text_encoder.dim)],
        "dtype": "float16",
        "columns": ["key", "caption", CAPTION_COLUMN, *(latent_column(r) for r in resolutions)],
        "posterior": encoders.posterior,
        "scaling_factor": encoders.scaling_factor,
        "shift_factor": encoders.shift_factor,
        "parts": n_parts,
        "seed": seed,
    }
    write_json(out_dir / SUMMARY, summary)
    return summary


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mds", required=True, help="input MDS dataset dir (columns key, image, caption)")
    p.add_argument("--out", required=True, help="output dir: one MDS dataset of latents")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL dir (or a dir with a vae/ subfolder)")
    p.add_argument("--text-encoder", required=True, help="CLIP text model + tokenizer dir")
    add_flags(p, "latents", top=("device", "seed"))  # the `latents` keys; seed: the posterior noise (per part)
    p.add_argument("--image-column", default="image", help="image column of the input MDS")
    p.add_argument("--caption-column", default="caption", help="caption column of the input MDS")


def run(args: argparse.Namespace) -> int:
    if any(r <= 0 for r in args.resolutions):
        raise UserError(f"--resolutions must be positive, got {args.resolutions}")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    input_shards(args.mds)  # fail on a missing/invalid input before loading any model
    encoders = load_encoders(args.vae, args.text_encoder, args.device, args.dtype, args.posterior)
    for r in args.resolutions:
        encoders.latent_shape(r)
    workers = args.workers if args.workers is not None else (4 if encoders.device.type == "cuda" else 0)
    summary = precompute(args.mds, args.out, encoders, sorted(set(args.resolutions)), batch_size=args.batch_size,
                         workers=workers, seed=args.seed, image_column=args.image_column,
                         caption_column=args.caption_column, wait_timeout=args.wait_timeout)
    if summary is None:
        return 0
    print(json.dumps({k: summary[k] for k in ("source", "input", "encoded", "failed", "latent_shape")}))
    if summary["encoded"] == 0:
        raise UserError(f"no image of {args.mds} could be encoded ({summary['failed']}); check the mds stage")
    return 0
