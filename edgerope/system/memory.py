"""Memory sizes, the memory this machine has available, and this process's own: one place for every layer.

``available_memory``: ``MemAvailable`` from ``/proc/meminfo`` on Linux; ``psutil`` where it is installed (any
platform); on macOS the free, inactive and purgeable pages ``vm_stat`` reports; else a clear error saying to give
a budget.  ``process_rss`` / ``process_peak_rss``: ``/proc/self`` on Linux, ``getrusage`` elsewhere (its
``ru_maxrss`` is bytes on macOS, KiB on Linux), 0 where neither exists (Windows without psutil).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from edgerope.errors import RuntimeConfigError

MiB = 2**20
GiB = 2**30


def parse_size(text: str | int) -> int:
    """Bytes from "8GiB", "512MiB", "8G" (binary), "8GB" (decimal) or a plain byte count."""
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B?)\s*", str(text).upper())
        if not m:
            raise RuntimeConfigError(
                f"cannot read memory size {text!r}", fix='write it like "8GiB", "512MiB", "8G" or a byte count'
            )
        value, unit = float(m.group(1)), m.group(2) + m.group(3)
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit in ("", "B"):
        n = value
    elif unit.endswith("IB") or len(unit) == 1:
        n = value * 1024 ** powers[unit[0]]
    else:  # KB, MB, GB, TB
        n = value * 1000 ** powers[unit[0]]
    if n < 1:
        raise RuntimeConfigError(f"memory size {text!r} is not positive", fix="give a size above zero")
    return int(n)


def available_memory() -> int:
    """Bytes of memory available to a new allocation without swapping (see the module docstring)."""
    for probe in (_meminfo_available, _psutil_available, _vm_stat_available):
        n = probe()
        if n is not None:
            return n
    raise RuntimeConfigError(
        f"cannot tell how much memory is available on this system ({sys.platform})",
        fix="pass memory_budget (--memory 8GiB), or install psutil",
    )


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return None


def _psutil_available() -> int | None:
    try:
        import psutil  # optional
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _vm_stat_available() -> int | None:
    """macOS: free + inactive + purgeable pages from ``vm_stat`` (what the kernel can hand out without paging)."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_vm_stat(out)


def parse_vm_stat(text: str) -> int | None:
    """Bytes free + inactive + purgeable from ``vm_stat`` output (its first line names the page size)."""
    page = re.search(r"page size of (\d+) bytes", text)
    counts = dict(re.findall(r"^Pages (free|inactive|purgeable):\s+(\d+)\.", text, re.M))
    if not page or "free" not in counts:
        return None
    return int(page.group(1)) * sum(int(v) for v in counts.values())


def process_rss() -> int:
    """This process's resident set size in bytes (0 where the platform does not tell)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError, AttributeError):
        pass
    try:
        import psutil  # optional
    except ImportError:
        return 0
    return int(psutil.Process().memory_info().rss)


def process_peak_rss() -> int:
    """This process image's peak resident set size in bytes (0 where the platform does not tell).

    On Linux it is ``VmHWM`` of this process image: ``ru_maxrss`` would also count the parent's resident memory
    at fork time, so a small run started from a big process would report the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    try:
        import resource  # not on Windows
    except ImportError:
        return 0
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def format_bytes(n: int | float) -> str:
    """Human size: MiB below 1 GiB, else GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
