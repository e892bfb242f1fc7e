"""The Hugging Face -> GGUF pipeline (installed as ``edgerope.convert``): tensor map, streaming
writer, safetensors reader, vocab, quantize.
"""
