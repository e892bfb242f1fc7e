"""GGUF files: safe reading, the streaming header writer, lint, inspect and set-rope."""
