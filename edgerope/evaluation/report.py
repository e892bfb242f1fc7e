"""Run one evaluation task on a model path (HF checkpoint or GGUF) and report it: table, JSON, PNG plot.

What it does:

* ``check_request`` validates a request (task, lengths, depths, trials,
  mode/window/stride) before any model is loaded;
* ``model_context`` reads the trained context of a checkpoint folder
  (``max_position_embeddings``) or a GGUF (``context_length``); lengths beyond
  it are refused unless ``allow_extrapolation``;
* ``open_model`` picks the backend by path (folder -> ``torch_backend``,
  ``.gguf`` file -> ``llama_backend`` with n_ctx and cache types), so both
  run the same backend-neutral functions of ``edgerope.evaluation.protocols``;
* ``run_eval`` runs passkey, multi-key or perplexity (truncated or sliding)
  on one model, and with ``compare`` the same grid on a second model plus the
  agreement of their answers; ``EvalReport`` gives ``to_dict``, ``table`` and
  ``plot``.

What it does not do: print, parse options, or import torch/llama_cpp at module
level (the backends import them when a model is opened).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerope.errors import DataError, EvalError
from edgerope.evaluation import protocols

TASKS = ("passkey", "multikey", "perplexity")
MODES = ("truncated", "sliding")
CTX_ROUND = 256  # llama.cpp pads n_ctx to this anyway
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalRequest:
    """Everything that decides an evaluation's result (recorded in the report)."""

    task: str
    lengths: tuple[int, ...]
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 50
    seed: int = 0
    mode: str = "truncated"
    window: int | None = None
    stride: int | None = None
    max_new_tokens: int = protocols.MAX_NEW_TOKENS
    n_keys: int = 4
    bucket_size: int | None = None  # default: max(lengths) // 8 (at least 16)
    max_docs: int = 16

    @property
    def bucket(self) -> int:
        return self.bucket_size or max(16, max(self.lengths) // 8)

    def context_needed(self) -> int:
        """Tokens one forward pass holds: prompt + answer, the longest truncation, or the window."""
        if self.task == "perplexity":
            return int(self.window) if self.mode == "sliding" else max(self.lengths)
        return max(self.lengths) + self.max_new_tokens


def check_request(req: EvalRequest) -> None:
    """Raise ``EvalError`` for a request that cannot run, before any model is loaded."""
    if req.task not in TASKS:
        raise EvalError(f"unknown task {req.task!r}", fix=f"use one of {', '.join(TASKS)}")
    if not req.lengths or any(n < 1 for n in req.lengths):
        raise EvalError(f"lengths must be positive integers, got {list(req.lengths)}", fix="e.g. --lengths 256,1024")
    if any(b <= a for a, b in zip(req.lengths, req.lengths[1:], strict=False)):
        raise EvalError(f"lengths must be strictly increasing, got {list(req.lengths)}", fix="e.g. 256,1024,2048")
    if req.task == "passkey" and (not req.depths or any(not 0.0 <= d <= 1.0 for d in req.depths)):
        raise EvalError(f"depths must be fractions in [0, 1], got {list(req.depths)}", fix="e.g. 0,0.5,1")
    if req.trials < 1 or req.max_new_tokens < 1 or req.max_docs < 1 or req.n_keys < 1:
        raise EvalError("trials, max_new_tokens, max_docs and n_keys must be >= 1")
    if req.mode not in MODES:
        raise EvalError(f"unknown perplexity mode {req.mode!r}", fix=f"use one of {', '.join(MODES)}")
    if req.task == "perplexity" and req.mode == "sliding":
        if req.window is None or req.stride is None:
            raise EvalError("sliding-window perplexity needs a window and a stride", fix="pass --window and --stride")
        if req.window < 2 or not 1 <= req.stride <= req.window - 1:
            raise EvalError(f"need window >= 2 and 1 <= stride < window, got {req.window}, {req.stride}")


def is_gguf(model: str | Path) -> bool:
    return Path(model).is_file() and Path(model).suffix.lower() == ".gguf"


def model_context(model: str | Path) -> int:
    """The trained context of a checkpoint folder or GGUF file (``EvalError`` for anything else)."""
    p = Path(model)
    if is_gguf(p):
        from edgerope.gguf.hparams import model_hparams
        from edgerope.gguf.reader import open_gguf

        with open_gguf(p) as f:
            return model_hparams(f).n_ctx_train
    if p.is_dir() and (p / "config.json").is_file():
        from edgerope.models.config import ModelConfig

        return ModelConfig.load(p).max_position_embeddings
    raise EvalError(
        "the model is neither a Hugging Face checkpoint folder nor a .gguf file",
        where=str(p),
        fix="give a folder with config.json or a GGUF file",
    )


@dataclass(frozen=True)
class ModelPlan:
    """How one model is opened: backend, n_ctx (GGUF), cache type, and why."""

    path: str
    backend: str  # "torch" or "llama.cpp"
    context_length: int
    n_ctx: int | None
    kv: str | None
    allow_extrapolation: bool
    notes: tuple[str, ...] = ()
    device: str = "cpu"  # PyTorch checkpoints: cpu, cuda, cuda:N or auto


def plan_model(
    model: str | Path,
    req: EvalRequest,
    *,
    n_ctx: int | None = None,
    kv: str | None = None,
    allow_extrapolation: bool = False,
    device: str = "cpu",
) -> ModelPlan:
    """Check the request against the model's context and decide how to open it (nothing is loaded)."""
    ctx = model_context(model)
    longest = int(req.window) if req.task == "perplexity" and req.mode == "sliding" else max(req.lengths)
    what = "window" if req.task == "perplexity" and req.mode == "sliding" else "longest length"
    if longest > ctx and not allow_extrapolation:
        raise EvalError(
            f"the {what} {longest} is beyond the model's context length {ctx}",
            where=str(model),
            fix=f"use lengths <= {ctx}, or pass --allow-extrapolation to measure past the trained context",
        )
    need = req.context_needed()
    notes: list[str] = []
    extrapolate = allow_extrapolation
    if need > ctx and longest <= ctx:
        extrapolate = True
        notes.append(f"the answer tokens run up to position {need}, past the context length {ctx}")
    if not is_gguf(model):
        return ModelPlan(str(model), "torch", ctx, None, None, extrapolate, tuple(notes), device)
    if n_ctx is None:
        n_ctx = math.ceil(need / CTX_ROUND) * CTX_ROUND
        if n_ctx > ctx:  # no rounding past the trained context: only what one pass needs
            n_ctx = max(ctx, need)
    elif n_ctx < need:
        raise EvalError(f"--ctx {n_ctx} is smaller than the {need} tokens one pass needs", fix=f"use --ctx >= {need}")
    if n_ctx > ctx:
        extrapolate = True
    return ModelPlan(str(model), "llama.cpp", ctx, n_ctx, kv or "f16", extrapolate, tuple(notes))


def open_model(plan: ModelPlan, *, n_threads: int | None = None) -> protocols.Backend:
    """The evaluation backend for a planned model (loads it)."""
    if plan.backend == "torch":
        return protocols.torch_backend(plan.path, device=plan.device)
    return protocols.llama_backend(
        plan.path,
        n_ctx=plan.n_ctx,
        type_k=plan.kv,
        type_v=plan.kv,
        allow_extrapolation=plan.allow_extrapolation,
        n_threads=n_threads,
    )


def default_documents() -> list[Any]:
    """CPython's documentation topics (``pydoc_data``, shipped with every Python), one document per topic."""
    from pydoc_data.topics import topics

    from edgerope.train.data import Document

    return [Document(topics[name], f"pydoc_data.topics:{name}") for name in sorted(topics) if topics[name].strip()]


def load_eval_documents(data: str | Path | None) -> tuple[list[Any], str]:
    """The perplexity documents and a description of their source."""
    if data is None:
        return default_documents(), "pydoc_data.topics (CPython documentation, offline)"
    from edgerope.train.data import load_documents

    return load_documents(data), str(data)


def _select_docs(docs: Sequence[Any], tokenize: protocols.TokenizeFn, *, need: int, max_docs: int) -> list[list[int]]:
    """The first ``max_docs`` documents (in order) with at least ``need`` tokens, tokenized with BOS."""
    out = []
    for d in docs:
        ids = tokenize(d.text)
        if len(ids) >= need:
            out.append(ids)
            if len(out) == max_docs:
                break
    if not out:
        raise DataError(
            f"no document has the {need} tokens the longest length needs",
            fix="give longer documents with --data or use shorter lengths",
        )
    return out


@dataclass
class ModelResult:
    """One model's results for a request."""

    plan: ModelPlan
    backend: str
    grid: protocols.GridResult | None = None
    perplexity: dict[int, protocols.Perplexity] | None = None
    n_documents: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.plan.path, "backend": self.plan.backend, "plan": vars(self.plan)}
        out["plan"] = {**out["plan"], "notes": list(self.plan.notes)}
        if self.grid is not None:
            out["grid"] = self.grid.to_dict()
            out["accuracy"] = self.grid.accuracy
            out["by_length"] = {str(k): v for k, v in self.grid.by_length().items()}
        if self.perplexity is not None:
            out["perplexity"] = {str(k): v.to_dict() for k, v in self.perplexity.items()}
            out["n_documents"] = self.n_documents
        out["seconds"] = round(self.seconds, 3)
        return out


def _counted(fn: Callable[..., Any], progress: ProgressFn | None, total: int) -> Callable[..., Any]:
    if progress is None:
        return fn
    done = [0]

    def wrapped(*args: Any) -> Any:
        out = fn(*args)
        done[0] += 1
        progress(done[0], total)
        return out

    return wrapped


def _sliding_windows(n_tokens: int, window: int, stride: int) -> int:
    body = n_tokens - 1
    return 1 if body <= window - 1 else 1 + math.ceil((body - (window - 1)) / stride)


def evaluate_model(
    plan: ModelPlan,
    req: EvalRequest,
    *,
    documents: Sequence[Any] = (),
    n_threads: int | None = None,
    progress: ProgressFn | None = None,
) -> ModelResult:
    """Run ``req`` on one planned model."""
    t0 = time.perf_counter()
    with open_model(plan, n_threads=n_threads) as b:
        res = ModelResult(plan, b.name)
        if req.task == "passkey":
            total = len(req.lengths) * len(req.depths) * req.trials
            gen = _counted(b.generate, progress, total)
            res.grid = protocols.passkey_grid(
                gen, b.tokenize, req.lengths, req.depths, req.trials, req.seed, max_new_tokens=req.max_new_tokens
            )
        elif req.task == "multikey":
            gen = _counted(b.generate, progress, len(req.lengths) * req.trials)
            res.grid = protocols.multikey_grid(
                gen, b.tokenize, req.lengths, req.trials, req.seed, n_keys=req.n_keys, max_new_tokens=req.max_new_tokens
            )
        else:
            docs = _select_docs(documents, b.tokenize, need=max(req.lengths), max_docs=req.max_docs)
            res.n_documents = len(docs)
            if req.mode == "truncated":
                logits = _counted(b.logits, progress, len(docs) * len(req.lengths))
                res.perplexity = protocols.perplexity_sweep(logits, docs, req.lengths, bucket_size=req.bucket)
            else:
                w, s = int(req.window), int(req.stride)
                total = len(docs) * sum(_sliding_windows(n, w, s) for n in req.lengths)
                logits = _counted(b.logits, progress, total)
                if b.bos_id is None:
                    raise EvalError("sliding-window perplexity needs a BOS token; this tokenizer has none")
                res.perplexity = {
                    n: protocols.perplexity_sliding(
                        logits, [d[:n] for d in docs], window=w, stride=s, bos_id=b.bos_id, bucket_size=req.bucket
                    )
                    for n in req.lengths
                }
    res.seconds = time.perf_counter() - t0
    return res


@dataclass
class EvalReport:
    """The request, the data source, each model's results and (with two models) their agreement."""

    request: EvalRequest
    results: list[ModelResult]
    data: str | None = None
    agreement: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        req = vars(self.request) | {"bucket_size": self.request.bucket}
        return {
            "request": {k: list(v) if isinstance(v, tuple) else v for k, v in req.items()},
            "seed": self.request.seed,
            "data": self.data,
            "models": [r.to_dict() for r in self.results],
            "agreement": self.agreement,
            "notes": self.notes,
        }

    def table(self) -> str:
        return format_report(self)

    def plot(self, out: str | Path):
        """Write the task's PNG (passkey heatmap, accuracy by length, perplexity by position); ``PlotInfo``."""
        from edgerope.evaluation import plots

        task = self.request.task
        if task == "passkey":
            panels = [plots.heatmap_data(r.grid, title=_short(r)) for r in self.results]
            title = f"passkey accuracy, {self.request.trials} trials per cell, seed {self.request.seed}"
            return plots.save_heatmaps(out, panels, title=title)
        if task == "multikey":
            lines = [line for r in self.results for line in plots.accuracy_lines(r.grid, label=_short(r))]
            return plots.save_lines(
                out, lines, title="multi-key retrieval", xlabel="prompt length (tokens)", ylabel="accuracy"
            )
        lines = [
            line
            for r in self.results
            for line in plots.perplexity_lines(r.perplexity, label=_short(r) if len(self.results) > 1 else "")
        ]
        return plots.save_lines(
            out,
            lines,
            title=f"perplexity by position ({self.request.mode})",
            xlabel="target position (bucket start)",
            ylabel="perplexity",
        )


def _short(r: ModelResult) -> str:
    return f"{r.plan.backend}: {Path(r.plan.path).name}" + (f" (KV {r.plan.kv})" if r.plan.kv else "")


def run_eval(
    model: str | Path,
    req: EvalRequest,
    *,
    compare: str | Path | None = None,
    data: str | Path | None = None,
    n_ctx: int | None = None,
    kv: str | None = None,
    allow_extrapolation: bool = False,
    n_threads: int | None = None,
    device: str = "cpu",
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> EvalReport:
    """Evaluate ``model`` (and ``compare``, the same grid) on ``req``; ``progress(label)`` may return a
    ``(done, total)`` callback per model.  All checks run before the first model is loaded."""
    check_request(req)
    models = [model] if compare is None else [model, compare]
    if kv is not None and not any(is_gguf(m) for m in models):
        raise EvalError("a KV cache type applies to GGUF models only", fix="drop --kv or give a .gguf model")
    if device not in ("cpu", "auto") and all(is_gguf(m) for m in models):
        raise EvalError(
            "--device applies to PyTorch checkpoints; llama.cpp picks its own backend",
            fix="drop --device (a GPU build of llama-cpp-python offloads by itself)",
        )
    if device != "cpu":
        from edgerope.system.device import pick_device

        pick_device(device)  # an unknown or absent device fails here, before any model is loaded
    plans = [
        plan_model(m, req, n_ctx=n_ctx, kv=kv, allow_extrapolation=allow_extrapolation, device=device) for m in models
    ]
    documents, source = load_eval_documents(data) if req.task == "perplexity" else ([], None)
    report = EvalReport(req, [], source)
    for p in plans:
        report.notes += [f"{p.path}: {n}" for n in p.notes]
        cb = progress(Path(p.path).name) if progress else None
        report.results.append(evaluate_model(p, req, documents=documents, n_threads=n_threads, progress=cb))
    if len(report.results) == 2 and req.task != "perplexity":
        report.agreement = protocols.agreement(report.results[0].grid, report.results[1].grid)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_report(report: EvalReport) -> str:
    """Plain-text tables: passkey accuracy by length x depth (n per cell), multi-key by length, or perplexity
    per length and per position bucket; one block per model, then the agreement."""
    req, blocks = report.request, []
    for r in report.results:
        head = f"{r.backend}  ({r.seconds:.1f}s)"
        if r.plan.n_ctx is not None:
            head += f"  n_ctx {r.plan.n_ctx}, KV {r.plan.kv}"
        rows = [head]
        if req.task == "passkey":
            cells = {(c.length, c.depth): c for c in r.grid.cells}
            rows.append("length  " + "".join(f"{f'd={d:g}':>9}" for d in req.depths) + "      all")
            for n in req.lengths:
                accs = "".join(f"{_pct(cells[(n, float(d))].accuracy):>9}" for d in req.depths)
                rows.append(f"{n:>6}  {accs}{_pct(r.grid.by_length()[n]):>9}")
            rows.append(f"overall {_pct(r.grid.accuracy)} of {r.grid.total} trials ({req.trials} per cell)")
        elif req.task == "multikey":
            rows.append(f"length  accuracy  ({req.trials} trials per length, {req.n_keys} keys)")
            for n, acc in r.grid.by_length().items():
                rows.append(f"{n:>6}  {_pct(acc):>8}")
            rows.append(f"overall {_pct(r.grid.accuracy)} of {r.grid.total} trials")
        else:
            size = req.bucket
            starts = sorted({k for p in r.perplexity.values() for k in p.bucket_nll})
            rows.append(
                f"length  perplexity  tokens  | perplexity by position bucket of {size} ({r.n_documents} documents)"
            )
            rows.append(" " * 31 + "".join(f"{f'@{k}':>9}" for k in starts))
            for n, p in r.perplexity.items():
                buckets = "".join(
                    f"{math.exp(p.bucket_nll[k]):9.2f}" if k in p.bucket_nll else f"{'-':>9}" for k in starts
                )
                rows.append(f"{n:>6}  {p.perplexity:10.3f}  {p.n_tokens:6d}  |  {buckets}")
        blocks.append("\n".join(rows))
    text = "\n\n".join(blocks)
    if report.agreement is not None:
        text += f"\n\nagreement of answers (first integer): {_pct(report.agreement)}"
    text += f"\nseed {req.seed}" + (f"; data: {report.data}" if report.data else "")
    for note in report.notes:
        text += f"\nnote: {note}"
    return text
