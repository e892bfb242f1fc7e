"""Tokenizers shaped as the families ship them, round-tripped: reference library -> GGUF -> llama.cpp.

Built here, deterministic and small (nothing is downloaded): byte-level BPE ``tokenizer.json`` files with the
pre-tokenizers of Llama 3 (``llama-bpe``), Qwen2/3 (``qwen2``), Phi-4-mini (o200k, ``gpt-4o``) and SmolLM2
(digits + GPT-2, ``smollm``), with their special tokens, BOS post-processor and chat templates; SentencePiece
models shaped like Gemma's (no dummy prefix, user-defined turn markers, pad/eos/bos/unk = 0/1/2/3) and
Phi-3.5-mini's (Llama 2 style, added tokens past the pieces, padded embedding).  References: the
``tokenizers`` and ``sentencepiece`` libraries.  llama.cpp (``Llama(vocab_only=True)``) must produce the same
ids on multilingual text, code and whitespace runs, and decode them back to the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import TokenType

from edgerope.convert.export import convert
from edgerope.convert.vocab import GPT4O_REGEX

llama_cpp = pytest.importorskip("llama_cpp")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.llama

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog; it's 42.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus Köln!",
    "Le renard brun rapide saute par-dessus le chien paresseux. Ça va? Très bien.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "敏捷的棕色狐狸跳过了懒狗。我们明天见。",
    "素早い茶色の狐がのろまな犬を飛び越える。東京は晴れです。",
    "빠른 갈색 여우가 게으른 개를 뛰어넘는다.",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "तेज़ भूरी लोमड़ी आलसी कुत्ते के ऊपर कूदती है।",
    "Γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο.",
    "emoji 🤖🚀🎉 and symbols ∑∫√ ≤ ≥ ≠ €£¥",
]
CODE = [
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    'x = {\'a\': [1, 2, 3], "b": None}\nprint(f"{x!r:>20}")',
]
WHITESPACE = [
    "a  b   c    d     e      f",
    "\t\ttabs\t and\t\t\tmore",
    "lines\n\n\n\nand\r\nwindows\r\n",
    "   leading and trailing   ",
    " " * 16 + "indented",
    "\n",
    "",
]
PROBES = MULTILINGUAL + CODE + WHITESPACE + ["don't we'll they're I'M", "1234567 3.14159 0xFF 2024-05-01"]
CORPUS_REPEAT = 3


def corpus() -> list[str]:
    """Training text: CPython's docs plus the probes' scripts (so merges exist for them too)."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:60] + (MULTILINGUAL + CODE) * CORPUS_REPEAT


def vocab_only(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def small_model(make_tiny, tok_dir: Path, **kw) -> Path:
    hf = make_tiny(tokenizer_dir=tok_dir, hidden_size=64, num_hidden_layers=1, intermediate_size=64, **kw)
    return convert(hf, hf / "m.gguf", outtype="f32").path


def read_kv(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


# --------------------------------------------------------------------------- byte-level BPE tokenizer.json


LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def split_then_bytes(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=True),
        ]
    )


def build_bpe(
    out: Path,
    *,
    pre_tokenizer,
    specials: list[str],
    config: dict,
    bos: str | None = None,
    ignore_merges: bool = False,
    normalizer=None,
) -> Path:
    """A trained byte-level BPE tokenizer.json, specials appended after the learned vocab (as the families
    ship them), a BOS TemplateProcessing post-processor when ``bos``, and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_special_tokens(specials)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "special": True} for s in specials}
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added, **config})
    )
    return out


def check_bpe_round_trip(gguf_path: Path, tok_dir: Path, *, add_bos: bool, chat: str | None = None) -> None:
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    llm = vocab_only(gguf_path)
    try:
        for text in PROBES + ([chat] if chat else []):
            want = ref.encode(text).ids  # BOS from the post-processor where the tokenizer has one
            got = llm.tokenize(text.encode(), add_bos=add_bos, special=True)
            assert got == want, f"{text!r}: llama.cpp {got[:12]}... tokenizers {want[:12]}..."
            body = [t for t in got if t not in set(ref.encode("").ids)]
            assert llm.detokenize(body, special=True) == text.encode(), repr(text)
    finally:
        llm.close()


def test_llama3_style_tokenizer_json_end_to_end(make_tiny, tmp_path):
    """A Llama-3-style tokenizer.json (llama3 split regex, ignore_merges, specials after the vocab, BOS added by
    the post-processor, the Llama 3 chat template) through convert, llama.cpp's tokenizer -- and the model
    itself, Llama 3.2-shaped (llama3 rope, tied embeddings), through llama.cpp at 4x its original context."""
    from tokenizers import Tokenizer

    tok_dir = build_bpe(
        tmp_path / "tok",
        pre_tokenizer=split_then_bytes(LLAMA3_REGEX),
        specials=LLAMA3_SPECIALS,
        bos="<|begin_of_text|>",
        ignore_merges=True,
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE},
    )
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = make_tiny(tokenizer_dir=tok_dir, hidden_size=128, num_hidden_layers=2, intermediate_size=192,
                   tie_word_embeddings=True, rope_parameters=rope, max_position_embeddings=256)  # fmt: skip
    report = convert(hf, hf / "m.gguf", outtype="f32")
    assert report.tokenizer == "bpe (llama-bpe)"
    kv = read_kv(report.path)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["tokenizer.ggml.bos_token_id"] == ref.token_to_id("<|begin_of_text|>")
    assert kv["tokenizer.ggml.eos_token_id"] == ref.token_to_id("<|eot_id|>")
    assert kv["tokenizer.ggml.add_bos_token"] is True  # from the TemplateProcessing post-processor
    assert kv["tokenizer.chat_template"] == LLAMA3_TEMPLATE
    types = kv["tokenizer.ggml.token_type"]
    assert all(types[ref.token_to_id(s)] == TokenType.CONTROL for s in LLAMA3_SPECIALS)
    chat = "<|start_header_id|>user<|end_header_id|>\n\nBonjour, 世界!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    check_bpe_round_trip(report.path, tok_dir, add_bos=True, chat=chat)

    # the model: llama.cpp computes transformers' function with this vocab (token ids from the tokenizer)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = ref.encode(" ".join(PROBES) * 3).ids[:256]
    assert len(ids) == 256 and ids[0] == ref.token_to_id("<|begin_of_text|>")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(report.path), n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, type_k=0,
                          type_v=0, verbose=False)  # fmt: skip
    llm.eval(ids)
    got = np.asarray(llm.scores[:256])
    llm.close()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


@pytest.mark.parametrize(
    "style,pre",
    [("qwen", "qwen2"), ("phi4", "gpt-4o"), ("smollm2", "smollm")],
)
def test_family_bpe_tokenizers_round_trip(make_tiny, tmp_path, style, pre):
    from tokenizers import normalizers, pre_tokenizers

    if style == "qwen":  # Qwen2/Qwen3: no BOS, ChatML, an NFC normalizer llama.cpp does not apply
        tok_dir = build_bpe(
            tmp_path / "tok", pre_tokenizer=split_then_bytes(QWEN2_REGEX), specials=QWEN_SPECIALS,
            normalizer=normalizers.NFC(),
            config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                    "add_bos_token": False, "chat_template": CHATML},
        )  # fmt: skip
        chat = "<|im_start|>user\nWhat is 2+2? 你好<|im_end|>\n<|im_start|>assistant\n"
        add_bos = False
    elif style == "phi4":  # Phi-4-mini: o200k pre-tokenizer, GPT2Tokenizer class
        tok_dir = build_bpe(
            tmp_path / "tok", pre_tokenizer=split_then_bytes(GPT4O_REGEX), specials=["<|endoftext|>", "<|user|>",
            "<|assistant|>", "<|end|>"], config={"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
            "bos_token": "<|endoftext|>", "add_bos_token": False},
        )  # fmt: skip
        chat, add_bos = "<|user|>Hello CamelCase WORLDS isn't<|end|><|assistant|>", False
    else:  # SmolLM2: every digit alone, then GPT-2's byte-level regex
        digits_then_gpt2 = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok_dir = build_bpe(
            tmp_path / "tok", pre_tokenizer=digits_then_gpt2, specials=["<|endoftext|>", "<|im_start|>",
            "<|im_end|>"], config={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False},
        )  # fmt: skip
        chat, add_bos = "<|im_start|>user\nCount 1234567890<|im_end|>\n", False
    path = small_model(make_tiny, tok_dir, name=f"tiny-{style}")
    kv = read_kv(path)
    assert kv["tokenizer.ggml.pre"] == pre and kv["tokenizer.ggml.model"] == "gpt2"
    check_bpe_round_trip(path, tok_dir, add_bos=add_bos, chat=chat)


def test_qwen_nfc_normalizer_is_reported(make_tiny, tmp_path):
    """tokenizers NFC-composes "e" + combining acute; llama.cpp does not normalize: the conversion says so."""
    from tokenizers import Tokenizer, normalizers

    tok_dir = build_bpe(tmp_path / "tok", pre_tokenizer=split_then_bytes(QWEN2_REGEX), specials=QWEN_SPECIALS,
                        normalizer=normalizers.NFC(), config={"add_bos_token": False})  # fmt: skip
    hf = make_tiny(tokenizer_dir=tok_dir, hidden_size=64, num_hidden_layers=1, intermediate_size=64)
    report = convert(hf, hf / "m.gguf", outtype="f32")
    assert any("'NFC' normalizer" in n for n in report.notes)
    ref = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    llm = vocab_only(report.path)
    decomposed = "cafe\u0301"
    assert llm.tokenize(decomposed.encode(), add_bos=False) != ref.encode(decomposed).ids
    assert llm.tokenize("café".encode(), add_bos=False) == ref.encode("café").ids
    llm.close()


# --------------------------------------------------------------------------- SentencePiece tokenizer.model


def train_spm(out: Path, *, add_dummy_prefix: bool, ids: dict[str, int], user_defined: list[str]) -> Path:
    import io

    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for doc in corpus() for line in doc.splitlines() if line.strip()]),
        model_writer=buf, vocab_size=1200, model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        character_coverage=1.0, num_threads=1, user_defined_symbols=user_defined, minloglevel=2, **ids,
    )  # fmt: skip
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return out


def test_gemma_style_sentencepiece(make_tiny, tmp_path):
    """Gemma's tokenizer.model: no dummy prefix, pad/eos/bos/unk = 0/1/2/3, turn markers as user-defined pieces."""
    import sentencepiece as spm

    tok_dir = train_spm(
        tmp_path / "tok", add_dummy_prefix=False, user_defined=["<start_of_turn>", "<end_of_turn>"],
        ids={"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3},
    )  # fmt: skip
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": template}))  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    path = small_model(make_tiny, tok_dir, model_type="gemma3_text", head_dim=32, tie_word_embeddings=True)
    kv = read_kv(path)
    assert kv["general.architecture"] == "gemma3" and kv["tokenizer.ggml.add_space_prefix"] is False
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert kv["tokenizer.chat_template"] == template
    llm = vocab_only(path)
    for text in PROBES + ["<start_of_turn>user\nHallo, wie geht's?<end_of_turn>\n<start_of_turn>model\n"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == [2] + sp.encode(text), repr(text)
        assert llm.detokenize(sp.encode(text), special=True) == text.encode(), repr(text)
    llm.close()


def test_phi35_style_sentencepiece_with_added_tokens(make_tiny, tmp_path):
    """Phi-3.5-mini: a Llama-2 style tokenizer.model, chat tokens added past its pieces (tokenizer_config's
    added_tokens_decoder), the embedding padded past both, and a name llama.cpp recognises as Phi-3."""
    import sentencepiece as spm

    tok_dir = train_spm(tmp_path / "tok", add_dummy_prefix=True, user_defined=[],
                        ids={"unk_id": 0, "bos_id": 1, "eos_id": 2})  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    added = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
    decoder = {str(n + i): {"content": t, "special": True, "rstrip": True} for i, t in enumerate(added)}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "add_bos_token": False,
         "added_tokens_decoder": decoder}))  # fmt: skip
    hf = make_tiny(tokenizer_dir=tok_dir, model_type="phi3", hidden_size=64, num_hidden_layers=1,
                   intermediate_size=64, vocab_size=n + 64)  # fmt: skip
    cfg = json.loads((hf / "config.json").read_text())
    cfg["edgerope"]["name"] = "Phi-3.5-mini-tiny"  # llama.cpp's vocab loader treats it as Phi-3
    (hf / "config.json").write_text(json.dumps(cfg))
    report = convert(hf, hf / "m.gguf", outtype="f32")
    kv = read_kv(report.path)
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == n + 64 and tokens[n : n + 4] == added and types[n + 4] == TokenType.UNUSED
    assert all(types[n + i] == TokenType.CONTROL for i in range(4))
    llm = vocab_only(report.path)  # loads: the Phi-3 name path finds <unk>, <s>, </s>, <|endoftext|>
    for text in PROBES:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text), repr(text)
    assert llm.tokenize(b"<|user|>", add_bos=False, special=True) == [n + 3]
    llm.close()
