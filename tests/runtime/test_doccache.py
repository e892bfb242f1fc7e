"""edgerope.runtime.doccache: entry files (hit, corrupt, truncated, foreign, other settings), atomic concurrent writes,
LRU eviction, and a llama.cpp state saved through the cache giving the same logits as a fresh evaluation."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from edgerope.runtime.doccache import MAGIC, SUFFIX, DocCache, _parse, entry_key

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


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic", "header", "other-fields"])
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
        why, entry = _parse(data, key, FIELDS, path)
        assert entry is not None, f"a reader saw a bad entry: {why}"
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
