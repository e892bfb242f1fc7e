"""A persistent on-disk cache of processed documents: llama.cpp's saved KV state after a document prefix.

What it does:

* ``entry_key`` hashes (sha256 of canonical JSON) everything that decides the saved state: the GGUF's
  identity (``model_identity``: resolved path, size, mtime, a hash of its metadata header), the exact
  prompt token ids of the prefix, the prompt template, n_ctx, cache types, flash attention, rope
  settings/overrides and the llama.cpp build (``edgerope.runtime.native.bindings_version``);
* ``DocCache.get`` returns the state bytes of an entry, or None on a miss: a missing file, or one that
  is corrupt, truncated or foreign (wrong magic, unreadable header, key or fields that do not match,
  wrong length or sha256 of the state) -- those are logged as a warning and deleted so that the next
  ``put`` replaces them;
* ``DocCache.put`` writes ``<key>.erdoc`` atomically: a temp file created with O_EXCL
  (``edgerope.system.files.atomic_output``, owner-only) in the cache folder, fsynced, re-read and checked, then renamed over the
  entry. Concurrent writers of one key each write their own temp file; the last rename wins and
  readers only ever see a complete file. Then the least recently used entries (file mtime, refreshed
  on every hit) are evicted until the folder is under its size limit.

File layout: ``MAGIC`` (8 bytes), header length (u32 little endian), the header (UTF-8 JSON: format
version, key, key fields, token count, state size and sha256), the state bytes.

What it does not do: evaluate anything or talk to llama.cpp (``edgerope.apps.ask`` does), or interpret the
state bytes (llama.cpp's own format; a state saved by another build is keyed apart).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerope.errors import OutputError
from edgerope.gguf.reader import GGUFFile, using_gguf
from edgerope.system.files import atomic_output

logger = logging.getLogger(__name__)

MAGIC = b"ERDOCKV\x00"
FORMAT_VERSION = 1
SUFFIX = ".erdoc"
DEFAULT_MAX_BYTES = 4 * 1024**3
HEADER_HASH_BYTES = 64 * 1024**2  # a GGUF's metadata is hashed up to this size (the tensor data is not)
_ENTRY = re.compile(r"^[0-9a-f]{64}" + re.escape(SUFFIX) + "$")
_LEN = struct.Struct("<I")


def default_cache_dir() -> Path:
    """``$EDGEROPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/edgerope/docs``, else ``~/.cache/edgerope/docs``."""
    env = os.environ.get("EDGEROPE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgerope" / "docs"


def model_identity(src: str | os.PathLike[str] | GGUFFile) -> dict[str, Any]:
    """The GGUF's identity: resolved path, size, mtime (ns) and the sha256 of its metadata header (``src``: a
    path, or the file already open)."""
    with using_gguf(src) as f:
        header_end = min(f.data_offset, HEADER_HASH_BYTES)
        p = f.path.resolve()
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        h.update(fh.read(header_end))
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": h.hexdigest()}


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


class DocCache:
    """One cache folder of ``<key>.erdoc`` entries with an LRU size limit (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        if max_bytes < 1:
            raise OutputError(f"the cache size limit must be positive, got {max_bytes}", where=str(self.root))
        self.max_bytes = int(max_bytes)

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    # reading
    def _bad(self, path: Path, why: str) -> None:
        logger.warning("document cache: ignoring %s (%s); it will be rebuilt", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def get(self, key: str, fields: Mapping[str, Any]) -> CacheEntry | None:
        """The entry for ``key`` if it is present and intact and was made from ``fields``; else None."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.warning("document cache: cannot read %s (%s)", path, exc)
            return None
        why, entry = _parse(data, key, fields, path)
        if entry is None:
            self._bad(path, why)
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
        blob = MAGIC + _LEN.pack(len(header)) + header + state
        path = self.path_for(key)
        with atomic_output(path) as tmp:
            with os.fdopen(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "wb") as fh:  # owner only
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            why, entry = _parse(tmp.read_bytes(), key, fields, path)
            if entry is None:
                raise OutputError(f"the cache entry did not read back ({why})", where=str(tmp))
        self.evict(keep=path)
        return path

    def entries(self) -> list[Path]:
        """Entry files (foreign files in the folder are left alone), oldest use first."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            if _ENTRY.match(p.name):
                with contextlib.suppress(OSError):
                    out.append((p.stat().st_mtime_ns, p))
        return [p for _, p in sorted(out)]

    def evict(self, *, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries until the folder's entries fit ``max_bytes``; returns them."""
        files = self.entries()
        sizes = {}
        for p in files:
            with contextlib.suppress(OSError):
                sizes[p] = p.stat().st_size
        total = sum(sizes.values())
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


def _parse(data: bytes, key: str, fields: Mapping[str, Any], path: Path) -> tuple[str, CacheEntry | None]:
    """(why it is bad, None) or ("", the entry)."""
    if not data.startswith(MAGIC):
        return "not an edgerope cache file (bad magic)", None
    start = len(MAGIC) + _LEN.size
    if len(data) < start:
        return "truncated header", None
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[start : start + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable header", None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        return "unknown format version", None
    if header.get("key") != key or header.get("fields") != json.loads(json.dumps(dict(fields))):
        return "made for other settings", None
    state = data[start + n :]
    if len(state) != header.get("state_size"):
        return f"state has {len(state)} bytes, header says {header.get('state_size')} (truncated?)", None
    if hashlib.sha256(state).hexdigest() != header.get("state_sha256"):
        return "state checksum mismatch", None
    return "", CacheEntry(key=key, state=state, n_tokens=int(header["n_tokens"]), path=path)
