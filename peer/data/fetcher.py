"""Fetch byte ranges of remote files into a content-addressed cache: resumable, retried, verified.

:meth:`Fetcher.fetch` downloads bytes ``[offset, offset + size)`` of a URL (``size`` from a manifest,
never from the server) into ``<cache>/tmp/<sha256>.part``, continues an interrupted download with a
``Range`` request, checks the sha256 and only then renames the file to ``<cache>/objects/<sha256>``. A
file that fails the check is deleted and reported; it is never renamed into the cache. Several threads
or processes may fetch into one cache: a lock file per object makes the second wait for the first.

Plain ``urllib``: HTTP(S) with redirects (HF Hub ``resolve/main/…`` URLs redirect to a CDN and keep the
``Range`` header), proxies from the environment. Transient failures (connection reset, timeout, 5xx,
429) are retried with exponential backoff; anything else is one clear error.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peer.errors import DataError, NetworkError

CHUNK = 1 << 20
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError)


def is_remote(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class RangeNotSupported(NetworkError):
    """The server answered a ``Range`` request with the whole file."""


class _Retry(Exception):
    """A transient failure: try again after a pause."""


@dataclass(kw_only=True)
class FetchPolicy:
    """How hard to try."""

    retries: int = 5
    """Attempts after the first one for a transient failure. Raise it on a flaky link."""
    backoff_s: float = 0.5
    """Pause before the first retry; doubles each time (capped at 30 s)."""
    timeout_s: float = 30.0
    """Socket timeout of one request. Raise it if large shards fail with timeouts on a slow link."""
    user_agent: str = "gradswarm-data/1"

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0")


class Fetcher:
    """A content-addressed download cache (``objects/<sha256>``) over HTTP(S)."""

    def __init__(self, cache_dir: Path, policy: FetchPolicy | None = None):
        self.cache_dir = Path(cache_dir)
        self.policy = policy or FetchPolicy()
        self.objects = self.cache_dir / "objects"
        self.tmp = self.cache_dir / "tmp"
        self._objects = str(self.objects)
        self._local = threading.local()
        self._proxies = urllib.request.getproxies()
        """With a proxy configured, requests go through urllib (a connection each); else kept alive."""
        self.requests = 0
        """HTTP requests sent (a resumed download counts each request)."""
        self.bytes_downloaded = 0

    def path_of(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def cached(self, sha256: str) -> str | None:
        """Path of a verified object in the cache, or None (a string: this is on every page read)."""
        path = f"{self._objects}/{sha256[:2]}/{sha256}"
        return path if os.path.isfile(path) else None

    @contextmanager
    def _locked(self, sha256: str):
        self.tmp.mkdir(parents=True, exist_ok=True)
        with open(self.tmp / f"{sha256}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- requests ----------------------------------------------------------------------------------

    def _open(self, url: str, start: int | None = None, end: int | None = None):
        headers = {"User-Agent": self.policy.user_agent, "Accept-Encoding": "identity"}
        if start is not None:
            headers["Range"] = f"bytes={start}-{end - 1}"
        self.requests += 1
        if not self._proxies:
            return self._open_kept(url, headers)
        req = urllib.request.Request(url, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=self.policy.timeout_s)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (408, 429) or e.code >= 500:
                raise _Retry(f"HTTP {e.code}") from None
            if e.code == 416:
                raise DataError(
                    f"{url}: the server has fewer bytes than the manifest says (HTTP 416)"
                ) from None
            raise DataError(f"{url}: HTTP {e.code} {e.reason}; check the --data URL") from None
        except _TRANSIENT as e:
            raise _Retry(str(e) or type(e).__name__) from None

    def _open_kept(self, url: str, headers: dict, hops: int = 0) -> _Response:
        """GET over a kept-alive connection of this thread (one per host); follows redirects."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DataError(f"{url}: not an http(s) URL")
        key = (parts.scheme, parts.netloc)
        pool = self._local.__dict__.setdefault("conns", {})
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        for fresh in (False, True):
            conn = None if fresh else pool.pop(key, None)
            reused = conn is not None
            if conn is None:
                cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                conn = cls(parts.netloc, timeout=self.policy.timeout_s)
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                break
            except _TRANSIENT as e:
                conn.close()
                if not reused:  # a kept connection the server closed meanwhile: once more, fresh
                    raise _Retry(str(e) or type(e).__name__) from None
        release = _Response(resp, lambda: pool.__setitem__(key, conn), conn.close)
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.headers.get("Location")
            release.close()
            if not location or hops >= 5:
                raise DataError(f"{url}: too many or empty redirects")
            return self._open_kept(urllib.parse.urljoin(url, location), headers, hops + 1)
        if resp.status >= 400:
            release.close()
            if resp.status in (408, 429) or resp.status >= 500:
                raise _Retry(f"HTTP {resp.status}")
            if resp.status == 416:
                raise DataError(f"{url}: the server has fewer bytes than the manifest says (HTTP 416)")
            raise DataError(f"{url}: HTTP {resp.status} {resp.reason}; check the --data URL")
        return release

    def _with_retries(self, what: str, url: str, attempt_fn):
        delay = self.policy.backoff_s
        last = ""
        for attempt in range(self.policy.retries + 1):
            try:
                return attempt_fn()
            except _Retry as e:
                last = str(e)
            if attempt < self.policy.retries:
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise NetworkError(
            f"could not fetch {what} from {url} after {self.policy.retries + 1} attempts ({last}); "
            "check the network or the --data URL"
        )

    def get_bytes(self, url: str, *, max_bytes: int, what: str) -> bytes:
        """A small whole file (a manifest), at most ``max_bytes``; not cached."""

        def attempt() -> bytes:
            resp = self._open(url)
            with resp:
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > max_bytes:
                    raise DataError(f"{what} at {url} is {length} bytes, more than the {max_bytes} allowed")
                try:
                    data = resp.read(max_bytes + 1)
                except _TRANSIENT as e:
                    raise _Retry(str(e) or type(e).__name__) from None
            if len(data) > max_bytes:
                raise DataError(f"{what} at {url} is larger than the {max_bytes} bytes allowed")
            self.bytes_downloaded += len(data)
            return data

        return self._with_retries(what, url, attempt)

    # -- verified downloads ------------------------------------------------------------------------

    def fetch(
        self, url: str, *, sha256: str, size: int, offset: int | None = None, what: str = "file"
    ) -> Path:
        """Bytes ``[offset, offset + size)`` of ``url`` (``offset`` None: the whole file, ``size`` bytes) as a
        verified cache object; returns its path.

        Raises :class:`RangeNotSupported` when a byte range is asked for and the server ignores ``Range``,
        :class:`~peer.errors.DataError` when the bytes do not match ``sha256`` (nothing is cached)."""
        dest = self.path_of(sha256)
        if dest.is_file():
            return dest
        with self._locked(sha256):
            if dest.is_file():  # another thread or process finished it while we waited
                return dest
            part = self.tmp / f"{sha256}.part"
            resumed = part.is_file() and part.stat().st_size > 0
            self._with_retries(what, url, lambda: self._continue(url, part, offset, size, what))
            if _file_sha256(part) != sha256:
                part.unlink()
                if resumed:  # the partial file may predate a change on the server: once more from zero
                    self._with_retries(what, url, lambda: self._continue(url, part, offset, size, what))
                    if _file_sha256(part) == sha256:
                        return self._commit(part, dest)
                    part.unlink()
                raise DataError(
                    f"{what} from {url} does not match the sha256 in the manifest (tampered or corrupt); "
                    "it was discarded, not cached"
                )
            return self._commit(part, dest)

    def _commit(self, part: Path, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        return dest

    def _continue(self, url: str, part: Path, offset: int | None, size: int, what: str) -> None:
        """One attempt: append the missing bytes of ``part`` (raises _Retry on a transient failure)."""
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            return
        whole_file = offset is None
        offset = offset or 0
        # a whole file from its start needs no Range (servers without Range support still work)
        resp = self._open(url) if whole_file and not have else self._open(url, offset + have, offset + size)
        with resp:
            status = resp.status
            if status == 206:
                m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if not m or int(m.group(1)) != offset + have or int(m.group(2)) >= offset + size:
                    raise DataError(f"{url}: the server answered another byte range than asked for ({what})")
            elif status == 200:
                if not whole_file:
                    raise RangeNotSupported(f"{url} does not support Range requests")
                if have:  # the server restarts from byte 0: so do we
                    part.unlink()
                    have = 0
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != size:
                    raise DataError(
                        f"{what} at {url} is {length} bytes, the manifest says {size}; the data set is inconsistent"
                    )
            else:
                raise DataError(f"{url}: unexpected HTTP {status}")
            with open(part, "ab") as fh:
                want = size - have
                try:
                    while want > 0:
                        chunk = resp.read(min(CHUNK, want))
                        if not chunk:
                            break
                        fh.write(chunk)
                        want -= len(chunk)
                        self.bytes_downloaded += len(chunk)
                except _TRANSIENT as e:
                    raise _Retry(
                        f"connection lost after {size - want} of {size} bytes: {e or type(e).__name__}"
                    ) from None
        if want > 0:
            raise _Retry(f"connection closed after {size - want} of {size} bytes")

    def close(self) -> None:
        """Close this thread's kept-alive connections."""
        for conn in self._local.__dict__.pop("conns", {}).values():
            conn.close()


class _Response:
    """A response whose connection goes back to the pool when the body was read to its end."""

    def __init__(self, resp: http.client.HTTPResponse, keep, drop):
        self.resp, self._keep, self._drop = resp, keep, drop
        self.status, self.headers, self.reason = resp.status, resp.headers, resp.reason

    def read(self, n: int) -> bytes:
        return self.resp.read(n)

    def close(self) -> None:
        if self.resp.isclosed() and not self.resp.will_close:
            self._keep()
        else:
            self.resp.close()
            self._drop()

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
