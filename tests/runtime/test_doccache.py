"""edgerope.runtime.doccache and edgerope.runtime.seqstate: entry files (hit, corrupt, truncated, foreign, other
settings), crafted entries (valid checksum with bad header fields, out-of-bound lengths, huge sparse files, symlinks
and FIFOs in the folder, states with fewer cells than they claim) refused before their body is read and removed,
atomic concurrent writes, leftovers of killed writers cleaned and counted, LRU eviction, the model key bound to the
weights' content, and a llama.cpp state saved through the cache giving the same logits as a fresh evaluation."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edgerope.runtime.doccache import MAGIC, SUFFIX, BadEntry, DocCache, entry_key, read_entry

FIELDS = {"model": {"path": "/m.gguf", "size": 1}, "n_ctx": 4096, "type_k": "f16"}


def state(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_put_get_roundtrip_and_key_depends_on_every_field(tmp_path: Path) -> None:
    cache = DocCache(tmp_path)
    key = entry_key(FIELDS)
    assert cache.get(key, FIELDS) is None
    data = state(10_000)
    path = cache.put(key, FIELDS, data, n_tokens=123)
    assert path == tmp_path / f"{key}{SUFFIX}" and path.read_bytes().startswith(MAGIC)
    hit = cache.get(key, FIELDS)
    assert hit is not None and hit.state == data and hit.n_tokens == 123
    for name in FIELDS:
        other = dict(FIELDS, **{name: "changed"})
        assert entry_key(other) != key
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "header", "length", "other-fields"])
def test_damaged_entry_is_a_miss_with_warning_and_is_replaced(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DocCache(tmp_path)
    key = entry_key(FIELDS)
    path = cache.put(key, FIELDS, state(5_000), n_tokens=7)
    raw = bytearray(path.read_bytes())
    fields = FIELDS
    if damage == "flip":
        raw[-100] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) - 1000]
    elif damage == "magic":
        raw[:8] = b"GGUF\x03\x00\x00\x00"
    elif damage == "header":
        raw[14:20] = b"\xff" * 6
    elif damage == "length":
        raw[8:12] = (2**32 - 1).to_bytes(4, "little")
    else:
        fields = dict(FIELDS, n_ctx=8192)  # same file name, made for other settings
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="edgerope.runtime.doccache"):
        assert cache.get(key, fields) is None
    assert any("ignoring" in r.message for r in caplog.records), caplog.text
    assert not path.exists()  # removed, so the next put rebuilds it
    cache.put(key, fields, state(5_000, seed=1), n_tokens=7)
    hit = cache.get(key, fields)
    assert hit is not None and hit.state == state(5_000, seed=1)


def test_foreign_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ("0" * 63 + SUFFIX)).write_bytes(b"short name, not an entry")
    cache = DocCache(tmp_path, max_bytes=1)
    key = entry_key(FIELDS)
    cache.put(key, FIELDS, state(1_000), n_tokens=1)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / ("0" * 63 + SUFFIX)).exists()
    assert cache.entries() == [cache.path_for(key)]


def test_lru_eviction_by_use(tmp_path: Path) -> None:
    cache = DocCache(tmp_path, max_bytes=25_000)
    keys = [entry_key(dict(FIELDS, n_ctx=i)) for i in range(3)]
    for i, k in enumerate(keys[:2]):
        cache.put(k, dict(FIELDS, n_ctx=i), state(10_000), n_tokens=1)
        time.sleep(0.02)
    os.utime(cache.path_for(keys[1]), ns=(1, 1))  # entry 1 used long ago, entry 0 recently
    assert cache.get(keys[0], dict(FIELDS, n_ctx=0)) is not None
    cache.put(keys[2], dict(FIELDS, n_ctx=2), state(10_000), n_tokens=1)
    assert [p.name for p in cache.entries()] == [f"{keys[0]}{SUFFIX}", f"{keys[2]}{SUFFIX}"]


def _writer(root: str, seed: int, rounds: int) -> None:
    cache = DocCache(root)
    for r in range(rounds):
        cache.put(entry_key(FIELDS), FIELDS, state(3_000_000, seed=seed * 100 + r), n_tokens=seed)


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    key = entry_key(FIELDS)
    path = tmp_path / f"{key}{SUFFIX}"
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s, 6)) for s in (1, 2)]
    for p in procs:
        p.start()
    seen = 0
    while any(p.is_alive() for p in procs):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        tmp = tmp_path.parent / f"snapshot-{seen}"
        tmp.write_bytes(data)
        try:
            read_entry(tmp, key, FIELDS, max_state_bytes=1 << 30)
        except BadEntry as exc:
            raise AssertionError(f"a reader saw a bad entry: {exc}") from None
        tmp.unlink()
        seen += 1
    assert all(p.exitcode == 0 for p in procs)
    hit = DocCache(tmp_path).get(key, FIELDS)
    assert hit is not None and hit.n_tokens in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left
    assert seen > 0


@pytest.mark.llama
def test_state_through_cache_gives_fresh_logits(make_tiny: object, tmp_path: Path) -> None:
    """Prefill a prefix, save llama.cpp's state via the cache, restore it in a new runtime, evaluate the rest:
    the logits are bit-identical to the same evaluation without the cache, and (f32 KV) equal to evaluating the
    whole sequence in one go up to chunking noise."""
    from edgerope.convert.export import convert
    from edgerope.runtime.runtime import Runtime

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}
    ckpt = make_tiny(rope_parameters=yarn, max_position_embeddings=1024)  # type: ignore[operator]
    gguf = convert(ckpt, tmp_path / "m.gguf", outtype="f32").path
    rng = np.random.default_rng(0)
    prefix = [1] + rng.integers(3, 900, 700).tolist()
    rest = rng.integers(3, 900, 20).tolist()
    for kv in ("f32", "f16"):
        opts = dict(n_ctx=1024, type_k=kv, type_v=kv, n_threads=1, backend="cpu")
        cache = DocCache(tmp_path / f"cache-{kv}")
        fields = dict(FIELDS, type_k=kv)
        with Runtime.open(gguf, **opts) as rt:
            whole = rt.logits(prefix + rest)[-len(rest) :]  # (20, V)
            rt.prefill(prefix)
            cache.put(entry_key(fields), fields, rt.state_bytes(), n_tokens=len(prefix))
            fresh = rt.logits(rest, clear=False)  # (20, V)
        with Runtime.open(gguf, **opts) as rt:
            hit = cache.get(entry_key(fields), fields)
            assert hit is not None
            rt.restore_state(hit.state, n_past=hit.n_tokens)
            got = rt.logits(rest, clear=False)
            assert rt.n_evaluated == len(rest) and rt.n_past == len(prefix) + len(rest)
        err = np.abs(got - fresh).max()
        assert err == 0.0, f"{kv}: max |dlogit| {err:.3g} against the same evaluation without the cache"
        if kv == "f32":
            err = np.abs(got - whole).max()
            assert err < 1e-4, f"max |dlogit| {err:.3g} against one-shot evaluation"


def craft(path: Path, header: dict, state: bytes, *, header_len: int | None = None) -> None:
    """An entry file written by hand: any header, any state, a chosen header length."""
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<I", len(raw) if header_len is None else header_len) + raw + state)


def good_header(entry: str, state: bytes, **changes: object) -> dict:
    import hashlib

    h = {
        "format": 2,
        "key": entry,
        "fields": FIELDS,
        "n_tokens": 7,
        "state_size": len(state),
        "state_sha256": hashlib.sha256(state).hexdigest(),
    }
    h.update(changes)
    return h


BAD_HEADERS = [
    {"n_tokens": "abc"},
    {"n_tokens": -3},
    {"n_tokens": True},
    {"n_tokens": 1.5},
    {"n_tokens": None},
    {"state_size": "5000"},
    {"state_size": 2**70},
    {"state_sha256": 5},
    {"state_sha256": "zz"},
    {"format": "2"},
    {"fields": [1, 2]},
    {"key": None},
]


@pytest.mark.parametrize(
    "change", BAD_HEADERS, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))[:12] for c in BAD_HEADERS]
)
def test_header_with_a_valid_checksum_but_a_bad_field_is_removed_not_retried(tmp_path: Path, change: dict) -> None:
    cache = DocCache(tmp_path)
    key = entry_key(FIELDS)
    data = state(5_000)
    craft(cache.path_for(key), good_header(key, data, **change), data)
    assert cache.get(key, FIELDS) is None  # a miss, no traceback
    assert not cache.path_for(key).exists()  # removed: the next put rebuilds it once


def test_header_checked_before_the_body_is_read(tmp_path: Path) -> None:
    import tracemalloc

    cache = DocCache(tmp_path, max_bytes=1 << 20)
    key = entry_key(FIELDS)
    path = cache.path_for(key)
    size = 40 << 30  # 40 GiB, sparse
    header = good_header(key, b"", state_size=size, state_sha256="0" * 64)
    craft(path, header, b"")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size + size)
    tracemalloc.start()
    try:
        assert cache.get(key, FIELDS, max_state_bytes=1 << 20) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20 and not path.exists()  # refused by the size bound, nothing read
    # a header length pointing past the file, and one over the header limit
    for n in (10_000, 2**31):
        craft(path, good_header(key, b"x"), b"x", header_len=n)
        assert cache.get(key, FIELDS) is None and not path.exists()
    # the file holds more (or fewer) state bytes than the header says
    data = state(4_000)
    craft(path, good_header(key, data), data + b"extra")
    assert cache.get(key, FIELDS) is None and not path.exists()


def test_symlinks_fifos_and_folders_in_place_of_an_entry_are_refused(tmp_path: Path) -> None:
    cache = DocCache(tmp_path / "c")
    key = entry_key(FIELDS)
    cache.root.mkdir()
    target = tmp_path / "elsewhere"
    data = state(100)
    craft(target, good_header(key, data), data)
    cache.path_for(key).symlink_to(target)
    assert cache.get(key, FIELDS) is None and target.exists()  # never followed
    cache.path_for(key).unlink(missing_ok=True)
    os.mkfifo(cache.path_for(key))
    t0 = time.monotonic()
    assert cache.get(key, FIELDS) is None and time.monotonic() - t0 < 5  # did not block on the FIFO
    assert not cache.path_for(key).exists()


def test_leftovers_of_killed_writers_are_removed_and_live_ones_counted(tmp_path: Path) -> None:
    key = entry_key(FIELDS)
    dead = tmp_path / f".{key}{SUFFIX}.999999.abcd1234.partial"  # no such pid
    dead.write_bytes(b"x" * 50_000)
    live = tmp_path / f".{key}{SUFFIX}.{os.getppid()}.abcd1234.partial"  # a running process's write in progress
    live.write_bytes(b"y" * 20_000)
    cache = DocCache(tmp_path, max_bytes=35_000)
    other = entry_key(dict(FIELDS, n_ctx=1))
    cache.put(other, dict(FIELDS, n_ctx=1), state(10_000), n_tokens=1)
    assert not dead.exists() and live.exists()
    cache.put(key, FIELDS, state(10_000, seed=2), n_tokens=1)  # entries 2 x 10 kB + 20 kB in progress > 35 kB
    assert cache.entries() == [cache.path_for(key)]  # the older entry was evicted to make room


@pytest.mark.llama
def test_a_state_with_fewer_cells_than_its_entry_says_is_removed_and_rebuilt(make_tiny: object, tmp_path: Path) -> None:
    from edgerope.convert.export import convert
    from edgerope.runtime.prefix import load_prefix, state_fields
    from edgerope.runtime.runtime import Runtime

    gguf = convert(make_tiny(), tmp_path / "m.gguf", outtype="f32").path  # type: ignore[operator]
    cache = DocCache(tmp_path / "c")
    tokens = [1] + list(range(5, 105))
    with Runtime.open(gguf, n_ctx=256, n_threads=2, backend="cpu") as rt:
        first = load_prefix(rt, tokens, cache=cache, model="m", prompt_format="p")
        assert not first.cached and first.cache_file
        # an entry whose state holds 60 cells but says 101 tokens, with a valid checksum
        rt.prefill(tokens[:60])
        short = rt.state_bytes()
        fields = state_fields(rt, model="m", prompt_format="p", tokens=tokens)
        cache.put(entry_key(fields), fields, short, n_tokens=len(tokens))
        again = load_prefix(rt, tokens, cache=cache, model="m", prompt_format="p")
        assert not again.cached and rt.n_past == len(tokens)  # evaluated again, not restored
        hit = load_prefix(rt, tokens, cache=cache, model="m", prompt_format="p")
        assert hit.cached and rt.n_past == len(tokens)  # rebuilt once, then used


@pytest.mark.llama
def test_model_identity_binds_to_the_content_and_is_recorded(make_tiny: object, tmp_path: Path) -> None:
    from edgerope.convert.export import convert
    from edgerope.runtime import doccache

    gguf = convert(make_tiny(), tmp_path / "m.gguf", outtype="f32").path  # type: ignore[operator]
    calls = []
    original = doccache._file_sha256

    def counting(fh: object) -> str:
        calls.append(1)
        return original(fh)

    doccache._file_sha256 = counting  # type: ignore[assignment]
    try:
        a = doccache.model_identity(gguf, cache_dir=tmp_path / "c")
        b = doccache.model_identity(gguf, cache_dir=tmp_path / "c")
        assert a == b and len(calls) == 1  # the second run only stats the file
        copy = tmp_path / "copy.gguf"
        copy.write_bytes(gguf.read_bytes())
        assert doccache.model_identity(copy, cache_dir=tmp_path / "c") == a  # same weights elsewhere: same key
        st = gguf.stat()
        with open(gguf, "r+b") as fh:  # a weight changed in place, size and mtime kept
            fh.seek(st.st_size - 4)
            fh.write(b"\x01\x02\x03\x04")
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert doccache.model_identity(gguf, cache_dir=tmp_path / "c") != a
    finally:
        doccache._file_sha256 = original  # type: ignore[assignment]
