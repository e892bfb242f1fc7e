"""edgerope: long-context language models on local hardware with llama.cpp.

Importing the package is cheap: it never imports torch or llama_cpp.  See
ARCHITECTURE.md for the module map.
"""

__version__ = "0.1.0"
