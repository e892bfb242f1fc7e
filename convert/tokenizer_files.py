"""The Hugging Face tokenizer files of a model folder, read with every field's JSON type checked.

``tokenizer_config.json``, ``tokenizer.json``, ``added_tokens.json``, ``special_tokens_map.json`` and
``chat_template.json`` are read once each by ``TokenizerFiles.read``; a file that is not valid UTF-8 JSON,
not an object, or holds a field of the wrong type (an added-token id ``"12.5"``, ``add_bos_token: "yes"``, a
vocab entry that is not an integer id, a merge that is not ``"a b"`` or ``["a", "b"]``) is a
``TokenizerError`` naming the file and the field -- never a traceback from deep inside ``gguf.SpecialVocab``,
and never a silently truncated or skipped value.

What it does not do: build the GGUF vocab (``edgerope.convert.vocab``) or tokenize.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerope.errors import TokenizerError

SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask", "eot", "eom")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json(path: Path, *, kind: type = dict) -> Any:
    """A JSON file's content, which must be a ``kind`` (object by default); ``TokenizerError`` otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path.name} is not valid JSON: {exc}", where=str(path)) from None
    except RecursionError:
        raise TokenizerError(f"{path.name} is nested too deeply to be a tokenizer file", where=str(path)) from None
    except OSError as exc:
        raise TokenizerError(f"cannot read {path.name}: {exc.strerror or exc}", where=str(path)) from None
    if not isinstance(value, kind):
        want = "an object" if kind is dict else f"a {kind.__name__}"
        raise TokenizerError(f"{path.name} must hold {want}, got {type(value).__name__}", where=str(path))
    return value


def _bad(path: Path, field_name: str, expected: str, value: Any) -> TokenizerError:
    shown = repr(value)
    return TokenizerError(
        f"{path.name}: '{field_name}' must be {expected}, got {shown[:120]}",
        where=str(path),
        fix=f"correct '{field_name}' (the file the model was published with has the right form)",
    )


def _check_token_entry(path: Path, name: str, value: Any) -> None:
    """A special-token field: a string, an AddedToken object with a string ``content``, or null."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return
    raise _bad(path, name, 'a string or {"content": "..."}', value)


def _check_chat_template(path: Path, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    ok = isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    )
    if not ok:
        raise _bad(path, "chat_template", 'a string or a list of {"name": ..., "template": ...}', value)


def _check_tokenizer_config(path: Path, cfg: Mapping[str, Any]) -> dict[int, tuple[str, bool]]:
    """Check ``tokenizer_config.json``'s typed fields; its added tokens, id -> (content, special)."""
    for kind in SPECIAL_KINDS:
        _check_token_entry(path, f"{kind}_token", cfg.get(f"{kind}_token"))
        flag = cfg.get(f"add_{kind}_token")
        if flag is not None and not isinstance(flag, bool):
            raise _bad(path, f"add_{kind}_token", "true or false", flag)
    _check_chat_template(path, cfg.get("chat_template"))
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None:
        return {}
    if not isinstance(decoder, Mapping):
        raise _bad(path, "added_tokens_decoder", "an object of token id -> token", decoder)
    out: dict[int, tuple[str, bool]] = {}
    for tid, info in decoder.items():
        if not (isinstance(tid, str) and tid.isdigit() and tid.isascii()):
            raise _bad(path, "added_tokens_decoder", "keyed by decimal token ids", tid)
        where = f"added_tokens_decoder.{tid}"
        if not isinstance(info, Mapping) or not isinstance(info.get("content"), str):
            raise _bad(path, where, 'an object with a string "content"', info)
        special = info.get("special", False)
        if not isinstance(special, bool):
            raise _bad(path, f"{where}.special", "true or false", special)
        out[int(tid)] = (info["content"], special)
    return out


def _check_tokenizer_json(path: Path, tok: Mapping[str, Any]) -> None:
    """Check the parts of ``tokenizer.json`` the converter and ``gguf.SpecialVocab`` read."""
    model = tok.get("model")
    if not isinstance(model, Mapping):
        raise _bad(path, "model", "an object", model)
    vocab = model.get("vocab")
    if vocab is not None:
        if isinstance(vocab, Mapping):
            if bad := next(((k, v) for k, v in vocab.items() if not _is_id(v)), None):
                raise _bad(path, f"model.vocab[{bad[0]!r}]", "a token id (integer >= 0)", bad[1])
        elif model.get("type") == "BPE":
            raise _bad(path, "model.vocab", "an object of token -> id", vocab)
    merges = model.get("merges")
    if merges is not None:
        ok = isinstance(merges, list) and all(
            (isinstance(m, str) and len(m.split(" ")) == 2)
            or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))
            for m in merges
        )
        if not ok:
            raise _bad(
                path,
                "model.merges",
                'a list of "a b" strings or ["a", "b"] pairs',
                merges[:3] if isinstance(merges, list) else merges,
            )
    for flag in ("byte_fallback", "ignore_merges"):
        if model.get(flag) is not None and not isinstance(model.get(flag), bool):
            raise _bad(path, f"model.{flag}", "true or false", model.get(flag))
    added = tok.get("added_tokens")
    if added is not None:
        if not isinstance(added, list):
            raise _bad(path, "added_tokens", "a list", added)
        for i, t in enumerate(added):
            ok = (
                isinstance(t, Mapping)
                and _is_id(t.get("id"))
                and isinstance(t.get("content"), str)
                and isinstance(t.get("special", False), bool)
            )
            if not ok:
                raise _bad(path, f"added_tokens[{i}]", 'an object with an integer "id" and a string "content"', t)
    post = tok.get("post_processor")
    if post is not None and not (
        isinstance(post, Mapping)
        and all(isinstance(p, Mapping) for p in post.get("processors", []) or [])
        and all(
            isinstance(step, Mapping) for p in [post, *(post.get("processors") or [])] for step in p.get("single", [])
        )
    ):
        raise _bad(path, "post_processor", "an object of processor objects", post)
    for name in ("pre_tokenizer", "normalizer"):
        if tok.get(name) is not None and not isinstance(tok.get(name), Mapping):
            raise _bad(path, name, "an object", tok.get(name))


@dataclass
class TokenizerFiles:
    """The tokenizer files of a folder, parsed and type-checked (absent files are empty)."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json
    tokenizer_json: dict[str, Any] | None = None
    added: dict[int, tuple[str, bool]] = field(default_factory=dict)  # id -> (content, special)

    @classmethod
    def read(cls, folder: str | Path) -> TokenizerFiles:
        folder = Path(folder)
        out = cls(folder)
        path = folder / "tokenizer_config.json"
        if path.is_file():
            out.config = read_json(path)
            out.added = _check_tokenizer_config(path, out.config)
        path = folder / "tokenizer.json"
        if path.is_file():
            out.tokenizer_json = read_json(path)
            _check_tokenizer_json(path, out.tokenizer_json)
        path = folder / "added_tokens.json"
        if path.is_file():
            for content, tid in read_json(path).items():
                if not _is_id(tid):
                    raise _bad(path, content, "a token id (integer >= 0)", tid)
                out.added.setdefault(tid, (content, False))
        for name in ("special_tokens_map.json", "chat_template.json"):
            path = folder / name
            if path.is_file():
                data = read_json(path)
                for kind in SPECIAL_KINDS:
                    _check_token_entry(path, f"{kind}_token", data.get(f"{kind}_token"))
                _check_chat_template(path, data.get("chat_template"))
        return out
