"""Typed errors raised at edgerope's boundaries.

Every error carries three parts so that the CLI (and any caller) can tell the
user *what* is wrong, *where* it was found and *how* to fix it.  The library
never prints or exits; ``edgerope.cli`` turns these into a message and exit
code 2.
"""

from __future__ import annotations


class EdgeropeError(Exception):
    """Base class for all errors edgerope raises on bad input or requests."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  fix:   {self.fix}")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, str | None]:
        return {"error": type(self).__name__, "what": self.what, "where": self.where, "fix": self.fix}


class ConfigError(EdgeropeError):
    """A model config (config.json) is missing fields or holds invalid values."""


class RopeConfigError(ConfigError):
    """A rope scaling config is unknown or malformed."""


class UnsupportedRopeError(EdgeropeError):
    """A rope scaling method cannot be represented faithfully in the target format."""


class CheckpointError(EdgeropeError):
    """A checkpoint (safetensors shards, index) is missing, truncated or inconsistent."""


class TokenizerError(EdgeropeError):
    """A tokenizer cannot be converted to a form llama.cpp reproduces."""


class GGUFError(EdgeropeError):
    """A GGUF file is missing, truncated, corrupt or not a GGUF at all."""


class OutputError(EdgeropeError):
    """An output cannot be written (exists, unwritable, disk full)."""


class RuntimeConfigError(EdgeropeError):
    """A runtime request (context, cache types, backend) cannot be honoured."""


class DocumentError(EdgeropeError):
    """A document cannot be used: missing, empty, binary or not UTF-8 text."""


class DataError(EdgeropeError):
    """Training or evaluation data is missing, empty, malformed or too short."""


class EvalError(EdgeropeError):
    """An evaluation request cannot be built or run (lengths too short, bad settings, no documents)."""


class TrainingError(EdgeropeError):
    """A fine-tuning run cannot start or continue (would not fit, bad resume, inconsistent settings)."""
