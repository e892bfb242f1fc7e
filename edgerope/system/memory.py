"""Memory sizes and the memory this machine has available: one low-level place for every layer.

``available_memory`` reads ``MemAvailable`` from ``/proc/meminfo`` on Linux; elsewhere (macOS, Windows) it asks
``psutil`` when installed, else ``os.sysconf`` (total physical pages); a clear error when none answers.
"""

from __future__ import annotations

import re
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
    """MemAvailable from /proc/meminfo, in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeConfigError("cannot read MemAvailable from /proc/meminfo", fix="pass memory_budget (--memory)")


def format_bytes(n: int | float) -> str:
    """Human size: MiB below 1 GiB, else GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
