"""Shared pytest fixtures: the project's tiny tokenizer and tiny checkpoints, generated per session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny SentencePiece ``tokenizer.model`` (1,000 pieces, byte fallback)."""
    from edgerope.models.tiny_random import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~60 KB of English text from CPython's own pydoc_data, one document per topic."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("corpus")
    for i, key in enumerate(sorted(topics)[:24]):
        (d / f"{i:02d}.txt").write_text(topics[key], encoding="utf-8")
    return d


@pytest.fixture
def make_tiny(tmp_path: Path, tiny_tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: ``make_tiny(name="llama", **make_tiny_checkpoint_kwargs)`` -> a fresh HF folder under tmp_path."""
    from edgerope.models.tiny_random import make_tiny_checkpoint

    counter = iter(range(1_000_000))

    def factory(name: str | None = None, **kwargs: Any) -> Path:
        kwargs.setdefault("tokenizer_dir", tiny_tokenizer_dir)
        label = name or kwargs.get("model_type", "llama")
        return make_tiny_checkpoint(tmp_path / f"{label}-{next(counter)}", **kwargs)

    return factory


@pytest.fixture(scope="module")
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for a module that compares against it (``usefixtures``)."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)
