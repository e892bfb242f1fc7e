"""Documents for ``edgerope ask``: read only what can be a document, and only as much as can be used.

* ``read_document(path, max_bytes=...)`` refuses, before reading anything, what cannot be a document -- a FIFO, a
  device or anything else that is not a regular file (by type, ``fstat`` on a non-blocking open: ``/dev/zero`` or
  a named pipe never blocks or streams forever) -- and a file larger than ``max_bytes``; then empty, binary (NUL
  bytes) or undecodable files (``check_document``);
* ``document_byte_limit(gguf, ...)`` is the most bytes worth reading for a model: its context times the longest
  token's bytes (``edgerope.runtime.tokenizing.VocabFacts``), capped at ``MAX_DOCUMENT_BYTES``.

What it does not do: tokenize, or decide what to do with a document that does not fit (``edgerope.apps.ask``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edgerope.errors import DocumentError
from edgerope.gguf.reader import GGUFFile
from edgerope.runtime.tokenizing import VocabFacts
from edgerope.system.files import file_kind

MAX_DOCUMENT_BYTES = 256 << 20  # no document is read beyond this, whatever the model


def read_document(path: str | os.PathLike[str], *, max_bytes: int = MAX_DOCUMENT_BYTES) -> str:
    """The text of a UTF-8 document; ``DocumentError`` for a missing file, one that is not a regular file (a FIFO,
    a device, ...), one larger than ``max_bytes`` (refused before reading), or an empty, binary or undecodable
    one."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once instead of waiting
    except OSError as exc:
        raise DocumentError(f"cannot read the document: {exc.strerror or exc}", where=str(p)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DocumentError(
                f"the document is not a regular file ({file_kind(st.st_mode)})",
                where=str(p),
                fix="give a text or markdown file; save piped text to a file first",
            )
        if st.st_size > max_bytes:
            raise DocumentError(
                f"the document has {st.st_size} bytes, more than the {max_bytes} this model's context can hold",
                where=str(p),
                fix="use a shorter document or a part of it, or --truncate to use its beginning",
            )
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise DocumentError(f"cannot read the document: {exc.strerror or exc}", where=str(p)) from exc
    if len(data) > max_bytes:  # it grew while being read
        raise DocumentError(f"the document has more than {max_bytes} bytes", where=str(p), fix="use a shorter document")
    return check_document(data, where=str(p))


def document_byte_limit(f: GGUFFile, *, n_ctx: int | None, truncate: bool) -> int:
    """The most document bytes worth reading for this model: any more need more tokens than the context has
    (``n_ctx``, else the model's context_length).  With ``truncate`` the document's head is used, so the whole
    file may be read, up to ``MAX_DOCUMENT_BYTES``."""
    from edgerope.gguf.hparams import model_hparams

    facts = VocabFacts.from_gguf(f)
    if truncate or facts.min_tokens(1) == 0:
        return MAX_DOCUMENT_BYTES
    context = n_ctx or model_hparams(f).n_ctx_train
    return min(MAX_DOCUMENT_BYTES, context * facts.max_token_bytes)


def check_document(data: bytes | str, *, where: str = "document") -> str:
    """Decode and check a document's content (see ``read_document``)."""
    if isinstance(data, bytes):
        nul = data.find(b"\x00")
        if nul >= 0:
            raise DocumentError(
                f"the document is binary (NUL byte at offset {nul})",
                where=where,
                fix="give a UTF-8 text or markdown file",
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError(
                f"the document is not UTF-8 text (bad byte at offset {exc.start})",
                where=where,
                fix="convert it to UTF-8 text first",
            ) from None
    else:
        text = data
        if "\x00" in text:
            raise DocumentError("the document contains NUL characters", where=where, fix="give plain text")
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DocumentError("the document is empty", where=where, fix="give a document with some text")
    return text
