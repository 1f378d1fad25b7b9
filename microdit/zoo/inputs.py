"""What the smoke builders of `microdit models` learn from: the world's captions and images.

World parquet files name images by `url` (file:// or a plain path) and may carry a `caption`
column; image directories and caption text files work too. Unusable rows (remote, missing or
corrupt images, no caption) are skipped; a missing input file, or nothing usable, is a UserError.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from microdit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def read_captions(paths: list[str]) -> list[str]:
    """Caption strings from world parquet files (`caption` column) or text files (one per line)."""
    captions: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"--captions: no such file {p}")
        if p.suffix == ".parquet":
            column = _parquet_column(p, "caption", "--captions")
            # the uncaptioned source has no caption column (or only nulls): nothing to learn from
            captions += [c for c in column or [] if isinstance(c, str) and c.strip()]
        else:
            captions += [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise UserError(f"--captions: no caption strings in {', '.join(paths)}; give the world parquet files")
    return captions


def _parquet_column(path: Path, column: str, flag: str) -> list | None:
    """One column of a parquet file as a list; None when the file has no such column."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        return pq.read_table(path, columns=[column]).column(column).to_pylist() if column in schema.names else None
    except Exception as e:  # pyarrow raises several types for a truncated or non-parquet file
        raise UserError(f"{flag}: cannot read {path} as parquet ({type(e).__name__}: {e})") from e


def _image_files(paths: list[str]):
    """Yield image file paths from directories and from parquet URL lists (file:// or plain paths)."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.suffix == ".parquet":
            urls = _parquet_column(p, "url", "--images")
            if urls is None:
                raise UserError(f"--images: {p} has no url column; give a world parquet file or an image dir")
            for url in urls:
                parsed = urlparse(url or "")
                if parsed.scheme in ("file", ""):
                    yield Path(unquote(parsed.path))
                else:
                    yield None  # remote URL: not for a local smoke build
        elif p.is_file():
            yield p
        else:
            raise UserError(f"--images: no such file or directory {p}")


def load_images(paths: list[str], res: int, limit: int, min_size: int | None = None
                ) -> tuple[torch.Tensor, dict[str, int]]:
    """Up to `limit` images, short side resized to `res` and centre-cropped: uint8 (N, 3, res, res).

    Bad entries (remote, missing, corrupt, short side below `min_size`, default `res`) are skipped
    and counted.
    """
    from PIL import Image, UnidentifiedImageError

    min_size = res if min_size is None else min_size
    out, skipped, seen = [], {"not_local": 0, "missing": 0, "corrupt": 0, "too_small": 0}, set()
    for f in _image_files(paths):
        if len(out) >= limit:
            break
        if f is None:
            skipped["not_local"] += 1
            continue
        if f in seen:  # the same world file named twice (captions and images) is one image set
            continue
        seen.add(f)
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
        except FileNotFoundError:
            skipped["missing"] += 1
            continue
        except (UnidentifiedImageError, OSError, SyntaxError):
            skipped["corrupt"] += 1
            continue
        if min(im.size) < min_size:
            skipped["too_small"] += 1
            continue
        out.append(_center_square(im, res))
    if not out:
        raise UserError(f"--images: no usable image in {', '.join(paths)} (skipped: {skipped})")
    return torch.stack(out), {k: v for k, v in skipped.items() if v}


def _center_square(im, res: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    w, h = im.size
    scale = res / min(w, h)
    im = im.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BICUBIC)
    left, top = (im.width - res) // 2, (im.height - res) // 2
    im = im.crop((left, top, left + res, top + res))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def load_pairs(paths: list[str], res: int, limit: int) -> tuple[torch.Tensor, list[str]]:
    """(image, caption) pairs from world parquet files that have both a url and a caption column;
    rows without a caption or a readable local image are left out."""
    from PIL import Image, UnidentifiedImageError

    images, captions = [], []
    for p in (Path(p) for p in paths if str(p).endswith(".parquet")):
        urls, texts = _parquet_column(p, "url", "--captions"), _parquet_column(p, "caption", "--captions")
        for url, text in zip(urls or [], texts or []):
            if len(images) >= limit:
                break
            parsed = urlparse(url or "")
            if not (isinstance(text, str) and text.strip()) or parsed.scheme not in ("file", ""):
                continue
            try:
                with Image.open(unquote(parsed.path)) as im:
                    im = im.convert("RGB")
            except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError):
                continue
            if min(im.size) >= res:
                images.append(_center_square(im, res))
                captions.append(text)
    return (torch.stack(images) if images else torch.empty(0, 3, res, res, dtype=torch.uint8)), captions

