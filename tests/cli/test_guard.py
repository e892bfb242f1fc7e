"""The crash guard of the ``edgerope`` command: a native crash is reported, never a bare signal.

A real segmentation fault (``ctypes.string_at(0)``) in a child is reported with what the child recorded,
and its temporary outputs are removed, on any machine; on an AMX CPU the real llama.cpp crash
(``--cpu-repack on`` with Q8_0 weights) goes through the real ``edgerope ask``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from edgerope.cli import guard

CRASHING_CHILD = textwrap.dedent(
    """
    import ctypes, json, os
    from pathlib import Path
    from edgerope.system.files import partial_path
    from edgerope.runtime.native import note_activity
    out = Path(os.environ["OUT"])
    tmp = partial_path(out)
    tmp.write_bytes(b"half a file")
    note_activity("decoding", model="/models/x.gguf", settings="n_ctx 4096")
    ctypes.string_at(0)  # a real segmentation fault
    """
)


def test_a_segfault_in_the_child_is_reported_and_its_temp_files_removed(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "result.gguf"))
    monkeypatch.delenv(guard.GUARD_ENV, raising=False)
    code = guard.run_guarded(["ask", "x.gguf"], child=[sys.executable, "-c", CRASHING_CHILD])
    err = capfd.readouterr().err
    assert code == guard.EXIT_CRASH
    assert "edgerope ask crashed in native code (SIGSEGV, segmentation fault)" in err
    assert "model: /models/x.gguf" in err and "settings: n_ctx 4096" in err and "while: decoding" in err
    assert "--cpu-repack off" in err and "removed temporary outputs" in err
    assert list(tmp_path.iterdir()) == []  # the half-written temp file is gone


def test_exit_codes_pass_through_and_stopped_is_not_crashed(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(guard.GUARD_ENV, raising=False)
    assert guard.run_guarded([], child=[sys.executable, "-c", "raise SystemExit(2)"]) == 2
    code = guard.run_guarded(
        [], child=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    )
    assert code == 128 + 15
    assert "crashed" not in capfd.readouterr().err


def test_the_console_script_guards_and_keeps_clean_errors(tmp_path):
    """``python -m edgerope`` (what the console script runs): bad input still exits 2 with a message."""
    env = {k: v for k, v in os.environ.items() if k not in (guard.GUARD_ENV, guard.NO_GUARD_ENV)}
    r = subprocess.run(
        [sys.executable, "-m", "edgerope", "inspect", str(tmp_path / "absent.gguf")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.llama
def test_the_real_amx_crash_is_reported(tmp_path):
    """Where llama.cpp offers AMX, ``--cpu-repack on`` is its own default and crashes on Q8_0 weights."""
    from edgerope.runtime import native

    if "AMX" not in native.cpu_backend()[0]:
        pytest.skip("this CPU/llama.cpp build has no AMX buffer type: the crash cannot happen here")
    from helpers.tiny_gguf import write_tiny_gguf

    from edgerope.convert.quantize import quantize

    src = write_tiny_gguf(tmp_path / "f32.gguf", hidden=256, n_head=4, n_head_kv=2, ffn=512)
    model = quantize(src, tmp_path / "q8.gguf", qtype="Q8_0", n_threads=1).path
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 4711. " * 3)
    env = {k: v for k, v in os.environ.items() if k not in (guard.GUARD_ENV, guard.NO_GUARD_ENV)}
    base = [sys.executable, "-m", "edgerope", "ask", str(model), "--doc", str(doc), "-q", "key?", "--no-cache"]
    r = subprocess.run([*base, "--cpu-repack", "on"], capture_output=True, text=True, env=env)
    assert r.returncode == guard.EXIT_CRASH, r.stderr
    assert "crashed in native code (SIGSEGV" in r.stderr and str(model) in r.stderr
    assert "AMX_INT8 = 1" in r.stderr and "cpu_repack: on" in r.stderr
    r = subprocess.run([*base, "--json"], capture_output=True, text=True, env=env)  # auto: the same request runs
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cpu_repack"]["avoided"] == ["AMX"]
