"""Where a list comes from: a local file (re-read when it changes) or an http(s) URL.

URL lists are fetched with a conditional GET (If-None-Match / If-Modified-Since from the
last good response) and the last good body is kept in the state directory, so a failed
refresh or a start-up without network still has the list.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
import trio

from dnsproxy.errors import DnsProxyError
from dnsproxy.files import stamp

from .parse import Parsed


class FetchError(DnsProxyError):
    """A list could not be read or downloaded (one line, names the list)."""


@attrs.define(eq=False)
class Source:
    """One configured list and its loading state."""

    index: int
    spec: str  # as written in the config
    name: str  # shown in logs, EDE text and metrics
    allow: bool  # from the ``allow`` option: every entry is an exception
    path: Path | None = None
    url: str | None = None
    state_dir: Path | None = None
    parsed: Parsed | None = None
    seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file (or kept copy) parsed
    failures: int = 0
    loaded_at: float | None = None  # Unix time the list in use was parsed (for the dashboard)
    checked_at: float | None = None  # Unix time of the last read or download attempt
    pending_meta: dict[str, Any] | None = None  # validators of the body being parsed

    @classmethod
    def make(cls, index: int, spec: str, allow: bool, base: Path, state_dir: Path) -> Source:
        if spec.startswith(("http://", "https://")):
            name = spec.rstrip("/").rsplit("/", 1)[-1] or spec
            return cls(index, spec, name, allow, url=spec, state_dir=state_dir / "blocklist")
        path = Path(spec).expanduser()
        path = path if path.is_absolute() else base / path
        return cls(index, spec, path.name, allow, path=path)

    def stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of the file the list is read from (for a URL, the kept copy)."""
        return stamp(self.path if self.path is not None else self.cache_path)

    # --- files --------------------------------------------------------------------------

    def read_file(self, max_size: int, *, if_changed: bool = False) -> bytes | None:
        """The file's bytes, or None when ``if_changed`` and it has not changed."""
        assert self.path is not None
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if if_changed and stamp == self.seen:
                return None
            if st.st_size > max_size:
                raise FetchError(f"{self.path}: {st.st_size} bytes, over max_size = {max_size}")
            data = self.path.read_bytes()
        except OSError as exc:
            raise FetchError(f"{self.path}: {exc.strerror or exc}") from exc
        self.seen = stamp
        return data

    # --- URLs ---------------------------------------------------------------------------

    @property
    def _stem(self) -> Path:
        assert self.state_dir is not None and self.url is not None
        return self.state_dir / hashlib.sha256(self.url.encode()).hexdigest()[:24]

    @property
    def cache_path(self) -> Path:
        return self._stem.with_suffix(".list")

    @property
    def meta_path(self) -> Path:
        return self._stem.with_suffix(".json")

    def cached(self) -> bytes | None:
        """The last good download, if there is one."""
        try:
            return self.cache_path.read_bytes()
        except OSError:
            return None

    def _validators(self) -> dict[str, str]:
        if not self.cache_path.exists():
            return {}
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}
        headers = {}
        if isinstance(meta.get("etag"), str):
            headers["If-None-Match"] = meta["etag"]
        if isinstance(meta.get("last_modified"), str):
            headers["If-Modified-Since"] = meta["last_modified"]
        return headers

    async def download(self, client: Any, max_size: int, timeout: float) -> bytes | None:
        """The new body, or None if the server says our copy is current (304).

        The whole exchange is bounded by ``timeout`` (a server dripping bytes cannot hold
        it longer) and the body by ``max_size``. Raises FetchError.
        """
        import httpx

        assert self.url is not None
        with trio.move_on_after(timeout) as scope:
            try:
                async with client.stream("GET", self.url, headers=self._validators()) as resp:
                    if resp.status_code == 304:
                        return None
                    if resp.status_code != 200:
                        raise FetchError(f"{self.url}: HTTP {resp.status_code}")
                    declared = resp.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_size:
                        raise FetchError(f"{self.url}: {declared} bytes, over max_size")
                    parts, size = [], 0
                    async for part in resp.aiter_bytes():
                        size += len(part)
                        if size > max_size:
                            raise FetchError(f"{self.url}: over max_size = {max_size} bytes")
                        parts.append(part)
                    body = b"".join(parts)
                    got = resp.num_bytes_downloaded
                    if declared and declared.isdigit() and int(declared) != got:
                        raise FetchError(f"{self.url}: truncated ({got} of {declared} bytes)")
                    etag = resp.headers.get("etag")
                    modified = resp.headers.get("last-modified")
            except httpx.HTTPError as exc:
                raise FetchError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        if scope.cancelled_caught:
            raise FetchError(f"{self.url}: no complete answer within {timeout:g} s")
        self.pending_meta = {"url": self.url, "etag": etag, "last_modified": modified}
        return body

    def keep(self, body: bytes) -> None:
        """Store a body that parsed well as the last good copy (atomically; through a file
        of this process's own: with ``[server] workers`` every process keeps its copy)."""
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, self.cache_path)
        self.meta_path.write_text(json.dumps(self.pending_meta or {"url": self.url}))
