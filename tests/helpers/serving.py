"""Models and servers shared by the apps tests: the tiny random Llama with YaRN x16 as an f32 GGUF, and an
``EdgeropeServer`` run on a thread of the test process."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgerope.apps.server import EdgeropeServer

YARN16 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 256}


def tiny_yarn_gguf(root: Path, tokenizer_dir: Path) -> Path:
    """The tiny random Llama (trained context 256) with YaRN x16 (context 4096), converted to an f32 GGUF."""
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(root / "yarn", tokenizer_dir=tokenizer_dir, rope_parameters=YARN16,
                                max_position_embeddings=4096)  # fmt: skip
    return convert(ckpt, root / "yarn.gguf", outtype="f32").path


def serve_in_thread(server: EdgeropeServer, *, timeout_s: float = 10.0) -> threading.Thread:
    """Run ``server`` on a daemon thread; returns once its supervisor is attached to the event loop."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while server.supervisor._loop is None and time.monotonic() < deadline:  # noqa: SLF001 (no public signal)
        time.sleep(0.01)
    return thread
