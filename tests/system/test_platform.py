"""Platform capabilities removed one at a time: every file copy and system query still works, with the same bytes.

Simulated platforms (the ``os`` functions they lack are removed or made to fail as they do there):

* ``linux``: as this machine is (``copy_file_range``, ``sendfile`` to files);
* ``no-copy-file-range``: an older Linux or Python: ``sendfile`` only;
* ``macos``: no ``copy_file_range``; ``sendfile`` writes only to sockets (ENOTSOCK for a file);
* ``windows``: neither kernel copy, and no ``pread``.

``copy_range`` itself, ``edgerope set-rope`` and a same-dtype ``convert`` (tensor bytes copied, not converted)
are run under each, and their outputs compared byte for byte with the native platform's.  The memory queries
run with ``/proc`` absent, ``psutil`` absent, and macOS's ``vm_stat`` output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.system import files, memory

PLATFORMS = ["linux", "no-copy-file-range", "macos", "windows"]


def simulate(monkeypatch: pytest.MonkeyPatch, platform: str) -> dict[str, int]:
    """Make ``os`` look like ``platform``; returns counters of the calls that still reach the kernel copies."""
    calls = {"copy_file_range": 0, "sendfile": 0}
    real_cfr = getattr(os, "copy_file_range", None)
    if platform == "linux":
        if real_cfr is None:
            pytest.skip("this Python has no os.copy_file_range: not a Linux build")
        return calls
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    if platform == "no-copy-file-range":
        return calls
    if platform == "macos":

        def socket_only_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
            calls["sendfile"] += 1
            raise OSError(errno.ENOTSOCK, "Socket operation on non-socket")

        monkeypatch.setattr(os, "sendfile", socket_only_sendfile)
        return calls
    monkeypatch.delattr(os, "sendfile", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    return calls


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_copy_range_copies_every_byte(platform, tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 3 * files.COPY_CHUNK + 12345, dtype=np.uint8).tobytes()
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    dst.write_bytes(b"head")
    calls = simulate(monkeypatch, platform)
    s_fd, d_fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    try:
        os.lseek(d_fd, 0, os.SEEK_END)
        offset = 7
        while True:
            n = files.copy_range(s_fd, d_fd, offset, len(data))
            if n == 0:
                break
            offset += n
    finally:
        os.close(s_fd)
        os.close(d_fd)
    assert dst.read_bytes() == b"head" + data[7:]
    if platform == "macos":
        assert calls["sendfile"] >= 1  # tried, refused with ENOTSOCK, fell back


def test_real_io_errors_are_not_swallowed(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken, raising=False)
    src = tmp_path / "s"
    src.write_bytes(b"x" * 10)
    s_fd, d_fd = os.open(src, os.O_RDONLY), os.open(tmp_path / "d", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(OSError, match="Input/output"):
            files.copy_range(s_fd, d_fd, 0, 10)
    finally:
        os.close(s_fd)
        os.close(d_fd)


@pytest.fixture(scope="module")
def gguf_in(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("platform") / "in.gguf", hidden=128, n_head=2, n_head_kv=1)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_set_rope_output_is_the_same_on_every_platform(platform, gguf_in, tmp_path, monkeypatch):
    from edgerope.gguf.set_rope import set_rope

    ref = tmp_path / "ref.gguf"
    set_rope(gguf_in, ref, rope_type="yarn", factor=4)
    simulate(monkeypatch, platform)
    out = tmp_path / "out.gguf"
    report = set_rope(gguf_in, out, rope_type="yarn", factor=4, full_verify=True)
    assert report.verified and digest(out) == digest(ref)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_same_dtype_convert_is_the_same_on_every_platform(platform, make_tiny, tmp_path, monkeypatch):
    """f32 checkpoint -> f32 GGUF: tensor bytes go through ``copy_range`` (no conversion)."""
    from edgerope.convert.export import convert

    ck = make_tiny()
    ref = tmp_path / "ref.gguf"
    convert(ck, ref, outtype="f32")
    simulate(monkeypatch, platform)
    out = tmp_path / "out.gguf"
    convert(ck, out, outtype="f32")
    assert digest(out) == digest(ref)


# ------------------------------------------------------------------------------------------------ memory queries

VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12345.
Pages active:                            200000.
Pages inactive:                          100000.
Pages speculative:                         3000.
Pages purgeable:                           5000.
"""


def test_vm_stat_output_is_parsed():
    assert memory.parse_vm_stat(VM_STAT) == 16384 * (12345 + 100000 + 5000)
    assert memory.parse_vm_stat("garbage") is None


def test_available_memory_without_proc(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda path="/proc/meminfo": None)
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil not installed
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    monkeypatch.setattr(memory, "_vm_stat_available", lambda: memory.parse_vm_stat(VM_STAT))
    assert memory.available_memory() == 16384 * (12345 + 100000 + 5000)
    monkeypatch.setattr(memory, "_vm_stat_available", lambda: None)  # Windows without psutil
    with pytest.raises(memory.RuntimeConfigError, match="--memory"):
        memory.available_memory()


def test_available_memory_on_this_machine_is_plausible():
    n = memory.available_memory()
    assert 64 * 2**20 < n < 2**50


def test_process_memory_without_proc(monkeypatch):
    real_path = memory.Path

    class NoProc(type(real_path())):  # a Path whose /proc files do not exist
        def read_text(self, *a, **k):
            if str(self).startswith("/proc/"):
                raise FileNotFoundError(str(self))
            return super().read_text(*a, **k)

    monkeypatch.setattr(memory, "Path", NoProc)
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert memory.process_rss() == 0  # unknown, not a crash
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert memory.process_peak_rss() == maxrss * 1024  # KiB on Linux
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.process_peak_rss() == maxrss  # bytes on macOS


def test_default_threads_without_sched_getaffinity(monkeypatch):
    from edgerope.runtime.native import default_threads

    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert default_threads() == (os.cpu_count() or 1)
