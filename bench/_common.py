"""Shared helpers for the benchmark scripts in ``bench/``.

What this module does: describe the machine a benchmark ran on, run a command in a fresh child
process and measure its wall time and peak resident memory, warm the page cache, print a plain-text
table and write the JSON results next to the scripts.

What it does not do: it has no benchmark logic of its own, is not a test, and is never imported by
the ``edgerope`` package.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORK_DIR = BENCH_DIR / ".work"  # scratch data, git-ignored
RESULTS_DIR = BENCH_DIR / "results"

MB = 1_000_000  # MB/s in the tables are decimal megabytes per second


# ----------------------------------------------------------------------------------------------------------------------
# machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _dirty_package_files() -> list[str] | None:
    """Uncommitted changes under edgerope/ at measurement time (numbers then describe the working tree)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "edgerope"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _filesystem(path: Path) -> str | None:
    """Filesystem type holding ``path`` (from /proc/mounts, longest matching mount point)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = str(path.resolve())
    best = ("", None)
    for fields in mounts:
        if len(fields) >= 3 and (target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")):
            if len(fields[1]) > len(best[0]):
                best = (fields[1], fields[2])
    return best[1]


def machine_info() -> dict[str, Any]:
    """Everything needed to say which machine and software produced a number."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "ram_bytes": _mem_total_bytes(),
        "ram_gib": round((_mem_total_bytes() or 0) / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "gguf": _version("gguf"),
        "transformers": _version("transformers"),
        "sentencepiece": _version("sentencepiece"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "edgerope_commit": _git_commit(),
        "edgerope_uncommitted": _dirty_package_files(),
        "work_dir_filesystem": _filesystem(WORK_DIR if WORK_DIR.exists() else BENCH_DIR),
    }


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how busy the (shared) machine was around a measurement."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------------------
# measuring one command


@dataclass(frozen=True)
class Run:
    """One timed run of a command in a fresh child process."""

    wall_s: float
    peak_rss_bytes: int  # ru_maxrss of the child (and any children it waited for), from wait4: the authority
    user_s: float
    sys_s: float
    returncode: int
    # peaks of /proc/<pid>/status sampled every ~20 ms: anonymous memory vs file-backed pages (mmap'd
    # inputs/outputs, clean and reclaimable); the sum's peak can miss a short spike that ru_maxrss catches
    sampled_peak_rss_anon_bytes: int | None = None
    sampled_peak_rss_file_bytes: int | None = None
    fsync_s: float | None = None  # time to fsync the outputs after the child exited (see fsync_tree)

    @property
    def durable_s(self) -> float:
        """Wall time until the output is on disk: the run plus the fsync the bench did after it."""
        return self.wall_s + (self.fsync_s or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "durable_s": self.durable_s}


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; carries the tail of its output."""


def _sample_rss(pid: int, stop: threading.Event, peaks: dict[str, int]) -> None:
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            text = Path(path).read_text()
        except OSError:
            return
        for line in text.splitlines():
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        stop.wait(0.02)


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
) -> Run:
    """Run ``cmd`` once in a new child process; return wall time, peak RSS and CPU times.

    The peak RSS is ``ru_maxrss`` from ``os.wait4`` on that child alone, so runs do not contaminate each
    other the way ``getrusage(RUSAGE_CHILDREN)`` in a long-lived parent would.  A sampler thread also
    records the peak anonymous and file-backed RSS from ``/proc``.  stdout and stderr go to ``log_path``
    (or are discarded); on a non-zero exit the log's tail is raised in ``CommandFailed``.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    peaks: dict[str, int] = {}
    stop = threading.Event()
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=_sample_rss, args=(proc.pid, stop, peaks), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_path:
            log.close()
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path else "(output discarded)"
        raise CommandFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return Run(
        wall_s=wall,
        peak_rss_bytes=int(usage.ru_maxrss) * 1024,  # Linux reports KiB
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        returncode=proc.returncode,
        sampled_peak_rss_anon_bytes=peaks.get("RssAnon"),
        sampled_peak_rss_file_bytes=peaks.get("RssFile"),
    )


def own_peak_rss() -> int:
    """Peak RSS of this (parent) process.  A child's ru_maxrss starts from its parent's RSS at fork time,
    so this is the floor under every child's number; the scripts keep it small (no numpy in the parent)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fsync_tree(path: Path) -> float:
    """fsync every file under ``path`` (or ``path`` itself); return the seconds it took.

    Called right after a child exits, it makes tools that leave their output in the page cache comparable
    with tools that fsync before they exit."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path] if path.exists() else []
    t0 = time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def summarize(runs: Sequence[Run], *, input_bytes: int) -> dict[str, Any]:
    """Medians over the runs (wall, wall + fsync, MB/s), the largest peak RSS, and every run."""
    wall = statistics.median(r.wall_s for r in runs)
    anon = [r.sampled_peak_rss_anon_bytes for r in runs if r.sampled_peak_rss_anon_bytes is not None]
    file = [r.sampled_peak_rss_file_bytes for r in runs if r.sampled_peak_rss_file_bytes is not None]
    return {
        "median_wall_s": wall,
        "min_wall_s": min(r.wall_s for r in runs),
        "max_wall_s": max(r.wall_s for r in runs),
        "median_durable_s": statistics.median(r.durable_s for r in runs),
        "median_mb_per_s": input_bytes / MB / wall,
        "peak_rss_bytes": max(r.peak_rss_bytes for r in runs),
        "median_peak_rss_bytes": int(statistics.median(r.peak_rss_bytes for r in runs)),
        "sampled_peak_rss_anon_bytes": max(anon) if anon else None,
        "sampled_peak_rss_file_bytes": max(file) if file else None,
        "runs": [r.to_json() for r in runs],
    }


def warm_read(paths: Iterable[Path], *, chunk: int = 16 << 20) -> int:
    """Read every file once so later runs find it in the page cache; returns the bytes read."""
    total = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def settle(*paths: Path) -> None:
    """Remove outputs of the previous run and flush dirty pages, so runs start from the same state."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()


def edgerope_command() -> list[str]:
    """How to run the ``edgerope`` CLI as a child: the installed console script if the venv has one,
    otherwise the same entry point through ``python -c``."""
    script = Path(sys.executable).parent / "edgerope"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from edgerope.cli import main; main()"]


def edgerope_env() -> dict[str, str]:
    """Environment for an edgerope child: this checkout first on the import path, no progress bars."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}


_COPY_CODE = """
import shutil, sys, time
from pathlib import Path
dst, srcs, passes = Path(sys.argv[1]), sys.argv[2:], int(__import__("os").environ.get("BENCH_COPY_PASSES", "1"))
dst.mkdir(parents=True, exist_ok=True)
for i in range(passes):
    t0 = time.perf_counter()
    for src in srcs:
        shutil.copyfile(src, dst / Path(src).name)
    print(f"pass {i + 1}: {time.perf_counter() - t0:.4f} s", flush=True)
    if i + 1 < passes:
        for src in srcs:
            (dst / Path(src).name).unlink()
"""


def copy_command(srcs: Sequence[Path], dst_dir: Path) -> list[str]:
    """A child command that copies ``srcs`` into ``dst_dir`` with ``shutil.copyfile`` (sendfile on Linux):
    the floor for any tool that must write the same bytes."""
    return [sys.executable, "-c", _COPY_CODE, str(dst_dir), *(str(s) for s in srcs)]


def page_touch_probe(srcs: Sequence[Path], dst_dir: Path) -> dict[str, Any]:
    """Copy ``srcs`` twice in one child, deleting in between, and time each pass.

    On a VM whose balloon driver reports freed memory back to the host (virtio free page reporting),
    the first pass after a pause touches pages the host must fault in again; the second pass, right
    after the first one freed its page cache, reuses pages the guest still owns.  The difference is a
    per-fresh-page cost that every case in a benchmark pays for the memory it touches.
    """
    time.sleep(3)  # let the page reporting (about 2 s) hand recently freed memory back to the host
    out = subprocess.run(
        copy_command(srcs, dst_dir), env={**os.environ, "BENCH_COPY_PASSES": "2"}, capture_output=True, text=True
    )
    passes = [float(line.split()[2]) for line in out.stdout.splitlines() if line.startswith("pass ")]
    settle(dst_dir)
    return {"first_pass_s": passes[0] if passes else None, "second_pass_s": passes[1] if len(passes) > 1 else None}


# ----------------------------------------------------------------------------------------------------------------------
# output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text); numbers are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        return "| " + " | ".join(out) + " |"

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True))
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def _looks_numeric(s: str) -> bool:
    s = s.strip().rstrip("x%").replace(",", "")
    try:
        float(s)
    except ValueError:
        return s in ("", "-", "n/a")
    return True


def fmt_mib(n: int | float) -> str:
    return f"{n / 2**20:,.0f}"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
