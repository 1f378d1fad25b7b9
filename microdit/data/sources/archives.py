"""Read the archives the paper's datasets ship in: tar/tgz streamed, zip from a local file.

A tar (SA-1B, JourneyDB) is read as a stream straight from the network, so a 10 GB archive is
never stored. Damage that cuts a stream short raises `UnitError("truncated archive")` after the
members read so far were yielded; a stream that is not an archive at all is a "corrupt archive".

Nothing is ever extracted to disk under a member's own name: members are read into memory and
only a sanitised key reaches a file name (`ShardWriter.add_image`). Still, a member whose name
climbs out (`../x`), is absolute (`/x`), or that is a symbolic or hard link, marks a hostile or
broken archive: it is refused and counted under `UNSAFE_PATH` / `LINK`, never followed or guessed at.
"""
from __future__ import annotations

import http.client
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator

from microdit.data.sources.layout import UnitError

STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, http.client.HTTPException)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
UNSAFE_PATH = "unsafe path in archive"  # the reasons a refused member is counted under
LINK = "link in archive"

Refused = Callable[[str, str], None]  # (member name, reason), for the caller to count


def unsafe_name(name: str) -> bool:
    """Absolute (`/x`, a Windows drive or share) or climbing out through a `..` component."""
    absolute = name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[/\\]", name) is not None
    return absolute or ".." in re.split(r"[/\\]", name)


def tar_refusal(member: tarfile.TarInfo) -> str | None:
    if member.issym() or member.islnk():
        return LINK
    return UNSAFE_PATH if unsafe_name(member.name) else None


def zip_refusal(info: zipfile.ZipInfo) -> str | None:
    if stat.S_ISLNK(info.external_attr >> 16):  # a symlink as Info-ZIP stores it (unix mode bits)
        return LINK
    return UNSAFE_PATH if unsafe_name(info.filename) else None


def iter_tar_members(stream: BinaryIO, name: str, refused: Refused | None = None) -> Iterator[tuple[str, IO[bytes]]]:
    """(member path, file object) for every regular file of a tar or tar.gz stream, in order;
    links and unsafe names go to `refused` instead. Each file object is only readable until the
    next member is asked for."""
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
            reason = tar_refusal(member)
            if reason is not None:
                if refused is not None:
                    refused(member.name, reason)
            elif member.isfile():
                yield member.name, tar.extractfile(member)


def iter_tar_files(stream: BinaryIO, name: str, refused: Refused | None = None) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) for every regular file of a tar or tar.gz stream, in order."""
    for path, f in iter_tar_members(stream, name, refused):
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
