"""Evaluation: passkey / multi-key / perplexity protocols, reports, PyTorch vs llama.cpp parity,
plots.
"""
