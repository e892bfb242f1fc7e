"""bench/gpu_check.py, the prepared GPU check, on a machine without a GPU: it says so and writes a failing result
rather than crashing, and its parsing of llama.cpp's buffer lines reads the formats the vendored llama.cpp prints
(``load_tensors: %12s model buffer size``, ``llama_kv_cache: %10s KV buffer size``, ``sched_reserve: %10s compute
buffer size``).  Its full run needs a GPU; ``--self-test`` (every step on the CPU, ~2 minutes) checks the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_buffer_lines_are_parsed_per_device_and_kind():
    mod = load_script()
    logs = mod.LogLines.__new__(mod.LogLines)
    logs.lines = [
        "load_tensors:        CUDA0 model buffer size =   250.03 MiB",
        "load_tensors:   CPU_Mapped model buffer size =     1.95 MiB",
        "llama_kv_cache:      CUDA0 KV buffer size =    96.00 MiB",
        "sched_reserve:      CUDA0 compute buffer size =    36.50 MiB",
        "sched_reserve:  CUDA_Host compute buffer size =    10.02 MiB",
        "llama_context:  CUDA_Host  output buffer size =     0.01 MiB",
    ]
    assert logs.buffers(0) == {
        "CUDA0 model": 250.03, "CPU_Mapped model": 1.95, "CUDA0 KV": 96.0, "CUDA0 compute": 36.5,
        "CUDA_Host compute": 10.02,
    }  # fmt: skip


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")
def test_without_a_gpu_it_writes_a_failing_result_and_builds_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert res.returncode == 1, res.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and "no NVIDIA GPU" in report["error"] and "build" not in report
