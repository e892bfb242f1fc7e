"""The crash guard: the ``edgerope`` command runs its work in a child process and reports a native crash.

llama.cpp aborts the process on some inputs and has crash bugs of its own (docs/llama_cpp.md, "Hardware and
build facts"); a process killed by a signal cannot print anything.  So ``edgerope`` (the console script)
re-runs itself as a child with the same arguments and standard streams, and waits:

* the child's exit code is passed on unchanged (0, 2 for bad input, 130 for Ctrl-C, ...);
* when the child dies by a signal (SIGSEGV, SIGABRT, SIGBUS, SIGILL, SIGFPE, SIGKILL), the parent prints
  what crashed: the command, the model and settings the child recorded just before its last native call
  (``edgerope.runtime.native.note_activity``), the llama.cpp build's CPU/GPU features, the Python stack at the
  crash (``faulthandler``), and what to try; temporary outputs the child had open are removed (their
  names are recorded as they are created, ``edgerope.system.files``); exit code 70 (EX_SOFTWARE).

The parent imports nothing heavy and forwards SIGTERM/SIGHUP to the child; Ctrl-C reaches both through the
terminal, so the parent ignores SIGINT and lets the child clean up and exit with its own code.  Set
``EDGEROPE_NO_GUARD=1`` to run in one process (debuggers, profilers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

GUARD_ENV = "EDGEROPE_GUARDED"  # set in the child: do not guard again
NO_GUARD_ENV = "EDGEROPE_NO_GUARD"
RECORD_ENV = "EDGEROPE_CRASH_RECORD"  # the child's activity record (edgerope.runtime.native.note_activity)
TRACE_ENV = "EDGEROPE_CRASH_TRACE"  # where the child's faulthandler writes its stack
TEMPS_ENV = "EDGEROPE_TEMP_LOG"  # temporary outputs the child created (edgerope.system.files)
EXIT_CRASH = 70
UNGUARDED = frozenset({"-h", "--help", "--version"})


CRASH_SIGNALS = frozenset(
    getattr(signal, n) for n in ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE", "SIGKILL", "SIGTRAP", "SIGSYS")
    if hasattr(signal, n)
)  # fmt: skip


def should_guard(argv: list[str]) -> bool:
    """Guard every command except help and version (instant, no native code) and an already guarded child."""
    if os.environ.get(GUARD_ENV) or os.environ.get(NO_GUARD_ENV) or sys.platform == "win32":
        return False
    return bool(argv) and not set(argv) & UNGUARDED


def enable_in_child() -> None:
    """In the guarded child: write the Python stack to the trace file if the process dies by a signal."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    import faulthandler

    try:
        fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 -- stays open for the process's life
    except OSError:
        return
    faulthandler.enable(file=fh, all_threads=True)  # the crash is often in a llama.cpp worker thread
    enable_in_child.file = fh  # type: ignore[attr-defined]  # keep it referenced


def run_guarded(argv: list[str], *, child: list[str] | None = None) -> int:
    """Run ``python -m edgerope argv`` (or the command ``child``) as a child; return its exit code, or report a
    crash and return 70."""
    with tempfile.TemporaryDirectory(prefix="edgerope-guard-") as tmp:
        record, trace, temps = (Path(tmp) / n for n in ("activity.json", "trace.txt", "temps.txt"))
        env = {
            **os.environ,
            GUARD_ENV: "1",
            RECORD_ENV: str(record),
            TRACE_ENV: str(trace),
            TEMPS_ENV: str(temps),
        }
        proc = subprocess.Popen(child or [sys.executable, "-m", "edgerope", *argv], env=env)
        forwarded = _forward_signals(proc)
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except KeyboardInterrupt:  # only if SIGINT was not ignored; keep waiting for the child
                    continue
        finally:
            for sig, old in forwarded.items():
                signal.signal(sig, old)
        if code >= 0:
            return code
        if -code not in CRASH_SIGNALS:  # Ctrl-C, SIGTERM, ...: the child was stopped, not crashed
            removed = _remove_temps(temps)
            sys.stderr.write(
                f"edgerope: stopped by {_signal_name(-code)}"
                + (f"; removed {', '.join(removed)}" if removed else "")
                + "\n"
            )
            return 128 - code
        removed = _remove_temps(temps)
        sys.stderr.write(crash_report(argv, -code, record, trace, removed))
        sys.stderr.flush()
        return EXIT_CRASH


def _forward_signals(proc: subprocess.Popen[bytes]) -> dict[int, object]:
    old: dict[int, object] = {}

    def forward(sig: int, _frame: object) -> None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass

    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            old[sig] = signal.signal(sig, forward)
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal sends it to the child too
    return old


def _remove_temps(temps: Path) -> list[str]:
    removed = []
    try:
        names = temps.read_text(encoding="utf-8").splitlines()
    except OSError:
        return removed
    for name in dict.fromkeys(n for n in names if n):
        p = Path(name)
        try:
            if p.is_dir() and not p.is_symlink():
                import shutil

                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
        except OSError:
            pass
    return removed


def _signal_name(sig: int) -> str:
    try:
        name = signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"
    words = {
        "SIGSEGV": "segmentation fault",
        "SIGABRT": "abort, e.g. a failed GGML_ASSERT",
        "SIGBUS": "bus error",
        "SIGILL": "illegal instruction: llama.cpp's AMX kernels on some builds, or a build for another CPU",
        "SIGFPE": "arithmetic fault",
        "SIGKILL": "killed, often by the out-of-memory killer",
    }
    return f"{name}, {words[name]}" if name in words else name


def crash_report(argv: list[str], sig: int, record: Path, trace: Path, removed: list[str]) -> str:
    """The message for a child that died by signal ``sig``."""
    command = next((a for a in argv if not a.startswith("-")), "edgerope")
    lines = [f"error: edgerope {command} crashed in native code ({_signal_name(sig)})"]
    activity: dict[str, object] = {}
    try:
        activity = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if activity:
        lines.append(f"  while: {activity.get('what')}")
        for key in ("model", "architecture", "settings"):
            if activity.get(key):
                lines.append(f"  {key}: {activity[key]}")
        repack = activity.get("cpu_repack")
        if isinstance(repack, dict):
            lines.append(f"  cpu_repack: {repack.get('policy')} ({repack.get('reason')})")
        if activity.get("llama_cpp_build"):
            lines.append(f"  llama.cpp build: {activity['llama_cpp_build']}")
    else:
        lines.append("  (it crashed before loading any model)")
    stack = _python_stack(trace)
    if stack:
        lines.append("  Python stack at the crash (most recent call first):")
        lines.extend(f"    {line}" for line in stack[:8])
    if removed:
        lines.append(f"  removed temporary outputs: {', '.join(removed)}")
    lines.append("  no output was written by this run")
    lines.append("  try:   " + "; ".join(_suggestions(sig, activity)))
    lines.append("  report it with this message: https://github.com/ggml-org/llama.cpp/issues (upstream crash)")
    return "\n".join(lines) + "\n"


def _python_stack(trace: Path) -> list[str]:
    try:
        text = trace.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith("File ")]


def _suggestions(sig: int, activity: dict[str, object]) -> list[str]:
    tips = []
    repack = activity.get("cpu_repack")
    policy = repack.get("policy") if isinstance(repack, dict) else None
    if policy != "off":
        tips.append("--cpu-repack off (no repacked weight layouts; or EDGEROPE_CPU_REPACK=off)")
    if sig == signal.SIGKILL:
        tips.insert(0, "less memory: a smaller --ctx, a quantized KV cache (--kv q8_0) or --memory")
    tips.append("edgerope inspect MODEL to check the file")
    return tips
