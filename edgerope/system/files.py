"""Output files written atomically: the checks before writing, and the temp name beside the output.

What it does:

* ``check_output`` refuses, with an ``OutputError`` saying what/where/fix, an
  output whose folder is missing or not writable, that is a folder, that
  would overwrite one of the inputs, that exists without ``force``, or that
  would not fit in the free disk space;
* ``check_free_space`` is the disk-space part alone (for in-place rewrites);
* ``partial_path`` names the hidden temp file, in the output's folder, that
  is written, verified and then renamed over the output; ``atomic_output`` does
  that around a block (the one way every output is written: GGUFs, checkpoints,
  cache entries, plots, reports).  The first time a process names one in a
  folder, the leftovers of killed runs there are removed (``clean_stale_partials``:
  only temp files whose process is gone);
* ``special_file_kind`` tells a FIFO, device or socket from a regular file
  without opening it (opening a FIFO blocks; reading ``/dev/zero`` never ends),
  so inputs can be refused by type;
* ``copy_range`` copies file bytes in the kernel where the platform can.

What it does not do: write, verify or rename anything (``edgerope.convert.export``,
``edgerope.convert.quantize`` and ``edgerope.gguf.set_rope`` do, each for its format).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from edgerope.errors import OutputError


def check_free_space(folder: Path, need_bytes: int) -> None:
    """Raise ``OutputError`` unless ``folder``'s file system has ``need_bytes`` free."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OutputError(
            f"not enough disk space: about {need_bytes / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free",
            where=str(folder),
            fix="free space or write elsewhere",
        )


def check_output(
    out: Path,
    *,
    force: bool,
    inputs: Iterable[Path] = (),
    need_bytes: int = 0,
    input_fix: str = "write the output elsewhere",
) -> None:
    """Raise ``OutputError`` unless ``out`` can be written (see the module docstring); ``input_fix`` is the
    advice given when ``out`` is one of ``inputs``."""
    if not out.parent.is_dir():
        raise OutputError("the output folder does not exist", where=str(out.parent), fix="create it first")
    if out.is_dir():
        raise OutputError("the output path is a folder", where=str(out), fix="give a file name ending in .gguf")
    if out.exists() and out.resolve() in {p.resolve() for p in inputs}:
        raise OutputError("the output would overwrite the input", where=str(out), fix=input_fix)
    if out.exists() and not force:
        raise OutputError("the output file already exists", where=str(out), fix="pass --force to overwrite it")
    if not os.access(out.parent, os.W_OK):
        raise OutputError("the output folder is not writable", where=str(out.parent), fix="choose a writable folder")
    check_free_space(out.parent, need_bytes)


TEMP_LOG_ENV = "EDGEROPE_TEMP_LOG"


def track_temp(path: Path) -> Path:
    """Note a temporary output in ``$EDGEROPE_TEMP_LOG`` (set by the ``edgerope`` command's crash guard, which
    removes what a crashed child left behind); returns ``path``."""
    log = os.environ.get(TEMP_LOG_ENV)
    if log:
        try:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"{os.path.abspath(path)}\n")
        except OSError:
            pass
    return path


PARTIAL_SUFFIX = ".partial"
# .<name>.<pid>.<8 hex>[.<tag>].partial, as partial_path writes them (the tag has no dot)
_PARTIAL_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d{1,10})\.[0-9a-f]{8}(?:\.[^./]+)?\.partial$")
_CLEANED: set[str] = set()  # folders swept by this process
_CLEANED_LOCK = threading.Lock()


def partial_path(out: Path, tag: str = "") -> Path:
    """The one way edgerope names a temporary output: hidden, beside ``out`` (same file system, so the final
    rename is atomic), ``.<name>.<pid>.<random>[.<tag>].partial`` (unique per process and call; the pid lets a
    later run tell a dead run's leftovers), and noted for the crash guard (``track_temp``).  The first call for
    a folder removes what killed runs left there (``clean_stale_partials``)."""
    if "." in tag or "/" in tag:
        raise ValueError(f"a partial_path tag is one word without dots, got {tag!r}")
    _clean_once(out.parent)
    token = secrets.token_hex(4)
    return track_temp(out.with_name(f".{out.name}.{os.getpid()}.{token}{'.' + tag if tag else ''}{PARTIAL_SUFFIX}"))


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` exists on this machine (True for one of another user); None when this platform
    cannot tell without side effects (Windows without psutil: ``os.kill`` there terminates the process)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        try:
            import psutil
        except ImportError:
            return None
        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def clean_stale_partials(folder: Path) -> list[Path]:
    """Remove the temp outputs (``partial_path`` names, files or folders) in ``folder`` whose process is no
    longer running: what a run killed by SIGKILL, a power cut or the OOM killer left behind.  Returns what was
    removed.  Temp files of running processes, this one's, and names that are not edgerope's are kept; so is
    everything when liveness cannot be told.  Caveat: the pid is this machine's, so on a folder shared with
    another machine or PID namespace a live writer there looks dead."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL_NAME.match(entry.name)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or pid_alive(pid) is not False:
            continue
        path = Path(entry.path)
        try:
            remove_path(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _clean_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    with _CLEANED_LOCK:
        if key in _CLEANED:
            return
        _CLEANED.add(key)
    clean_stale_partials(folder)


def file_kind(mode: int) -> str:
    """What a ``stat`` mode says a path is, in words ("a regular file", "a folder", "a FIFO (named pipe)", ...)."""
    for test, words in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "a special file"


def special_file_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder ("a FIFO (named pipe)", "a
    character device", ...), else None; decided by ``stat`` (symlinks followed), never by opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return file_kind(mode)


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(out: Path, *, tag: str = "") -> Iterator[Path]:
    """Write ``out`` atomically: yields its temp path (``partial_path``); the block writes (a file or a folder)
    and verifies it; on a normal exit it is renamed over ``out`` (a folder ``out`` is replaced whole), on any
    exception it is removed and ``out`` is untouched."""
    tmp = partial_path(out, tag)
    try:
        yield tmp
        if out.is_dir() and tmp.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        remove_path(tmp)


# errno values that mean "this kernel copy cannot do this pair of files": fall back to the next way
_COPY_UNSUPPORTED = frozenset(
    getattr(errno, name) for name in ("EXDEV", "ENOSYS", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "ENOTSOCK", "EBADF")
    if hasattr(errno, name)
)  # fmt: skip
COPY_CHUNK = 1 << 24  # bytes per buffered read/write


def copy_range(src: int, dst: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes of file ``src`` from ``offset`` to ``dst`` at its current position; returns the
    bytes copied (0 at the end of ``src``).

    Portable: ``os.copy_file_range`` where Python has it (Linux), else ``os.sendfile`` where it can write to a
    regular file (Linux; macOS and the BSDs send only to sockets, ENOTSOCK), else a buffered ``pread``/``write``
    (``lseek``/``read`` where there is no ``pread``: Windows).  A kernel copy that reports it cannot handle these
    files falls through to the next way; real I/O errors are raised.
    """
    count = min(count, 1 << 30)
    kernel_copy = getattr(os, "copy_file_range", None)
    if kernel_copy is not None:
        try:
            return kernel_copy(src, dst, count, offset)
        except OSError as exc:
            if exc.errno not in _COPY_UNSUPPORTED:
                raise
    sendfile = getattr(os, "sendfile", None)
    if sendfile is not None:
        try:
            return sendfile(dst, src, offset, count)
        except OSError as exc:
            if exc.errno not in _COPY_UNSUPPORTED:
                raise
    return _buffered_copy(src, dst, offset, min(count, COPY_CHUNK))


def _buffered_copy(src: int, dst: int, offset: int, count: int) -> int:
    pread = getattr(os, "pread", None)
    if pread is not None:
        data = pread(src, count, offset)
    else:  # Windows: no pread; the source position is not used by callers
        os.lseek(src, offset, os.SEEK_SET)
        data = os.read(src, count)
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(dst, view[done:])
    return len(data)
