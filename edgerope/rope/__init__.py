"""The rope contract (numpy only): rope scaling math and the HF config forms, and the function
llama.cpp computes from GGUF keys.
"""
