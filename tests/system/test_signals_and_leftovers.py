"""Stopping and crashing never leaves temporary files for good.

* SIGTERM (and SIGHUP) stop a command like Ctrl-C: the ``finally`` blocks and ``atomic_output`` remove the temp
  files on the way out, the message says so, and the exit code is 128 + the signal.  Before, an unguarded
  command (``EDGEROPE_NO_GUARD=1``, or the library under another supervisor) died by the signal with its
  ``.partial`` file left in the output folder.
* What a run killed by SIGKILL left (``.<name>.<pid>.<token>.partial``) is removed when the next run writes to
  the same folder, but only when that pid is gone: a running process's temp file is never touched.
* Special files are told by ``stat``, never by opening them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.tiny_gguf import write_tiny_gguf

from edgerope.system import files

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and pids")

SLOW_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import click
    from edgerope.cli._common import handle_errors
    from edgerope.system.files import atomic_output

    @click.command()
    @handle_errors
    def main():
        try:
            with atomic_output(Path(os.environ["OUT"])) as tmp:
                tmp.write_text("half of it")
                print(tmp, flush=True)
                time.sleep(60)
        finally:
            print("finally ran", flush=True)

    main()
    """
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def start_writer(tmp_path: Path, *, guarded: bool) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / "result.json"
    env = {**os.environ, "OUT": str(out)}
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    if guarded:  # the edgerope console script's supervisor around the same child
        child = f"[sys.executable, {str(script)!r}]"
        code = f"import sys; from edgerope.cli.guard import run_guarded; sys.exit(run_guarded(['w'], child={child}))"
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, str(script)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.exists() and tmp.parent == tmp_path, tmp
    return proc, tmp


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("guarded", [False, True], ids=["unguarded", "guarded"])
def test_a_stop_signal_is_handled_like_ctrl_c(tmp_path, sig, guarded):
    proc, tmp = start_writer(tmp_path, guarded=guarded)
    time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + getattr(signal, sig), (out, err)
    assert "finally ran" in out
    assert f"stopped by {sig}" in err and "temporary outputs were removed" in err, err
    assert "Traceback" not in err
    assert not tmp.exists() and not (tmp_path / "result.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["writer.py"]


def test_ctrl_c_keeps_its_exit_code(tmp_path):
    proc, tmp = start_writer(tmp_path, guarded=False)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and not tmp.exists()


def test_leftovers_of_dead_runs_are_removed_when_the_folder_is_written_again(tmp_path):
    gone, alive = dead_pid(), os.getppid()
    stale = [
        tmp_path / f".model.gguf.{gone}.0123abcd.partial",
        tmp_path / f".other.gguf.{gone}.89abcdef.f16.partial",  # a tagged one, another output's
    ]
    stale_dir = tmp_path / f".ckpt.{gone}.deadbeef.partial"  # a checkpoint folder being written
    kept = [
        tmp_path / f".model.gguf.{alive}.0123abcd.partial",  # its writer is running
        tmp_path / f".model.gguf.{os.getpid()}.0123abcd.partial",  # ours
        tmp_path / ".model.gguf.partial",  # not edgerope's name
        tmp_path / "model.gguf",
    ]
    for p in stale + kept:
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "weights.bin").write_bytes(b"x")
    src = write_tiny_gguf(tmp_path.parent / f"{tmp_path.name}-src.gguf")
    res = subprocess.run(
        [sys.executable, "-m", "edgerope", "set-rope", str(src), "-o", str(tmp_path / "new.gguf"), "--type", "none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {p.name for p in kept} | {"new.gguf"}, left


def test_cleaning_is_done_once_per_folder_and_spares_the_unknown(tmp_path, monkeypatch):
    gone = dead_pid()
    (tmp_path / f".a.{gone}.0123abcd.partial").write_bytes(b"x")
    files.partial_path(tmp_path / "a")
    assert not (tmp_path / f".a.{gone}.0123abcd.partial").exists()
    (tmp_path / f".b.{gone}.0123abcd.partial").write_bytes(b"x")
    files.partial_path(tmp_path / "b")  # the folder was swept by this process already
    assert (tmp_path / f".b.{gone}.0123abcd.partial").exists()
    monkeypatch.setattr(files, "pid_alive", lambda pid: None)  # a platform that cannot tell: keep everything
    assert files.clean_stale_partials(tmp_path) == []
    monkeypatch.undo()
    assert [p.name for p in files.clean_stale_partials(tmp_path)] == [f".b.{gone}.0123abcd.partial"]


def test_partial_path_tags_are_single_words(tmp_path):
    with pytest.raises(ValueError):
        files.partial_path(tmp_path / "x", "a.b")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_special_files_are_told_without_opening_them(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert files.special_file_kind(fifo) == "a FIFO (named pipe)"  # returns at once: nothing opened it
    assert files.special_file_kind(Path("/dev/null")) == "a character device"
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert files.special_file_kind(tmp_path / "f") is None and files.special_file_kind(tmp_path / "link") is None
    assert files.special_file_kind(tmp_path) is None and files.special_file_kind(tmp_path / "missing") is None
