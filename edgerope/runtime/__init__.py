"""llama.cpp at run time: preflight checks, memory plan, KV cache types, CPU weight layout, the
``Runtime`` and the document cache.  ``native`` is the only module that imports ``llama_cpp``.
"""
