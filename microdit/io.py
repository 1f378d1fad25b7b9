"""Small file helpers shared by every stage: atomic writes, JSON in and out, reproducible
.safetensors files, and telling a full disk from other write failures."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    Readers never see a half-written file, and an interrupted job leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            # mkstemp makes 0600 files; give the result the permissions a plain open() would
            umask = os.umask(0)
            os.umask(umask)
            tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# ---- a full disk ---------------------------------------------------------------------------------

LOW_SPACE_BYTES = 64 << 20  # "file write failed" with less than this free counts as a full disk
SPACE_ERRNOS = {errno.ENOSPC: "no space left on", errno.EDQUOT: "disk quota exceeded on"}
SPACE_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}


def free_bytes(path: str | os.PathLike) -> int:
    """Space left for us on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def space_errno(error: BaseException, where: str | os.PathLike | None = None) -> int | None:
    """ENOSPC / EDQUOT when `error`, or an error that caused it, is a full disk or quota; else None.

    Writers say so differently: Python an OSError with the errno (often without a path), safetensors
    an error whose text holds strerror, torch's zip writer only "file write failed", which counts
    when the filesystem holding `where` is (nearly) full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in SPACE_ERRNOS:
            return error.errno
        text = str(error)
        for phrase, number in SPACE_TEXTS.items():
            if phrase in text:
                return number
        if "file write failed" in text and where is not None and free_bytes(where) < LOW_SPACE_BYTES:
            return errno.ENOSPC
        error = error.__cause__ or error.__context__
    return None


def space_message(number: int, where: str | os.PathLike) -> str:
    return f"{SPACE_ERRNOS[number]} {where}; free some space there and rerun (what was finished is kept)"


@contextlib.contextmanager
def naming_full_disk(where: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full-disk failure in the block as OSError(ENOSPC, ..., where), so the one-line
    error names the place being written (most writers' errors name no path, or a temp file)."""
    try:
        yield
    except Exception as e:
        number = space_errno(e, where)
        if number is None:
            raise
        raise OSError(number, os.strerror(number), str(where)) from e


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def file_hexdigest(path: str | os.PathLike, digest: Any) -> str:
    """Hex digest of a file, read in blocks; `digest` is a fresh hash object (hashlib's, xxhash's)."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    import hashlib

    return file_hexdigest(path, hashlib.sha256())
