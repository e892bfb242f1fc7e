"""The installed package: a wheel built from the project, installed into a fresh virtual environment.

The checkout keeps ``convert/`` and ``models/`` beside ``edgerope/``; the wheel must carry them as
``edgerope.convert`` and ``edgerope.models`` with the built-in model's files.  The wheel is built from a copy of
the tracked sources (nothing written into the checkout), installed with ``--no-deps`` into a new venv whose
dependencies come from this environment's site-packages (a ``.pth`` line: the editable install's finder is not
loaded from there), and used from a folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("edgerope", "convert", "models", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(p, src / name)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
        check=True, capture_output=True, cwd=work,
    )  # fmt: skip
    (wheel,) = dist.glob("edgerope-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "_edgerope_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # numpy, gguf, llama_cpp, ...
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    return {"python": py, "bin": py.parent, "site": site, "wheel": wheel, "cwd": work}


def run(installed: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("EDGEROPE_")}
    return subprocess.run(list(args), capture_output=True, text=True, cwd=installed["cwd"], env=env)


def test_the_wheel_carries_convert_models_and_the_builtin_model(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {"edgerope/convert/export.py", "edgerope/models/llama.py", "edgerope/models/tiny/model.safetensors"} <= names
    assert not any(n.startswith(("convert/", "models/", "tests/", "bench/")) for n in names)
    # every module of the checkout is in the wheel (pyproject lists the packages one by one)
    for folder, prefix in (("edgerope", "edgerope/"), ("convert", "edgerope/convert/"), ("models", "edgerope/models/")):
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).as_posix()
            assert prefix + rel in names, f"{folder}/{rel} is not in the wheel: add its package to pyproject.toml"


def test_console_script_runs_from_the_wheel(installed, tmp_path):
    exe = installed["bin"] / "edgerope"
    r = run(installed, str(exe), "demo", "--help")
    assert r.returncode == 0 and "--trials" in r.stdout, r.stderr
    from helpers.tiny_gguf import write_tiny_gguf

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    r = run(installed, str(exe), "inspect", str(gguf_path))
    assert r.returncode == 0 and "architecture" in r.stdout, r.stderr


def test_builtin_model_loads_converts_and_runs_from_the_wheel(installed):
    code = textwrap.dedent(
        """
        import sys, tempfile
        from pathlib import Path
        import edgerope, edgerope.convert, edgerope.models
        from edgerope.models.builtin import tiny_model
        from edgerope.models.llama import LlamaModel
        from edgerope.convert.export import convert
        from edgerope.runtime.runtime import Runtime
        site = sys.argv[1]
        for m in (edgerope, edgerope.convert, edgerope.models):
            assert m.__file__.startswith(site), m.__file__
        model_dir = tiny_model()
        assert str(model_dir).startswith(site), model_dir
        LlamaModel.from_pretrained(model_dir)
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "tiny.gguf"
            convert(model_dir, out, outtype="q8_0")
            with Runtime.open(out, n_ctx=256, backend="cpu", n_threads=1) as rt:
                print(rt.generate(rt.tokenize("The pass key is 12345. What is the pass key? The pass key is"), 10).text)
        """
    )
    r = run(installed, str(installed["python"]), "-c", code, str(installed["site"]))
    assert r.returncode == 0, r.stderr
    assert "12345" in r.stdout
