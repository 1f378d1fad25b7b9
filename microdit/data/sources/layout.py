"""The `raw/<source>/` layout every download writes, shaped like img2dataset's webdataset output.

A shard is `NNNNN.tar` (`<key>.jpg|png|webp`, `<key>.txt`, `<key>.json` per sample),
`NNNNN.parquet` (one row per attempted sample, failures included) and `NNNNN_stats.json`. The
stats file is written last: a shard without one is unfinished and is made again on the next run.
`_summary.json` adds up the stats of every shard: `{"source", "urls", "downloaded", "failed"}`.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from microdit.data.sources.images import BadImage, PreparedImage
from microdit.io import atomic_path, read_json, write_json

# Reasons that mean the bytes never arrived; every other reason is a filter or a bad image.
DOWNLOAD_REASONS = {"dead url", "timeout", "connection error", "server error", "truncated archive",
                    "corrupt archive", "missing image", "access denied"}

# img2dataset / urllib / PIL messages -> short reasons, checked in order on the lower-cased message.
_REASON_PATTERNS = [
    (r"timed out|timeout", "timeout"),
    (r"http error 429", "rate limited"),
    (r"http error 5\d\d", "server error"),
    (r"http error 4\d\d|no such file or directory|name or service not known|nodename nor servname"
     r"|temporary failure in name resolution|no address associated|connection refused|unknown url type"
     r"|is a directory", "dead url"),
    (r"connection reset|remote end closed|connection aborted|incompleteread|broken pipe", "connection error"),
    (r"certificate verify failed|ssl", "ssl error"),
    # img2dataset hands a zero-byte body to OpenCV, whose assertion text is no reason to show
    (r"!buf\.empty\(\)", "empty file"),
    (r"opencv\(.*error:", "corrupt image"),
    (r"image decoding error|cannot identify image|image file is truncated|broken data stream|not a jpeg"
     r"|decoder|truncated file read", "corrupt image"),
    (r"x-robots-tag", "disallowed by x-robots-tag"),
]
_MAX_REASON_CHARS = 100


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def failure_reason(message: str) -> str:
    """A short reason for a failure message; unknown messages are kept, truncated."""
    text = " ".join(str(message).split())
    low = text.lower()
    for pattern, reason in _REASON_PATTERNS:
        if re.search(pattern, low):
            return reason
    return text[:_MAX_REASON_CHARS] if text else "unknown"


class UnitError(Exception):
    """A whole unit of work (an archive, a link) failed; `transient` ones are worth retrying."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.transient = reason, detail, transient


class ShardWriter:
    """Write one shard: successes go to the tar, every attempt to the parquet and the stats.

    Files appear under their final names only in `close()`; `discard()` leaves nothing behind.
    `unit` names what the shard was made from, so a rerun with a different selection is caught.
    """

    def __init__(self, out_dir: str | Path, shard_id: int, unit: str,
                 prepare_image: Callable[[bytes], PreparedImage]):
        self.out_dir, self.shard_id, self.unit = Path(out_dir), shard_id, unit
        self.prepare_image = prepare_image
        name = shard_name(shard_id)
        self.tar_path = self.out_dir / f"{name}.tar"
        self.parquet_path = self.out_dir / f"{name}.parquet"
        self.stats_path = self.out_dir / f"{name}_stats.json"
        self._tar_ctx = atomic_path(self.tar_path)
        self._tar = tarfile.open(self._tar_ctx.__enter__(), "w")
        self.rows: list[dict] = []
        self.status: Counter = Counter()
        self.keys: set[str] = set()
        self.start_time = time.time()

    # ---------------------------------------------------------------- samples
    def add_image(self, key: str, data: bytes, caption: str | None, url: str, extra: dict | None = None) -> bool:
        """Check/resize/encode `data` and write it; a bad image is skipped and counted."""
        key = re.sub(r"[./\\\s]", "_", key)  # a webdataset key ends at the first dot of the name
        if key in self.keys:
            self.skip("duplicate key", url, key, caption, extra)
            return False
        try:
            image = self.prepare_image(data)
        except BadImage as e:
            self.skip(e.reason, url, key, caption, extra)
            return False
        meta = {
            **(extra or {}), "key": key, "url": url, "caption": caption, "status": "success",
            "error_message": None, "width": image.width, "height": image.height,
            "original_width": image.original_width, "original_height": image.original_height,
            "sha256": hashlib.sha256(image.data).hexdigest(),
        }
        self._add_member(f"{key}.{image.ext}", image.data)
        self._add_member(f"{key}.txt", (caption or "").encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(meta, indent=1, default=str).encode("utf-8"))
        self.keys.add(key)
        self.rows.append(meta)
        self.status["success"] += 1
        return True

    def skip(self, reason: str, url: str, key: str | None = None, caption: str | None = None,
             extra: dict | None = None) -> None:
        status = "failed_to_download" if reason in DOWNLOAD_REASONS else "failed_to_resize"
        self.rows.append({**(extra or {}), "key": key, "url": url, "caption": caption, "status": status,
                          "error_message": reason})
        self.status[reason] += 1

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed mtime: same input, same bytes
        self._tar.addfile(info, io.BytesIO(data))

    # ---------------------------------------------------------------- finishing
    def close(self, unit_error: UnitError | None = None) -> dict:
        """Publish the shard. A failed unit counts as one failed item and is retried next run."""
        if unit_error is not None:
            self.skip(unit_error.reason, self.unit)
        self._tar.close()
        self._tar_ctx.__exit__(None, None, None)
        with atomic_path(self.parquet_path) as tmp:
            pq.write_table(_rows_table(self.rows), tmp)
        successes = self.status["success"]
        failed_download = sum(n for r, n in self.status.items() if r in DOWNLOAD_REASONS)
        stats = {
            "count": len(self.rows), "successes": successes, "failed_to_download": failed_download,
            "failed_to_resize": len(self.rows) - successes - failed_download,
            "duration": time.time() - self.start_time, "start_time": self.start_time,
            "end_time": time.time(), "status_dict": dict(self.status), "unit": self.unit,
            "unit_error": None if unit_error is None else str(unit_error),
        }
        write_json(self.stats_path, stats)
        return stats

    def discard(self) -> None:
        self._tar.close()
        err = RuntimeError("shard discarded")
        self._tar_ctx.__exit__(RuntimeError, err, None)  # atomic_path removes its temp file


def _rows_table(rows: list[dict]) -> pa.Table:
    """One parquet row per attempt; nested extras are stored as JSON text to keep one schema."""
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, [])
    for row in rows:
        for k, values in columns.items():
            v = row.get(k)
            values.append(json.dumps(v) if isinstance(v, (list, dict)) else v)
    return pa.table(columns) if rows else pa.table({"key": pa.array([], pa.string())})


# ---------------------------------------------------------------- summary
def shard_stats(out_dir: str | Path) -> dict[int, dict]:
    """Stats of every finished shard, by shard id."""
    found = {}
    for path in Path(out_dir).glob("[0-9]*_stats.json"):
        found[int(path.name.split("_")[0])] = read_json(path)
    return dict(sorted(found.items()))


def summarize(out_dir: str | Path, source: str, kind: str) -> dict:
    """Add up every shard's stats into the `_summary.json` contract (urls = downloaded + failed)."""
    stats = shard_stats(out_dir)
    urls = sum(s["count"] for s in stats.values())
    downloaded = sum(s["successes"] for s in stats.values())
    failed: Counter = Counter()
    for s in stats.values():
        for message, n in s.get("status_dict", {}).items():
            if message != "success":
                failed[failure_reason(message)] += n
    unaccounted = urls - downloaded - sum(failed.values())
    if unaccounted > 0:  # img2dataset drops a sample from status_dict when writing it raised
        failed["unknown"] += unaccounted
    return {"source": source, "kind": kind, "urls": urls, "downloaded": downloaded,
            "failed": dict(failed.most_common()), "shards": len(stats)}


def top_reasons(failed: dict, k: int = 3) -> str:
    items = sorted(failed.items(), key=lambda kv: -kv[1])[:k]
    return ", ".join(f"{reason} x{n}" for reason, n in items) or "none recorded"
