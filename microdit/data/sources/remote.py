"""Open or fetch a file that is either a local path or an http(s) URL.

Every fetcher takes a base that is a URL (the dataset's real host, or a loopback server in tests)
or a local directory holding the same relative paths. Failures become `RemoteError`s carrying a
short reason ("dead url", "timeout", ...) and whether a retry may help. Large files are fetched
into `.part` files and resumed with HTTP Range requests.
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

from microdit.data.sources.layout import UnitError

# Hosts that get the Hugging Face token (gated datasets such as JourneyDB); never sent elsewhere.
TOKEN_HOSTS = ("huggingface.co", "hf.co")
RETRY_BACKOFF_S = 2.0
USER_AGENT = "microdit-download/0.1 (+https://github.com/rom1504/img2dataset compatible)"
_CHUNK = 1 << 20

T = TypeVar("T")


class RemoteError(UnitError):
    pass


class AccessDenied(RemoteError):
    """401/403: the dataset is gated or the token is missing; retrying will not help."""


def is_url(location: str) -> bool:
    return urllib.parse.urlsplit(str(location)).scheme in ("http", "https")


def local_path(location: str) -> Path:
    location = str(location)
    if location.startswith("file://"):
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(location).path))
    return Path(location)


def join(base: str, relpath: str) -> str:
    """`base`/`relpath` for a URL or a local directory."""
    if is_url(base):
        return base.rstrip("/") + "/" + urllib.parse.quote(relpath.lstrip("/"))
    return str(local_path(base) / relpath)


def hub_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:  # the token `huggingface-cli login` stored; reading it needs no network
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no hub client or no login: go without a token
        return None


def _request(url: str, start: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT}
    host = urllib.parse.urlsplit(url).hostname or ""
    if any(host == h or host.endswith("." + h) for h in TOKEN_HOSTS):
        token = hub_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, headers=headers)


def _shown(location: str) -> str:
    """A location for messages: signed links (SA-1B's CDN) keep their signature out of logs."""
    return urllib.parse.urlsplit(location)._replace(query="").geturl() if is_url(location) else location


def _as_remote_error(err: BaseException, location: str) -> RemoteError:
    location = _shown(location)
    if isinstance(err, urllib.error.HTTPError):
        if err.code in (401, 403):
            return AccessDenied("access denied", f"{location}: HTTP {err.code}")
        if err.code == 429 or err.code >= 500:
            return RemoteError("server error", f"{location}: HTTP {err.code}", transient=True)
        return RemoteError("dead url", f"{location}: HTTP {err.code}")
    if isinstance(err, (socket.timeout, TimeoutError)) or "timed out" in str(err):
        return RemoteError("timeout", location, transient=True)
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, (socket.gaierror, ConnectionRefusedError)):
        return RemoteError("dead url", f"{location}: {err.reason}")
    if isinstance(err, FileNotFoundError):
        return RemoteError("dead url", f"{location}: no such file")
    return RemoteError("connection error", f"{location}: {err}", transient=True)


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


def open_location(location: str, timeout: float) -> BinaryIO:
    """A readable binary stream of a local file or URL (the caller closes it)."""
    if not is_url(location):
        path = local_path(location)
        if not path.is_file():
            raise RemoteError("dead url", f"{location}: no such file")
        return open(path, "rb")
    try:
        return urllib.request.urlopen(_request(location), timeout=timeout)
    except _NETWORK_ERRORS as e:
        raise _as_remote_error(e, location) from e


def read_bytes(location: str, timeout: float, retries: int = 0) -> bytes:
    def once() -> bytes:
        with open_location(location, timeout) as f:
            try:
                return f.read()
            except _NETWORK_ERRORS as e:
                raise _as_remote_error(e, location) from e

    return with_retries(once, retries)


def fetch_file(location: str, dest_dir: str | Path, timeout: float, retries: int = 0) -> Path:
    """A local path to `location`: local files are used in place, URLs are downloaded once
    into `dest_dir` (kept across runs; an interrupted download resumes where it stopped)."""
    if not is_url(location):
        path = local_path(location)
        if not path.is_file():
            raise RemoteError("dead url", f"{location}: no such file")
        return path
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path)).name or "download"
    dest = Path(dest_dir) / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with_retries(lambda: _download_to(location, part, timeout), retries)
    os.replace(part, dest)
    return dest


def _download_to(url: str, part: Path, timeout: float) -> None:
    start = part.stat().st_size if part.exists() else 0
    try:
        response = urllib.request.urlopen(_request(url, start), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # our .part is not a prefix of this file: start over
            part.unlink()
            raise RemoteError("connection error", f"{url}: stale partial download", transient=True) from e
        raise _as_remote_error(e, url) from e
    except _NETWORK_ERRORS as e:
        raise _as_remote_error(e, url) from e
    with response:
        resumed = start and response.status == 206
        expected = response.headers.get("Content-Length")
        expected = None if expected is None else int(expected) + (start if resumed else 0)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                shutil.copyfileobj(response, f, _CHUNK)
        except _NETWORK_ERRORS as e:
            raise _as_remote_error(e, url) from e
    size = part.stat().st_size
    if expected is not None and size < expected:
        raise RemoteError("connection error", f"{url}: got {size} of {expected} bytes", transient=True)


def with_retries(fn: Callable[[], T], retries: int) -> T:
    """Call `fn`; retry transient `RemoteError`s up to `retries` times with growing pauses."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except RemoteError as e:
            if not e.transient or attempt == retries:
                raise
            time.sleep(RETRY_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")
