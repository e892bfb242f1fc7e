"""edgerope eval: each task on the tiny random checkpoint (PyTorch) and its f32 GGUF (llama.cpp) through the
real CLI; JSON structure and recorded seeds; PNG plots and the data they draw; --compare agreement between the
two backends; bad input exits 2 with no output written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerope.cli import cli

SMALL = ["--lengths", "128,256", "--depths", "0,1", "--trials", "2", "--threads", "1", "--max-new-tokens", "6"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> tuple[Path, Path]:
    from edgerope.convert.export import convert
    from edgerope.models.tiny_random import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("evalcli")
    ckpt = make_tiny_checkpoint(root / "tiny", tokenizer_dir=tiny_tokenizer_dir)
    return ckpt, convert(ckpt, root / "tiny.gguf", outtype="f32").path


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, ["eval", *args])
    return r.exit_code, r.stdout, r.stderr


def _json(*args: str) -> dict:
    code, out, err = _run(*args, "--json")
    assert code == 0, err + out
    return json.loads(out)


@pytest.mark.llama
@pytest.mark.parametrize("which", [0, 1], ids=["torch", "gguf"])
def test_passkey_json_table_and_heatmap(pair, which: int, tmp_path: Path) -> None:
    model = pair[which]
    extra = ["--kv", "f32"] if which else []
    png, js = tmp_path / "pk.png", tmp_path / "pk.json"
    code, out, err = _run(
        str(model), "--task", "passkey", "--seed", "5", *SMALL, *extra, "--plot", str(png), "--json", str(js)
    )
    assert code == 0, err
    assert "length" in out and "d=0" in out and "overall" in out and "of 8 trials (2 per cell)" in out
    d = json.loads(js.read_text())
    assert d["seed"] == 5 and d["request"]["lengths"] == [128, 256] and d["request"]["depths"] == [0.0, 1.0]
    (m,) = d["models"]
    assert m["backend"] == ("llama.cpp" if which else "torch")
    cells = m["grid"]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(128, 0.0), (128, 1.0), (256, 0.0), (256, 1.0)]
    assert all(c["trials"] == 2 and len(c["samples"]) == 2 for c in cells)
    assert [c["seed"] for c in cells] == [[5, 128, 0], [5, 128, 1], [5, 256, 0], [5, 256, 1]]
    assert all(s["n_tokens"] <= c["length"] for c in cells for s in c["samples"])
    assert sum(c["correct"] for c in cells) / 8 == m["accuracy"]
    if which:
        assert m["plan"]["n_ctx"] == 256 + 6 and m["plan"]["kv"] == "f32"
        assert m["plan"]["allow_extrapolation"]  # the answer runs past position 256: said in the notes
        assert any("past the context length 256" in n for n in d["notes"])
    assert d["plot"]["cells"] == 4
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert not list(tmp_path.glob(".*partial"))


def test_heatmap_and_line_data_counts(tmp_path: Path) -> None:
    """What the plots draw: one cell per (length, depth) per model; one line per length (per model)."""
    from edgerope.evaluation import plots
    from edgerope.evaluation.protocols import Perplexity, passkey_grid

    def tok(text: str) -> list[int]:
        return [1] + [ord(c) % 50 + 3 for c in text]

    g = passkey_grid(lambda ids, n: " 1", tok, [400, 500, 600], [0.0, 0.5, 1.0, 0.25], trials=1)
    h = plots.heatmap_data(g, title="t")
    assert h.accuracy.shape == (3, 4) and h.depths == [0.0, 0.25, 0.5, 1.0] and (h.trials == 1).all()
    info = plots.save_heatmaps(tmp_path / "h.png", [h, h], title="two models")
    assert (info.panels, info.cells) == (2, 24) and info.path.read_bytes()[:8] == PNG_MAGIC
    ppl = {n: Perplexity(2.0, 0.69, n, 1, 32, {k: 0.5 for k in range(0, n, 32)}, {}) for n in (64, 128)}
    lines = plots.perplexity_lines(ppl, label="m")
    assert [ln.label for ln in lines] == ["m L=64", "m L=128"] and [len(ln.x) for ln in lines] == [2, 4]
    assert lines[1].y == pytest.approx([1.6487212707] * 4)
    info = plots.save_lines(tmp_path / "l.png", lines, title="t", xlabel="x", ylabel="y")
    assert info.lines == 2 and info.bytes > 5000
    with pytest.raises(plots.OutputError):
        plots.save_lines(tmp_path / "nofolder" / "x.png", lines, title="t", xlabel="x", ylabel="y")


@pytest.mark.llama
def test_compare_torch_and_gguf_agree(pair, tmp_path: Path) -> None:
    ckpt, gguf = pair
    out = tmp_path / "cmp.json"
    png = tmp_path / "cmp.png"
    args = [str(ckpt), "--compare", str(gguf), "--kv", "f32", *SMALL, "--json", str(out), "--plot", str(png)]
    code, text, err = _run(*args)
    assert code == 0, err
    d = json.loads(out.read_text())
    assert d["agreement"] == 1.0 and [m["backend"] for m in d["models"]] == ["torch", "llama.cpp"]
    outs = [[s["output"] for c in m["grid"]["cells"] for s in c["samples"]] for m in d["models"]]
    assert len(outs[0]) == 8 and outs[0] == outs[1]
    assert d["plot"]["cells"] == 8  # two panels of 2 lengths x 2 depths
    assert "agreement of answers (first integer): 100.0%" in text
    code, text, _ = _run(*args)  # outputs exist: refused without --force (the error as JSON, since --json)
    assert code == 2 and "already exists" in json.loads(text)["what"]


@pytest.mark.llama
@pytest.mark.parametrize("which", [0, 1], ids=["torch", "gguf"])
def test_multikey(pair, which: int) -> None:
    args = [
        "--task",
        "multikey",
        "--keys",
        "3",
        "--lengths",
        "192,256",
        "--trials",
        "2",
        "--threads",
        "1",
        "--max-new-tokens",
        "6",
    ]
    d = _json(str(pair[which]), *args)
    cells = d["models"][0]["grid"]["cells"]
    assert [(c["length"], c["depth"], c["trials"]) for c in cells] == [(192, None, 2), (256, None, 2)]
    assert all(len(s["keys"]) == 3 for c in cells for s in c["samples"])


@pytest.mark.llama
def test_perplexity_both_backends_and_modes(pair, tmp_path: Path) -> None:
    ckpt, gguf = pair
    base = ["--task", "perplexity", "--lengths", "64,128", "--max-docs", "2", "--bucket", "32", "--threads", "1"]
    png = tmp_path / "ppl.png"
    code, text, err = _run(str(ckpt), *base, "--compare", str(gguf), "--kv", "f32", "--plot", str(png))
    assert code == 0, err
    assert "perplexity by position bucket of 32 (2 documents)" in text and "pydoc_data" in text
    assert png.read_bytes()[:8] == PNG_MAGIC
    d = _json(str(ckpt), *base, "--compare", str(gguf), "--kv", "f32")
    a, b = (m["perplexity"] for m in d["models"])
    assert sorted(a, key=int) == ["64", "128"] and d["agreement"] is None
    for n in a:
        assert a[n]["perplexity"] == pytest.approx(b[n]["perplexity"], rel=1e-4)
        assert a[n]["n_tokens"] == 2 * (int(n) - 1) and a[n]["n_documents"] == 2
    assert sorted(a["128"]["bucket_nll"], key=int) == ["0", "32", "64", "96"]
    # sliding with a window covering the length equals the truncated pass
    s = _json(str(gguf), *base, "--kv", "f32", "--mode", "sliding", "--window", "128", "--stride", "64")
    assert s["models"][0]["perplexity"]["128"]["perplexity"] == pytest.approx(b["128"]["perplexity"], rel=1e-6)
    short = _json(str(gguf), *base, "--kv", "f32", "--mode", "sliding", "--window", "32", "--stride", "16")
    assert short["models"][0]["perplexity"]["128"]["n_tokens"] == 2 * 127


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope", "--lengths", "128"], "unknown task"),
        (["--lengths", "256,128"], "strictly increasing"),
        (["--lengths", "0,128"], "positive"),
        (["--lengths", "12x"], "comma-separated integers"),
        (["--lengths", "128,512"], "beyond the model's context length 256"),
        (["--lengths", "128", "--depths", "0,2"], "depths"),
        (["--task", "perplexity", "--lengths", "128", "--data", "/nonexistent/x.txt"], "no such file"),
        (["--task", "perplexity", "--lengths", "128", "--mode", "sliding"], "window and a stride"),
        (["--lengths", "128", "--kv", "q8_0"], "GGUF models only"),
        (["--lengths", "128", "--device", "tpu"], "unknown device"),
        (["--lengths", "128", "--device", "meta"], "not supported"),
    ],
)
def test_bad_input_exits_2(pair, args: list[str], message: str, tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    code, out, err = _run(str(pair[0]), *args, "--plot", str(png))
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert not png.exists()


def test_missing_model_and_short_data(pair, tmp_path: Path) -> None:
    code, _, err = _run(str(tmp_path / "none"), "--lengths", "128")
    assert code == 2 and "neither a Hugging Face checkpoint" in err
    doc = tmp_path / "short.txt"
    doc.write_text("a few words only")
    code, _, err = _run(str(pair[0]), "--task", "perplexity", "--lengths", "128", "--data", str(doc))
    assert code == 2 and "no document has the 128 tokens" in err
    code, out, _ = _run(str(pair[0]), "--task", "nope", "--lengths", "128", "--json")
    assert code == 2 and json.loads(out)["what"].startswith("unknown task")


def test_device_checks(pair) -> None:
    import torch

    code, _, err = _run(str(pair[1]), "--lengths", "128", "--device", "cuda")
    assert code == 2 and "applies to PyTorch checkpoints" in err and "Traceback" not in err
    if torch.cuda.is_available():
        code, _, err = _run(str(pair[0]), "--lengths", "128", "--device", f"cuda:{torch.cuda.device_count()}")
        assert code == 2 and "CUDA device(s)" in err
        gpu, cpu = (_json(str(pair[0]), *SMALL, "--device", d)["models"][0] for d in ("cuda", "cpu"))
        assert gpu["plan"]["device"] == "cuda" and cpu["plan"]["device"] == "cpu"
        answers = [[s["output"] for c in m["grid"]["cells"] for s in c["samples"]] for m in (gpu, cpu)]
        assert sum(a == b for a, b in zip(*answers, strict=True)) >= 7  # of 8: a near-tie may flip in float noise
    else:
        code, _, err = _run(str(pair[0]), "--lengths", "128", "--device", "cuda")
        assert code == 2 and "sees no CUDA GPU" in err and "--device cpu" in err


def test_torch_backend_on_cuda_matches_cpu(pair) -> None:
    import numpy as np
    import torch

    from edgerope.evaluation.protocols import torch_backend

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: torch_backend(device='cuda') is checked where there is one")
    with torch_backend(pair[0]) as cpu, torch_backend(pair[0], device="cuda") as gpu:
        ids = cpu.tokenize("The pass key is 31415. Remember it. " * 6)
        np.testing.assert_allclose(gpu.logits(ids), cpu.logits(ids), rtol=1e-3, atol=1e-3)
        assert gpu.generate(ids, 8) == cpu.generate(ids, 8)
