"""Typed reading of a Hugging Face ``config.json``: every field checked for its JSON type, problems collected.

``Fields`` wraps the parsed dict; each accessor returns the value of one field (or its default) and, when the
field holds the wrong type, records a problem naming the field and what it holds, and returns a stand-in so
that checking goes on and every problem is reported at once (``ModelConfig.from_hf`` raises one
``ConfigError`` listing them).  Nothing is coerced: ``"4"`` is not a number, ``1.9`` or ``2.0`` is not an
integer, ``"false"`` or ``0`` is not a boolean (transformers' strict config classes refuse them as well).

What it does not do: decide defaults (the caller passes the family's) or check relations between fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Bounds that keep a corrupt config from sizing gigabytes of tensors before anything else notices (llama.cpp's own
# limits: u32 GGUF lengths, int32 token ids; no released model is near these).
MAX_U32 = 2**32 - 1
MAX_CONTEXT = MAX_U32
MAX_VOCAB = 2**31 - 1
MAX_LAYERS = 4096
MAX_HEADS = 65536
MAX_DIM = 1 << 20


class Fields:
    """Typed accessors over one config dict; problems go to ``problems`` as ``"'name' must be ..., got ..."``."""

    def __init__(self, raw: Mapping[str, Any], problems: list[str], *, prefix: str = "") -> None:
        self.raw = raw
        self.problems = problems
        self.prefix = prefix

    def _bad(self, name: str, expected: str, value: Any) -> None:
        self.problems.append(f"'{self.prefix}{name}' must be {expected}, got {value!r}")

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def positive_int(self, name: str, default: Any = _MISSING, *, at_most: int = MAX_U32) -> int:
        """A positive integer up to ``at_most``; missing (or null) takes ``default``, or is a problem when there is
        none."""
        value = self.raw.get(name)
        if value is None and default is not _MISSING:
            return default
        if not _is_int(value) or value <= 0:
            self._bad(name, "a positive integer", value)
            return 1
        if value > at_most:
            self._bad(name, f"a positive integer up to {at_most}", value)
            return 1
        return value

    def optional_positive_int(self, name: str) -> int | None:
        return self.positive_int(name, None) if self.has(name) else None

    def non_negative_int(self, name: str, default: int) -> int:
        value = self.raw.get(name, default)
        if not _is_int(value) or value < 0:
            self._bad(name, "an integer >= 0", value)
            return default
        return value

    def number(self, name: str, default: float, *, positive: bool = True) -> float:
        """A finite number (> 0 when ``positive``); missing or null takes ``default``."""
        value = self.raw.get(name)
        if value is None:
            return default
        if not _is_number(value) or (positive and value <= 0):
            self._bad(name, "a positive number" if positive else "a finite number", value)
            return default
        return float(value)

    def optional_number(self, name: str) -> float | None:
        return self.number(name, 1.0) if self.has(name) else None

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._bad(name, "true or false", value)
            return default
        return value

    def string(self, name: str, default: str | None, *, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            self._bad(name, "a string", value)
            return default
        if choices is not None and value not in choices:
            self.problems.append(f"'{self.prefix}{name}' {value!r} is not supported (supported: {', '.join(choices)})")
            return default
        return value

    def token_id(self, name: str, *, many: bool = False) -> int | list[int] | None:
        """A token id (integer >= 0), a list of them when ``many`` (``eos_token_id``), or null."""
        value = self.raw.get(name)
        if value is None:
            return None
        if many and isinstance(value, list):
            if value and all(_is_int(v) and v >= 0 for v in value):
                return list(value)
        elif _is_int(value) and value >= 0:
            return value
        self._bad(name, "a token id (integer >= 0)" + (" or a list of them" if many else ""), value)
        return None

    def int_list(self, name: str, *, allowed: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(_is_int(v) and (allowed is None or v in allowed) for v in value):
            what = f"a list of {' / '.join(map(str, allowed))}" if allowed else "a list of integers"
            self._bad(name, what, value)
            return None
        return tuple(value)

    def str_list(self, name: str, *, allowed: tuple[str, ...]) -> tuple[str, ...] | None:
        value = self.raw.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v in allowed for v in value):
            self._bad(name, f"a list of {' / '.join(repr(a) for a in allowed)}", value)
            return None
        return tuple(value)

    def mapping(self, name: str) -> Mapping[str, Any]:
        value = self.raw.get(name)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self._bad(name, "an object", value)
            return {}
        return value
