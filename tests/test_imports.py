"""Import hygiene: converting, inspecting and patching must work without torch or llama_cpp loaded."""

import subprocess
import sys

import pytest

TORCH_FREE = [
    "edgerope",
    "edgerope.rope.scaling",
    "edgerope.rope.ggml",
    "edgerope.models.config",
    "edgerope.gguf.kv",
    "edgerope.convert.export",
    "edgerope.gguf.inspect",
    "edgerope.gguf.set_rope",
    "edgerope.gguf.reader",
    "edgerope.runtime.runtime",
    "edgerope.runtime.preflight",
    "edgerope.convert.quantize",
    "edgerope.runtime.plan",
    "edgerope.runtime.doccache",
    "edgerope.apps.ask",
    "edgerope.apps.chat_template",
    "edgerope.apps.engine",
    "edgerope.apps.server",
    "edgerope.train.data",
    "edgerope.evaluation.protocols",
    "edgerope.cli",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_neither_torch_nor_llama_cpp(module):
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        "bad = [m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_cli_help_lists_commands_without_heavy_imports():
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom edgerope.cli import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\nassert r.exit_code == 0, r.output\n"
        "assert 'convert' in r.output and 'set-rope' in r.output\n"
        "print(','.join(m for m in ('torch', 'llama_cpp', 'gguf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
