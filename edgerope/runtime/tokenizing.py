"""Cheap checks before tokenizing, and tokenization linear in the text's length.

* ``VocabFacts.from_gguf`` reads what the checks need from the GGUF's vocab once: the tokenizer type, the
  longest token in bytes, the special tokens' texts, whether BOS/EOS are added.  ``min_tokens(n_bytes)`` is a
  lower bound on the token count of ``n_bytes`` of text: no token covers more bytes than the longest one, so a
  text of ``n_bytes`` needs at least ``ceil(n_bytes / max_token_bytes)`` tokens.  It is computed from the bytes,
  before any tokenization, so a prompt that cannot fit the context is refused without tokenizing it.  Only for
  SentencePiece (``llama``) and byte-level BPE (``gpt2``) vocabs, whose tokenizers do not shrink the text; other
  types get no bound (0).
* ``LinearTokenizer`` tokenizes long texts in chunks.  llama.cpp's SentencePiece tokenizer is quadratic in one
  call when many characters need byte-fallback tokens (CJK text on a Latin vocab): ``resegment`` calls
  ``output.reserve(output.size() + n)`` for each such character, so the output vector is copied once per
  character (``src/llama-vocab.cpp``, ``llm_tokenizer_spm_session::resegment``).  A chunk boundary is placed
  only where the result is provably the same as one call: between two non-whitespace characters that appear
  together in no vocab piece (every merged symbol is a vocab piece, so no merge crosses such a boundary, and
  merges on either side do not interact), with no special token's text within reach.  A later chunk is
  tokenized with the character before the boundary in front of it (the "anchor") and the anchor's own tokens are
  dropped: that keeps SentencePiece's space prefix on the anchor, where it also is in one call.  The anchor's
  tokens are checked on every chunk; a mismatch falls back to one call.  Other vocab types are tokenized in one
  call (llama.cpp's BPE tokenizer has no such copy).

What it does not do: decide how long a prompt may be (the callers compare with their context), or tokenize
anything llama.cpp would not (every token comes from ``Runtime.tokenize``).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edgerope.gguf.reader import GGUFFile

if TYPE_CHECKING:
    from edgerope.runtime.runtime import Runtime

logger = logging.getLogger(__name__)

CHUNK_CHARS = 4096  # a text longer than this is tokenized in chunks of about this many characters
SEARCH_CHARS = 1024  # how far past the chunk size a boundary is looked for
BOUNDED_TYPES = frozenset({"llama", "gpt2"})  # tokenizers that never make a text shorter (min_tokens is valid)
_BYTE, _UNUSED = 6, 5  # GGUF token types (tokenizer.ggml.token_type)
_SPECIAL = frozenset({2, 3, 4})  # unknown, control, user-defined: llama.cpp partitions the text at these


@dataclass(frozen=True)
class VocabFacts:
    """What the cheap checks and the chunked tokenizer need from a GGUF's vocab."""

    model: str  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (BPE), ...
    max_token_bytes: int  # the most text bytes one token stands for (>= 1)
    specials: tuple[str, ...] = ()  # texts of unknown/control/user-defined tokens
    add_eos: bool = False
    pieces: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> VocabFacts:
        from gguf import Keys

        tokens = [str(t) for t in (f.get(Keys.Tokenizer.LIST) or [])]
        types = list(f.get(Keys.Tokenizer.TOKEN_TYPE) or [])
        if len(types) != len(tokens):
            types = [1] * len(tokens)
        longest = 1
        for text, kind in zip(tokens, types, strict=True):
            if int(kind) != _BYTE:  # a byte token "<0xAB>" stands for one byte
                longest = max(longest, len(text.encode("utf-8", "surrogatepass")))
        specials = tuple(sorted({t for t, k in zip(tokens, types, strict=True) if int(k) in _SPECIAL and t}))
        return cls(
            model=str(f.get(Keys.Tokenizer.MODEL) or ""),
            max_token_bytes=longest,
            specials=specials,
            add_eos=bool(f.get(Keys.Tokenizer.ADD_EOS, False)),
            pieces=tuple(t for t, k in zip(tokens, types, strict=True) if int(k) != _BYTE),
        )

    def min_tokens(self, n_bytes: int) -> int:
        """A lower bound on the tokens of a text of ``n_bytes`` UTF-8 bytes (0 where no bound is known)."""
        if self.model not in BOUNDED_TYPES:
            return 0
        return math.ceil(n_bytes / self.max_token_bytes)

    @functools.cached_property
    def _pairs(self) -> frozenset[str]:
        """Every two adjacent characters inside a vocab piece (SentencePiece spells a space as U+2581)."""
        return frozenset(p[i : i + 2] for p in self.pieces for i in range(len(p) - 1))

    @functools.cached_property
    def _special_reach(self) -> int:
        return max((len(s) for s in self.specials), default=0)

    def safe_boundary(self, text: str, i: int) -> bool:
        """True when tokenizing ``text[:i]`` and ``text[i:]`` apart gives the tokens of one call (see the module
        docstring; SentencePiece only)."""
        a, b = text[i - 1], text[i]
        if a.isspace() or b.isspace() or (a + b).replace(" ", "\u2581") in self._pairs:
            return False
        reach = self._special_reach
        if reach:
            window = text[max(0, i - reach) : i + reach]
            if any(s in window for s in self.specials):
                return False
        return True

    def split_points(self, text: str, *, chunk: int = CHUNK_CHARS) -> list[int]:
        """Chunk boundaries for ``text`` (empty: tokenize it in one call)."""
        if self.model != "llama" or len(text) <= chunk:
            return []
        points: list[int] = []
        start, n = 0, len(text)
        while n - start > chunk:
            i = start + chunk
            end = min(n - 1, i + SEARCH_CHARS)
            while i <= end and not self.safe_boundary(text, i):
                i += 1
            if i > end:
                start = end  # none near: look further on (this chunk grows)
                continue
            points.append(i)
            start = i
        return points


class LinearTokenizer:
    """``Runtime.tokenize`` in chunks at safe boundaries (linear in the text), with the same result."""

    def __init__(self, rt: Runtime, facts: VocabFacts, *, chunk: int = CHUNK_CHARS) -> None:
        self.rt = rt
        self.facts = facts
        self.chunk = chunk
        self._anchors: dict[tuple[str, bool], list[int]] = {}

    def min_tokens(self, text: str) -> int:
        return self.facts.min_tokens(len(text.encode("utf-8", "surrogatepass")))

    def __call__(self, text: str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        rt = self.rt
        points = self.facts.split_points(text, chunk=self.chunk)
        if not points or (add_bos is None and self.facts.add_eos):  # an EOS would land after the first chunk
            return rt.tokenize(text, add_bos=add_bos, special=special)
        out = rt.tokenize(text[: points[0]], add_bos=add_bos, special=special)
        for start, end in zip(points, [*points[1:], len(text)], strict=True):
            anchor = self._anchor(text[start - 1], special)
            ids = rt.tokenize(text[start - 1 : end], add_bos=False, special=special)
            if ids[: len(anchor)] != anchor:
                logger.warning("chunked tokenization: anchor %r tokenized differently; using one call", text[start - 1])
                return rt.tokenize(text, add_bos=add_bos, special=special)
            out += ids[len(anchor) :]
        return out

    def _anchor(self, char: str, special: bool) -> list[int]:
        key = (char, special)
        if key not in self._anchors:
            self._anchors[key] = self.rt.tokenize(char, add_bos=False, special=special)
        return self._anchors[key]
