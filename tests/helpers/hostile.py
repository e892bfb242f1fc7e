"""The harness of the hostile-input suites (tests/gguf/test_hostile_mutations.py and
tests/convert/test_hostile_folders.py).

* ``Mutant``: a named, generated bad input (its bytes written on demand);
* ``run_bounded``: call a function with a wall-clock limit (SIGALRM), so a hang is a failure, not a stuck suite;
* ``classify``: a call's outcome as "ok", "refused" (an ``EdgeropeError``: the clean refusal) or a defect
  ("hang", or the exception's type and message);
* ``native_survivors``: run llama.cpp on the inputs every check let through, in child processes (a native crash
  kills only the child and names the input that caused it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerope.errors import EdgeropeError

CASE_SECONDS = 5  # one input through every check; the real ones take milliseconds


@dataclass(frozen=True)
class Mutant:
    name: str
    make: Callable[[Path], None]  # writes the bad input at the given path (a file or a folder)


class _Hang(BaseException):
    pass


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def fire(*_: Any) -> None:
        raise _Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def classify(fn: Callable[[], Any], seconds: float = CASE_SECONDS) -> str:
    """ "ok", "refused", "hang", or "<ExceptionType>: message" (a defect) for ``fn()``."""
    try:
        with _alarm(seconds):
            fn()
    except _Hang:
        return "hang"
    except EdgeropeError:
        return "refused"
    except Exception as exc:  # noqa: BLE001 -- every other exception is what the suite looks for
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        return f"{type(exc).__name__}: {str(exc)[:160]} (at {Path(tb.filename).name}:{tb.lineno})"
    return "ok"


def cli_outcome(args: list[str], seconds: float = CASE_SECONDS) -> str:
    """An ``edgerope`` command run in-process (click's runner: no console script, no crash guard): "ok" (exit 0),
    "refused" (exit 2 with an "error:" message), "hang", or what went wrong (a traceback's exception)."""
    from click.testing import CliRunner

    from edgerope.cli import cli

    result: dict[str, Any] = {}

    def run() -> None:
        result["r"] = CliRunner().invoke(cli, args)

    verdict = classify(run, seconds)
    if verdict != "ok":
        return verdict
    r = result["r"]
    if r.exit_code == 0:
        return "ok"
    clean_exit = r.exception is None or isinstance(r.exception, SystemExit)
    said = "error:" in r.output or '"error":' in r.output  # the message, or --json's error object
    if r.exit_code == 2 and clean_exit and said and "Traceback" not in r.output:
        return "refused"
    exc = r.exception
    return f"exit {r.exit_code}: {type(exc).__name__ if exc else ''} {str(exc)[:160] if exc else r.output[-200:]}"


NATIVE_CHILD = r"""
import json, sys
from pathlib import Path
from edgerope.errors import EdgeropeError
from edgerope.runtime.runtime import Runtime
cases, progress = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for i in range(int(sys.argv[3]), len(cases)):
    progress.write_text(str(i))
    try:
        with Runtime.open(cases[i], n_ctx=64, backend="cpu", n_threads=1, memory_budget="2GiB") as rt:
            rt.logits([1, 5, 6, 7])
        print("ran", flush=True)
    except EdgeropeError:
        pass
progress.write_text("done")
"""


def native_survivors(paths: list[Path], *, timeout: float = 120) -> tuple[dict[str, str], int]:
    """Load each GGUF in llama.cpp and evaluate four tokens, in child processes; returns ({path: what happened} for
    every input that killed its child (a signal) or hung it, the number that loaded and ran).  An
    ``EdgeropeError`` is a clean refusal, not listed."""
    bad: dict[str, str] = {}
    ran = 0
    if not paths:
        return bad, ran
    with tempfile.TemporaryDirectory(prefix="edgerope-hostile-") as tmp:
        cases, progress = Path(tmp) / "cases.json", Path(tmp) / "progress"
        cases.write_text(json.dumps([str(p) for p in paths]))
        start = 0
        while start < len(paths):
            env = {**os.environ, "EDGEROPE_NO_GUARD": "1", "EDGEROPE_CPU_REPACK": "auto"}
            cmd = [sys.executable, "-c", NATIVE_CHILD, str(cases), str(progress), str(start)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
                ran += proc.stdout.count("ran\n")
                what = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
                lines = [ln for ln in proc.stderr.splitlines() if "GGML" in ln or "rror" in ln]
                what += (": " + "; ".join(lines[:3])) if lines else ""
            except subprocess.TimeoutExpired as exc:
                ran += (exc.stdout or b"").decode().count("ran\n")
                what = "hang"
            done = progress.read_text() if progress.exists() else str(start)
            if done == "done":
                break
            i = int(done)
            bad[str(paths[i])] = what
            start = i + 1
    return bad, ran
