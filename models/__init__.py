"""The PyTorch model families and the built-in tiny model (installed as ``edgerope.models``).

Importing this package imports no torch: the model modules do, when imported.
"""
