"""What `microdit evaluate` draws its images for: the evaluation split and the GenEval prompts.

- `export_eval_split`: every readable image of the evaluation split (MDS: key, image, caption) as PNG
  under the cache with a `captions.jsonl` index, made once per version of the split; FID's real
  images, and the caption pool.
- `read_index`: the export's rows; `draw_captions`: the seeded captions the FID/CLIP images are
  generated from.
- `geneval_prompt_set`: the GenEval metadata for `--geneval-prompts` (the shapes world's, GenEval's
  official 553 fetched and checksum-verified, or a file), capped per task with `cap_per_task`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from microdit.errors import UserError
from microdit.io import write_json

REAL_INDEX = "captions.jsonl"  # written last: marks a complete export of the evaluation split


# ---------------------------------------------------------------- the evaluation split


def export_eval_split(mds_dir: Path, cache: Path) -> Path:
    """Every readable image of the split as PNG under the cache, plus `captions.jsonl`; made once.

    The folder is named by the split and a hash of its MDS index, so a changed split gets a new
    export. Unreadable samples are skipped and counted in `export.json`.
    """
    from microdit.data.latents import input_shards, open_shard

    index = Path(mds_dir) / "index.json"
    shards = input_shards(mds_dir)
    digest = hashlib.sha256(index.read_bytes()).hexdigest()[:12]
    dest = Path(cache) / "real" / f"{Path(mds_dir).name}-{digest}"
    if (dest / REAL_INDEX).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    rows, skipped = [], {"unreadable": 0, "corrupt": 0}
    try:
        from tqdm import tqdm

        bar = tqdm(desc=f"export {Path(mds_dir).name}", unit="img", disable=None)
        for shard in shards:
            reader = open_shard(Path(mds_dir), shard, work / "scratch")
            for i in range(reader.samples):
                bar.update()
                try:
                    sample = reader.decode_sample(reader.get_sample_data(i))
                except Exception:  # truncated shard or bad offsets: count, keep going
                    skipped["unreadable"] += 1
                    continue
                image = _as_image(sample.get("image"))
                if image is None:
                    skipped["corrupt"] += 1
                    continue
                name = f"{len(rows):06d}.png"
                image.save(work / name, format="PNG", compress_level=1)
                caption = sample.get("caption")
                rows.append({"file": name, "key": str(sample.get("key", "")), "caption": "" if caption is None else str(caption)})
        bar.close()
        if not rows:
            raise UserError(f"no readable images in the evaluation split {mds_dir}; rerun `microdit mds` for it")
        shutil.rmtree(work / "scratch", ignore_errors=True)
        write_json(work / "export.json", {"source": str(mds_dir), "index_sha256": digest, "images": len(rows), "skipped": skipped})
        (work / REAL_INDEX).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if dest.exists():  # an incomplete export from an interrupted run
            shutil.rmtree(dest)
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _as_image(value) -> Image.Image | None:
    import io

    try:
        image = Image.open(io.BytesIO(value)) if isinstance(value, (bytes, bytearray)) else value
        image.load()
        return image.convert("RGB")
    except Exception:  # PIL raises many kinds on bad bytes
        return None


def draw_captions(captions: list[str], n: int, seed: int) -> list[str]:
    """`n` non-empty captions in a seeded random order; when the split has fewer, it is gone
    through again in a new order (each caption used at most ceil(n / len) times)."""
    pool = [c for c in captions if c.strip()]
    if not pool:
        raise UserError("the evaluation split has no non-empty captions to prompt with")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n:
        order += rng.permutation(len(pool)).tolist()
    return [pool[i] for i in order[:n]]


def caption_list(path: Path, n: int, sha256: str | None = None) -> list[str]:
    """The first `n` captions of a fixed list (a published protocol's, so runs and papers prompt
    alike): one per line, or JSON lines with a "caption" (or "text") field. Fewer than `n` is an
    error, as is a checksum that differs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--captions-file {path} does not exist")
    data = path.read_bytes()
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"--captions-file {path}: sha256 {hashlib.sha256(data).hexdigest()} is not the expected "
                        f"{sha256} (another version of the list?)")
    captions = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        text = line.strip()
        if not text:
            continue
        if text.startswith("{"):
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"--captions-file {path}, line {number}: not valid JSON") from None
            text = str(row.get("caption", row.get("text", ""))).strip()
            if not text:
                raise UserError(f"--captions-file {path}, line {number}: no 'caption' or 'text' field")
        captions.append(text)
    if len(captions) < n:
        raise UserError(f"--captions-file {path} holds {len(captions)} captions, fewer than --num-images {n}")
    return captions[:n]


def read_index(real_dir: Path) -> list[dict]:
    """The rows (file, key, caption) of an export, in image order."""
    return [json.loads(line) for line in (real_dir / REAL_INDEX).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- GenEval prompts


def geneval_prompt_set(args: argparse.Namespace) -> list[dict]:
    """The GenEval metadata to generate for (`--geneval-prompts`), capped per task when asked."""
    from microdit.metrics import geneval

    if args.geneval_prompts == "shapes":
        from microdit.data.shapes import geneval_prompts

        return geneval_prompts(args.geneval_per_task or None, args.seed)  # 0: every prompt
    if args.geneval_prompts == "official":
        path = geneval.fetch_prompts(geneval.PROMPTS_URL, geneval.PROMPTS_SHA256,
                                     args.cache / "geneval" / "evaluation_metadata.jsonl")
    else:
        path = Path(args.geneval_prompts)
        if not path.is_file():
            raise UserError(f"--geneval-prompts {path}: no such file (or use shapes, official, none)")
    return cap_per_task(geneval.load_prompts(path), args.geneval_per_task or None, args.seed)


def cap_per_task(metadata: list[dict], per_task: int | None, seed: int) -> list[dict]:
    """At most `per_task` prompts of each task, a seeded sample, in file order."""
    if per_task is None:
        return metadata
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for tag in dict.fromkeys(m["tag"] for m in metadata):
        idx = [i for i, m in enumerate(metadata) if m["tag"] == tag]
        keep.update(idx if len(idx) <= per_task else rng.choice(idx, per_task, replace=False).tolist())
    return [m for i, m in enumerate(metadata) if i in keep]
