"""edgerope: long-context language models on local hardware with llama.cpp.

Importing the package is cheap: it never imports torch or llama_cpp.  See ARCHITECTURE.md for the map of
folders and import layers.

The design card's top level keeps the HF -> GGUF pipeline in ``convert/`` and the model families in
``models/``, beside ``edgerope/``; an installed wheel has them as ``edgerope/convert`` and ``edgerope/models``
(pyproject's package-dir).  In a source checkout (editable install, ``PYTHONPATH=.``) a small finder gives
them the same names, ``edgerope.convert`` and ``edgerope.models``, so code and tests import one way
everywhere.  setuptools' own editable finder maps only top-level packages, hence this.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
_CHECKOUT_PACKAGES = {"edgerope.convert": _HERE.parent / "convert", "edgerope.models": _HERE.parent / "models"}


class _CheckoutFinder:
    """Finds ``edgerope.convert`` / ``edgerope.models`` in a checkout's top-level folders (meta path finder)."""

    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        folder = _CHECKOUT_PACKAGES.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


if not (_HERE / "convert").is_dir() and not any(f is _CheckoutFinder for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFinder)
