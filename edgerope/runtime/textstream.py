"""Tokens in, text out, as they are generated: incremental detokenization and stop strings, linear in the answer.

Detokenizing the whole answer again after every token costs O(n) per token, O(n²) per answer.  ``TextStream``
detokenizes a bounded window instead (the approach of vLLM's ``detokenize_incrementally``): the tokens of the
text already emitted last time (``prefix``) and the new ones; the new text is what the window decodes to beyond
what the prefix alone decodes to.  The prefix keeps tokenizer context (SentencePiece drops the leading space
of a text's first token, so a token decoded alone is not its text inside the answer).

* Text is emitted only when it ends in a complete UTF-8 character: a byte-fallback character spans several
  tokens, and until its last byte arrives the window decodes to U+FFFD.  A window that still ends in U+FFFD after
  ``MAX_PENDING`` tokens is emitted as it is (the model produced invalid UTF-8; the text keeps the U+FFFD).
* Stop strings: ``push`` returns only text that no stop string can still cut (the last ``len(longest stop) - 1``
  characters are held back); when a stop string appears, the text is cut before it, ``stopped`` becomes the
  matched string, and nothing more is emitted.  Each step searches only the held-back tail plus the new text.

What it does not do: sample or stop the generation (the caller stops when ``stopped`` is set), or detokenize
special tokens (the ``detokenize`` callable decides; ``Runtime.detokenize`` drops them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

MAX_PENDING = 8  # tokens a window may wait for the rest of a UTF-8 character (one needs at most 4 byte tokens)
REPLACEMENT = "\ufffd"


class TextStream:
    """Feed tokens with ``push(token)``; it returns the newly complete text (possibly ""); ``finish()`` returns
    what was held back.  ``text`` is everything emitted (the answer, cut before a stop string)."""

    def __init__(self, detokenize: Callable[[Sequence[int]], str], *, stops: Sequence[str] = ()) -> None:
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        self._detokenize = detokenize
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._tokens: list[int] = []
        self._prefix = 0  # window start: the tokens of the text emitted last time
        self._read = 0  # tokens up to here have been turned into text
        self._tail = ""  # decoded but not yet emitted (may still be cut by a stop string)
        self._parts: list[str] = []
        self.stopped: str | None = None  # the stop string that ended the text

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, token: int) -> str:
        """Add one generated token; the text that became final (empty while a character or a possible stop
        string is incomplete, and always empty once stopped)."""
        if self.stopped is not None:
            return ""
        self._tokens.append(int(token))
        window = self._tokens[self._prefix :]
        before = self._detokenize(self._tokens[self._prefix : self._read]) if self._read > self._prefix else ""
        now = self._detokenize(window)
        pending = len(self._tokens) - self._read
        if pending < MAX_PENDING and (len(now) <= len(before) or now.endswith(REPLACEMENT)):
            return ""  # nothing new yet, or a character whose last bytes have not arrived
        # (after MAX_PENDING tokens the window moves on whatever they decode to, so it stays bounded)
        new = now[len(before) :] if now.startswith(before) else now  # defensive: a window that re-spells its start
        self._prefix, self._read = self._read, len(self._tokens)
        return self._accept(new)

    def finish(self) -> str:
        """The end of the answer: whatever is still held back (an incomplete character is decoded as it is)."""
        if self.stopped is not None:
            return ""
        rest = ""
        if self._read < len(self._tokens):
            before = self._detokenize(self._tokens[self._prefix : self._read]) if self._read > self._prefix else ""
            now = self._detokenize(self._tokens[self._prefix :])
            rest = now[len(before) :] if now.startswith(before) else now
            self._prefix = self._read = len(self._tokens)
        return self._accept(rest, final=True)

    def _accept(self, new: str, *, final: bool = False) -> str:
        tail = self._tail + new
        if self.stops:
            cut = _first_stop(tail, self.stops)
            if cut is not None:
                index, stop = cut
                self.stopped = stop
                self._tail = ""
                return self._emit(tail[:index])
        keep = 0 if final else min(self._hold, len(tail))
        self._tail = tail[len(tail) - keep :] if keep else ""
        return self._emit(tail[: len(tail) - keep])

    def _emit(self, text: str) -> str:
        if text:
            self._parts.append(text)
        return text


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop) of the earliest stop string in ``text`` (the longest one at equal index), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(s) > len(best[1]))):
            best = (i, s)
    return best
