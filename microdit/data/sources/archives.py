"""Read the archives the paper's datasets ship in: tar/tgz streamed, zip from a local file.

A tar (SA-1B, JourneyDB) is read as a stream straight from the network, so a 10 GB archive is
never stored. Damage that cuts a stream short raises `UnitError("truncated archive")` after the
members read so far were yielded; a stream that is not an archive at all is a "corrupt archive".
"""
from __future__ import annotations

import http.client
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO, Iterator

from microdit.data.sources.layout import UnitError

STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, http.client.HTTPException)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def iter_tar_members(stream: BinaryIO, name: str) -> Iterator[tuple[str, IO[bytes]]]:
    """(member path, file object) for every regular file of a tar or tar.gz stream, in order.
    Each file object is only readable until the next member is asked for."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except STREAM_ERRORS as e:
        raise UnitError("corrupt archive", f"{name}: {e}") from e
    with tar:
        while True:
            try:
                member = tar.next()
            except STREAM_ERRORS as e:
                raise truncated(name, e) from e
            if member is None:
                return
            if member.isfile():
                yield member.name, tar.extractfile(member)


def iter_tar_files(stream: BinaryIO, name: str) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) for every regular file of a tar or tar.gz stream, in order."""
    for path, f in iter_tar_members(stream, name):
        try:
            data = f.read()
        except STREAM_ERRORS as e:
            raise truncated(name, e) from e
        yield path, data


def truncated(name: str, err: BaseException) -> UnitError:
    # a cut connection and a cut file look the same from here, so the caller may retry
    return UnitError("truncated archive", f"{name}: {err}", transient=True)


def member_path(name: str) -> str:
    """Archive member names without a leading './' (JourneyDB writes both forms)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UnitError("corrupt archive", f"{path.name}: {e}") from e


def read_member(zf: zipfile.ZipFile, name: str) -> bytes:
    """A zip member's bytes; a damaged member raises ValueError (the caller counts one bad image)."""
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
        raise ValueError(f"{name}: {e}") from e
