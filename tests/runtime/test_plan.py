"""Memory planner: KV bytes against an independent formula and llama.cpp's own log, compute buffer vs llama.cpp."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgerope.errors import GGUFError, RuntimeConfigError
from edgerope.runtime.plan import PLAN_CACHE_TYPES, plan_memory
from edgerope.system.memory import parse_size

BPE = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("plan")
    ck = make_tiny_checkpoint(
        root / "hf",
        tokenizer_dir=tiny_tokenizer_dir,
        max_position_embeddings=8192,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        num_hidden_layers=3,
    )
    return convert(ck, root / "tiny.gguf", outtype="f16").path


def test_kv_bytes_formula(tiny_gguf: Path) -> None:
    for n_ctx in (1, 255, 256, 1000, 5000):
        for t in ("f16", "q8_0", "q4_0"):
            p = plan_memory(tiny_gguf, n_ctx=n_ctx, type_k=t, type_v="f16", memory_budget="1GiB")
            padded = -(-n_ctx // 256) * 256
            # 3 layers x 2 kv heads x head_dim 64, K of type t, V f16
            expected = 3 * padded * 2 * 64 * (BPE[t] + 2.0)
            assert p.kv_bytes == expected, (n_ctx, t, p.kv_bytes, expected)


def _measure(path: Path, caplog: pytest.LogCaptureFixture, **kw: object) -> tuple[float, float]:
    from edgerope.runtime.runtime import Runtime

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="edgerope.llama_cpp"):
        with Runtime.open(path, n_threads=1, **kw):  # type: ignore[arg-type]
            pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    kv = float(re.search(r"llama_kv_cache: size = +([\d.]+) MiB", text).group(1))  # type: ignore[union-attr]
    comp = float(re.search(r"compute buffer size is +([\d.]+) MiB", text).group(1))  # type: ignore[union-attr]
    return kv, comp


@pytest.mark.parametrize(
    ("n_ctx", "tk", "tv", "fa"),
    [
        (2048, "f16", "f16", "off"),
        (4096, "f16", "f16", "on"),
        (3000, "q8_0", "q8_0", "on"),
        (8192, "q4_0", "q4_0", "on"),
        (1024, "q8_0", "f16", "off"),
    ],
)
def test_against_llama_cpp(
    tiny_gguf: Path, caplog: pytest.LogCaptureFixture, n_ctx: int, tk: str, tv: str, fa: str
) -> None:
    kv_mib, comp_mib = _measure(tiny_gguf, caplog, n_ctx=n_ctx, type_k=tk, type_v=tv, flash_attn=fa)
    p = plan_memory(tiny_gguf, n_ctx=n_ctx, type_k=tk, type_v=tv, memory_budget="1GiB", flash_attn=fa == "on")
    planned_kv = p.kv_bytes / 2**20
    assert abs(planned_kv - kv_mib) <= max(0.01 * kv_mib, 0.005), (planned_kv, kv_mib)  # log has 2 decimals
    ratio = p.compute_bytes / 2**20 / comp_mib
    assert 0.98 <= ratio <= 1.10, f"compute planned {p.compute_bytes / 2**20:.3f} MiB, llama.cpp {comp_mib} MiB"


def test_largest_context_monotone_and_within_budget(tiny_gguf: Path) -> None:
    prev = {t: 0 for t in PLAN_CACHE_TYPES}
    for budget in ("60MiB", "70MiB", "90MiB", "150MiB", "1GiB"):
        p = plan_memory(tiny_gguf, memory_budget=budget, n_ctx=256)
        for t in PLAN_CACHE_TYPES:
            r = p.largest_ctx[t]
            assert r["n_ctx"] >= prev[t]
            prev[t] = r["n_ctx"]
            if r["n_ctx"]:
                q = plan_memory(tiny_gguf, memory_budget=budget, n_ctx=r["n_ctx"], type_k=t, type_v=t)
                assert q.fits, (budget, t, q.total_bytes)
            if r["limited_by"] == "memory":
                nxt = plan_memory(tiny_gguf, memory_budget=budget, n_ctx=r["n_ctx"] + 256, type_k=t, type_v=t)
                assert not nxt.fits
        # smaller caches never allow less context
        ctxs = [p.largest_ctx[t]["n_ctx"] for t in ("f16", "q8_0", "q5_1", "q4_0")]
        assert ctxs == sorted(ctxs)
    assert p.largest_ctx["q4_0"] == {"n_ctx": 8192, "limited_by": "model"}


def test_parse_size() -> None:
    assert parse_size("8GiB") == 8 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("8G") == 8 * 2**30
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("12345") == 12345
    for bad in ("8X", "", "GiB", "-1G", "0"):
        with pytest.raises(RuntimeConfigError):
            parse_size(bad)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from edgerope.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, "plan", *args], capture_output=True, text=True)


def test_cli(tiny_gguf: Path, tmp_path: Path) -> None:
    r = _cli(str(tiny_gguf), "--ctx", "4096", "--kv", "q8_0", "--memory", "1GiB", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["kv_bytes"] == 3 * 4096 * 2 * 64 * 2 * BPE["q8_0"]
    assert d["total_bytes"] == sum(
        d[k] for k in ("weights_bytes", "kv_bytes", "compute_bytes", "output_bytes", "work_bytes", "overhead_bytes")
    )
    assert d["flash_attn"] is True and d["fits"] is True
    r = _cli(str(tiny_gguf), "--kv-k", "q8_0", "--kv-v", "f16", "--memory", "100MiB")
    assert r.returncode == 0 and "largest context" in r.stdout and "MiB" in r.stdout
    r = _cli(str(tiny_gguf), "--ctx", "20000", "--memory", "1GiB")
    assert r.returncode == 0 and "extrapolation" in r.stdout
    assert _cli(str(tiny_gguf), "--kv", "q3_k").returncode == 2
    assert _cli(str(tiny_gguf), "--memory", "lots").returncode == 2
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    r = _cli(str(junk))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:5000])
    assert _cli(str(cut)).returncode == 2
    with pytest.raises(GGUFError):
        plan_memory(cut, memory_budget="1GiB")
