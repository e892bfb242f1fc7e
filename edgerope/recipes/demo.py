"""The built-in demo: a model trained on 256 tokens, stretched to 2048, measured in llama.cpp end to end.

From the built-in tiny model (``edgerope.models.builtin``: a small Llama pretrained at context 256 on Python's
documentation text plus passkey-style retrieval samples) ``edgerope.recipes.extend.run_extension`` makes five
variants: no scaling, linear x8 and YaRN x8 by rewriting the GGUF's rope metadata (no training), YaRN x8
fine-tuned at 2048 tokens, and YaRN x8 fine-tuned with PoSE inside the 256-token window.  Each is a Q8_0
GGUF evaluated in llama.cpp with a q8_0 KV cache: passkey accuracy at 256..2048 tokens and perplexity of
held-out documentation.  Then a long document (1,800 tokens, a fact buried in it) is asked about with
``edgerope.apps.ask``, by the unscaled model and by the fine-tuned YaRN model.

What it does not do: print (the CLI does), or claim more than it measures: the tiny model retrieves facts,
it does not understand documents; the numbers show what rope scaling and fine-tuning do to a model's reach.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgerope.recipes.extend import ExtensionReport, Settings, StepFn, demo_variants, run_extension
from edgerope.train.synthetic import heldout_documents

DEMO_SETTINGS = Settings(
    lengths=(256, 512, 1024, 2048),
    depths=(0.0, 0.25, 0.5, 0.75, 1.0),
    trials=4,
    ppl_lengths=(256, 2048),
    ft_steps=300,
)
QUESTION = "What is the pass key?"
FACT = "The pass key is {k}. Remember it. {k} is the pass key."
DOC_KEY = 27181


@dataclass(frozen=True)
class DocAnswer:
    """One model's answer to the long-document question."""

    variant: str
    answer: str
    correct: bool
    document_tokens: int
    prefill_s: float


@dataclass
class DemoReport:
    extension: ExtensionReport
    question: str
    expected: int
    answers: list[DocAnswer]
    plot: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def long_document(
    tokenize: Callable[[str], list[int]], *, n_tokens: int = 1800, key: int = DOC_KEY, depth: float = 0.6
) -> str:
    """Held-out documentation text (never trained on) of about ``n_tokens`` tokens, the fact at ``depth``."""
    text = "\n".join(d.text for d in heldout_documents())
    n_chars = 4 * n_tokens
    while True:
        part = text[:n_chars]
        cut = part.rfind(" ", 0, int(depth * len(part))) + 1
        doc = part[:cut] + FACT.format(k=key) + " " + part[cut:]
        n = len(tokenize(doc))
        if n <= n_tokens:
            return doc
        n_chars = int(n_chars * n_tokens / n * 0.98)


def ask_document(
    gguf: str | Path, variant: str, document: str, *, kv: str, n_ctx: int, allow_extrapolation: bool
) -> DocAnswer:
    from edgerope.apps.ask import ask
    from edgerope.evaluation.protocols import score_answer

    a = ask(
        gguf,
        document,
        QUESTION,
        n_ctx=n_ctx,
        type_k=kv,
        type_v=kv,
        use_cache=False,
        max_tokens=12,
        prompt_format="plain",
        allow_extrapolation=allow_extrapolation,
    )
    return DocAnswer(variant, a.text.strip(), score_answer(a.text, DOC_KEY), a.document_tokens, a.timings.prefill_s)


def run_demo(
    workdir: str | Path,
    *,
    base: str | Path | None = None,
    settings: Settings | None = None,
    plot: str | Path | None = None,
    on_step: StepFn | None = None,
) -> DemoReport:
    """Run the demo in ``workdir`` on ``base`` (default: the built-in tiny model); plot to ``plot`` if given."""
    from edgerope.models.builtin import tiny_model

    t0 = time.perf_counter()
    s = settings or DEMO_SETTINGS
    step = on_step or (lambda _: None)
    ext = run_extension(base or tiny_model(), workdir, variants=demo_variants(8), settings=s, on_step=step)
    from edgerope.train.data import load_tokenizer

    document = long_document(load_tokenizer(ext.base).tokenize)
    n_ctx = max(s.lengths)
    answers = []
    for name in ("no scaling", "yarn x8 + fine-tune"):
        r = ext.result(name)
        step(f"{name}: edgerope ask on a {len(document)}-character document")
        answers.append(
            ask_document(r.gguf, name, document, kv=s.kv, n_ctx=n_ctx, allow_extrapolation=r.context_length < n_ctx)
        )
    plot_path = None
    if plot is not None:
        from edgerope.recipes.extend_report import save_plot

        plot_path = str(save_plot(ext, plot, title=f"{Path(ext.base).name}: trained at {ext.original_context} tokens"))
    return DemoReport(ext, QUESTION, DOC_KEY, answers, plot_path, time.perf_counter() - t0)
