"""The built-in tiny model that ships with edgerope (``models/tiny``): where it is, and that it is intact.

The model is a small Llama pretrained by ``edgerope.recipes.pretrain`` (recipe and loss curve in its
``recipe.json``; rebuild it with ``edgerope pretrain -o DIR``).  The shipped ``recipe.json`` is the one that run
wrote minus its per-step ``losses`` (the 50-step means stay).  The shipped weights were trained on one H200 GPU
(``machine`` in recipe.json; 164 s while three other shapes trained beside it), their initial weights drawn from
the CUDA generator (``pretrain`` now draws them on the CPU for every device).  The same recipe on 2 CPU cores
takes about 45 minutes and gives other bits, and a model whose retrieval far past its window can differ more
than its loss does.  Its files are listed with their sha256 in ``MANIFEST``, so a damaged or half-copied install
is reported, not run.

What it does not do: train, import torch.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

from edgerope.errors import CheckpointError

# package data of edgerope.models (the top-level models/ folder in a checkout, edgerope/models in a wheel); pip
# installs wheels unzipped, so it is a real folder that llama.cpp and torch can open
TINY_DIR = Path(str(resources.files("edgerope.models") / "tiny"))
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(model_dir: str | Path) -> Path:
    """Record every file of ``model_dir`` (but the manifest) with its size and sha256."""
    d = Path(model_dir)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(d.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    path = d / MANIFEST
    path.write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")
    return path


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` if every file its manifest lists is present and unchanged; else ``CheckpointError``."""
    d = Path(model_dir)
    fix = "reinstall edgerope, or rebuild the model with `edgerope pretrain -o DIR` and pass DIR"
    try:
        files = json.loads((d / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"the built-in model's manifest is missing or unreadable ({exc})", where=str(d), fix=fix
        ) from None
    for name, meta in files.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"the built-in model is missing {name}", where=str(d), fix=fix)
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{name} of the built-in model does not match its manifest", where=str(p), fix=fix)
    return d


def tiny_model() -> Path:
    """The checked folder of the built-in tiny model (a Hugging Face checkpoint)."""
    return check_model_dir(TINY_DIR)


def recipe(model_dir: str | Path = TINY_DIR) -> dict:
    """The ``recipe.json`` written by ``edgerope.recipes.pretrain``: settings, loss curve, time, machine."""
    return json.loads((Path(model_dir) / "recipe.json").read_text(encoding="utf-8"))
