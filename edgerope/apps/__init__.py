"""Applications on the runtime: long-document Q&A (``ask``) and the OpenAI-compatible server."""
