"""A persistent on-disk cache of processed documents: llama.cpp's saved KV state after a document prefix.

What it does:

* ``model_identity`` binds entries to the model's *content*: the sha256 of the whole GGUF file, computed once
  and recorded in the cache folder (``models/``) under the file's identity on disk (device, inode, size, mtime
  and ctime, all from one ``stat``), so later runs only ``stat`` the file.  Weights changed in place change the
  file's ctime (which no user call can set back), so their digest is computed again: a stale state is never
  restored.  The same weights at another path share entries;
* ``entry_key`` hashes (sha256 of canonical JSON) everything that decides the saved state (``prefix.state_fields``:
  the model identity, prompt tokens, template, context and cache settings, rope, llama.cpp build);
* ``DocCache.get`` reads an entry cheapest check first and never trusts it: a regular file (a symlink, FIFO or
  device in the folder is refused by type, never opened for reading), the magic, a header length within
  ``MAX_HEADER_BYTES``, a header that is valid JSON of the expected schema (types and ranges of every field),
  made for this key and these fields, a state size within the caller's bound and equal to what the file holds
  (``fstat``) -- only then the state is read, and its sha256 checked.  Any failure is a miss: logged, and the
  entry removed so that it is rebuilt once, not retried forever;
* ``DocCache.remove(key, why)`` removes an entry a caller found unusable (a state llama.cpp or
  ``edgerope.runtime.seqstate`` refuses);
* ``DocCache.put`` writes ``<key>.erdoc`` atomically (``edgerope.system.files.atomic_output``: a temp file,
  owner-only, fsynced, read back through the same checks, renamed); then the least recently used entries
  (mtime, refreshed on every hit) are evicted until the folder -- entries and in-progress temp files together --
  fits the size limit;
* at first use, temp files left by killed runs (their pid no longer running) are removed
  (``edgerope.system.files.clean_stale_partials``).

File layout: ``MAGIC`` (8 bytes), header length (u32 little endian), the header (UTF-8 JSON), the state bytes.

What it does not do: evaluate anything or talk to llama.cpp (``edgerope.runtime.prefix`` does), or interpret the
state bytes (``edgerope.runtime.seqstate`` checks their structure).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerope.errors import OutputError
from edgerope.gguf.reader import GGUFFile, using_gguf
from edgerope.system.files import atomic_output, clean_stale_partials

logger = logging.getLogger(__name__)

MAGIC = b"ERDOCKV\x00"
FORMAT_VERSION = 2
SUFFIX = ".erdoc"
DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_HEADER_BYTES = 1 << 20
MODELS_DIR = "models"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ENTRY = re.compile(r"^[0-9a-f]{64}" + re.escape(SUFFIX) + "$")
_TEMP = re.compile(r"^\.[0-9a-f]{64}" + re.escape(SUFFIX) + r"\..*\.partial$")
_LEN = struct.Struct("<I")
_PREFIX = len(MAGIC) + _LEN.size
_HASH_CHUNK = 1 << 22


def default_cache_dir() -> Path:
    """``$EDGEROPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgerope/docs``, else ``~/.cache/edgerope/docs``."""
    env = os.environ.get("EDGEROPE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerope" / "docs"


# --------------------------------------------------------------------------------------------------------------
# the model's identity


def _file_sha256(fh: Any) -> str:
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    fh.seek(0)
    while n := fh.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def model_identity(
    src: str | os.PathLike[str] | GGUFFile, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """The GGUF's content identity ``{"sha256": ..., "size": ...}`` (``src``: a path, or the file already open).

    The digest is recorded in ``<cache_dir>/models/`` (default: ``default_cache_dir()``) keyed by the file's
    device, inode, size, mtime and ctime, and reused while those are unchanged; without a usable folder it is
    computed every time."""
    with using_gguf(src) as f:
        path = f.path.resolve()
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        stamp = {
            "dev": st.st_dev,
            "ino": st.st_ino,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        record = root / MODELS_DIR / f"{hashlib.sha256(json.dumps([str(path), stamp]).encode()).hexdigest()}.json"
        digest = _read_record(record, stamp)
        if digest is None:
            digest = _file_sha256(fh)
            if os.fstat(fh.fileno()).st_ctime_ns == st.st_ctime_ns:  # not written to while hashing
                _write_record(record, stamp, digest)
    return {"sha256": digest, "size": st.st_size}


def _read_record(path: Path, stamp: Mapping[str, int]) -> str | None:
    try:
        if path.stat().st_size > 4096:
            raise ValueError("too large")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        logger.warning("document cache: ignoring the model record %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    ok = isinstance(data, dict) and data.get("stamp") == dict(stamp) and isinstance(data.get("sha256"), str)
    if not ok or not _HEX64.match(data["sha256"]):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return str(data["sha256"])


def _write_record(path: Path, stamp: Mapping[str, int], digest: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            tmp.write_text(json.dumps({"stamp": dict(stamp), "sha256": digest}), encoding="utf-8")
    except OSError as exc:  # the cache is an optimisation: compute the digest again next time
        logger.warning("document cache: could not record the model digest in %s: %s", path.parent, exc)


# --------------------------------------------------------------------------------------------------------------
# entries


def tokens_digest(tokens: list[int]) -> str:
    """sha256 of the token ids (int32 little endian)."""
    return hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()


def entry_key(fields: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``fields`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """A cache hit: the saved state, how many positions it holds, and its file."""

    key: str
    state: bytes
    n_tokens: int
    path: Path


class BadEntry(Exception):
    """An entry file that fails a check (the message says which)."""


def _canonical(fields: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(fields)))


def _check_header(header: Any, key: str, fields: Mapping[str, Any], max_state: int) -> tuple[int, int, str]:
    """(n_tokens, state_size, state_sha256) of a schema-valid header for ``key``; ``BadEntry`` otherwise."""
    if not isinstance(header, dict):
        raise BadEntry("the header is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise BadEntry(f"unknown format version {header.get('format')!r}")
    n, size, sha = header.get("n_tokens"), header.get("state_size"), header.get("state_sha256")
    for name, value in (("n_tokens", n), ("state_size", size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadEntry(f"header field {name} is {value!r}, not a positive integer")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise BadEntry("header field state_sha256 is not a sha256")
    if header.get("key") != key or not isinstance(header.get("fields"), dict):
        raise BadEntry("made for another key")
    if header["fields"] != _canonical(fields):
        raise BadEntry("made for other settings")
    if size > max_state:
        raise BadEntry(f"the state is {size} bytes, above the bound {max_state}")
    return n, size, sha


def read_entry(path: Path, key: str, fields: Mapping[str, Any], *, max_state_bytes: int) -> CacheEntry:
    """Read and check one entry file (module docstring); ``FileNotFoundError`` when absent, ``BadEntry`` when
    any check fails."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadEntry("not a regular file")
        if st.st_size < _PREFIX:
            raise BadEntry("truncated header")
        head = os.pread(fd, _PREFIX, 0)
        if head[: len(MAGIC)] != MAGIC:
            raise BadEntry("not an edgerope cache file (bad magic)")
        (n_header,) = _LEN.unpack_from(head, len(MAGIC))
        if n_header > MAX_HEADER_BYTES or _PREFIX + n_header > st.st_size:
            raise BadEntry(f"header length {n_header} is out of bounds")
        try:
            header = json.loads(os.pread(fd, n_header, _PREFIX).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise BadEntry("unreadable header") from None
        n_tokens, size, sha = _check_header(header, key, fields, max_state_bytes)
        if _PREFIX + n_header + size != st.st_size:
            raise BadEntry(f"the file holds {st.st_size - _PREFIX - n_header} state bytes, the header says {size}")
        state = os.pread(fd, size, _PREFIX + n_header)
        if len(state) != size or hashlib.sha256(state).hexdigest() != sha:
            raise BadEntry("state checksum mismatch")
    finally:
        os.close(fd)
    return CacheEntry(key=key, state=state, n_tokens=n_tokens, path=path)


class DocCache:
    """One cache folder of ``<key>.erdoc`` entries with an LRU size limit (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        if max_bytes < 1:
            raise OutputError(f"the cache size limit must be positive, got {max_bytes}", where=str(self.root))
        self.max_bytes = int(max_bytes)
        self._started = False

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def _start(self) -> None:
        """At first use: remove temp files of killed runs."""
        if not self._started:
            self._started = True
            for p in clean_stale_partials(self.root):
                logger.info("document cache: removed %s, left by a run that was killed", p)

    # reading
    def remove(self, key: str, why: str) -> None:
        """Remove an entry found unusable (logged)."""
        path = self.path_for(key)
        logger.warning("document cache: ignoring %s (%s); it will be rebuilt", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def get(self, key: str, fields: Mapping[str, Any], *, max_state_bytes: int | None = None) -> CacheEntry | None:
        """The entry for ``key`` if it is present, passes every check and was made from ``fields``; else None
        (a bad entry is removed).  ``max_state_bytes`` bounds the state it may read (default: the size limit)."""
        self._start()
        path = self.path_for(key)
        try:
            entry = read_entry(
                path, key, fields, max_state_bytes=min(max_state_bytes or self.max_bytes, self.max_bytes)
            )
        except FileNotFoundError:
            return None
        except BadEntry as exc:
            self.remove(key, str(exc))
            return None
        except OSError as exc:
            if path.is_symlink():
                self.remove(key, "a symbolic link")
            else:
                logger.warning("document cache: cannot read %s (%s)", path, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return entry

    # writing
    def put(self, key: str, fields: Mapping[str, Any], state: bytes, *, n_tokens: int) -> Path:
        """Write the entry atomically (temp + check + rename), then evict down to the size limit."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the cache folder: {exc}", where=str(self.root)) from exc
        self._start()
        header = json.dumps(
            {
                "format": FORMAT_VERSION,
                "key": key,
                "fields": dict(fields),
                "n_tokens": int(n_tokens),
                "state_size": len(state),
                "state_sha256": hashlib.sha256(state).hexdigest(),
            },
            sort_keys=True,
        ).encode()
        if len(header) > MAX_HEADER_BYTES:
            raise OutputError(f"the cache entry's header is {len(header)} bytes, above {MAX_HEADER_BYTES}")
        path = self.path_for(key)
        with atomic_output(path) as tmp:
            with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as fh:  # owner only
                fh.write(MAGIC + _LEN.pack(len(header)) + header)
                fh.write(state)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                read_entry(tmp, key, fields, max_state_bytes=len(state))
            except BadEntry as exc:
                raise OutputError(f"the cache entry did not read back ({exc})", where=str(tmp)) from None
        self.evict(keep=path)
        return path

    def entries(self) -> list[Path]:
        """Entry files (foreign files in the folder are left alone), oldest use first."""
        return [p for _, p in sorted(self._files(_ENTRY))]

    def _files(self, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
        out = []
        try:
            found = list(os.scandir(self.root))
        except OSError:
            return []
        for e in found:
            if pattern.match(e.name):
                with contextlib.suppress(OSError):
                    out.append((e.stat(follow_symlinks=False).st_mtime_ns, Path(e.path)))
        return out

    def evict(self, *, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the folder's entries and temp files fit ``max_bytes``;
        returns them."""
        files = self.entries()
        sizes = {}
        for p in files:
            with contextlib.suppress(OSError):
                sizes[p] = p.stat().st_size
        total = sum(sizes.values())
        for _, p in self._files(_TEMP):  # writes in progress count too
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        removed = []
        for p in files:
            if total <= self.max_bytes:
                break
            if p == keep or p not in sizes:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                total -= sizes[p]
                removed.append(p)
                logger.info("document cache: evicted %s", p)
        return removed
