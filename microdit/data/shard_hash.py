"""Shard integrity: the xxh3 hash MDSWriter records in index.json, checked where shards are read.

Its own module (no pyarrow, no streaming) so the latents stage and the training loader can check
shards without importing the mds stage's dependencies."""
from __future__ import annotations

import os

SHARD_HASH = "xxh3_64"  # the hash MDSWriter records for every shard here and in the latents stage

_matching_shards: set[tuple] = set()


def file_xxh3(path: str | os.PathLike) -> str:
    """Hex xxh3_64 of a file, as streaming's `get_hash("xxh3_64", data)` gives it."""
    import xxhash

    from microdit.io import file_hexdigest

    return file_hexdigest(path, xxhash.xxh3_64())


def shard_matches(path: str | os.PathLike, hashes: dict | None) -> bool:
    """Whether shard file `path` still has the SHARD_HASH its index.json recorded (True when none
    was recorded). Checked once per file version per process: a shard is read many times."""
    expected = (hashes or {}).get(SHARD_HASH)
    if expected is None:
        return True
    st = os.stat(path)
    version = (os.fspath(path), st.st_size, st.st_mtime_ns, expected)
    if version in _matching_shards:
        return True
    if file_xxh3(path) != expected:
        return False
    _matching_shards.add(version)
    return True
