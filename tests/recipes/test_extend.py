"""The extension experiment and the demo, end to end on the built-in tiny model with tiny settings.

One `edgerope demo` run (2 fine-tuning steps, 2 passkey trials per length) goes through every stage:
set-rope, finetune (full and PoSE, each its own process), convert to Q8_0, llama.cpp evaluation with a q8_0
KV cache, the long-document question, the plot.  The files it leaves are checked for what each variant
must compute.  Quality is measured in bench/bench_quality.py, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from edgerope.cli import cli  # noqa: E402
from edgerope.errors import ConfigError  # noqa: E402
from edgerope.gguf.reader import open_gguf  # noqa: E402
from edgerope.models.config import ModelConfig  # noqa: E402
from edgerope.recipes.extend import Settings, Variant  # noqa: E402
from edgerope.recipes.extend_report import format_table  # noqa: E402

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    work = tmp_path_factory.mktemp("demo")
    plot = work / "demo.png"
    args = ["demo", "--workdir", str(work / "w"), "--plot", str(plot), "--steps", "2", "--trials", "1", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), work, r.output


def test_demo_makes_every_variant_with_the_rope_it_claims(demo_run: tuple[dict, Path, str]) -> None:
    report, work, _ = demo_run
    ext = report["extension"]
    names = [r["name"] for r in ext["results"]]
    assert names == ["no scaling", "linear x8", "yarn x8", "yarn x8 + fine-tune", "yarn x8 + PoSE"]
    for r in ext["results"]:
        kv = open_gguf(r["gguf"]).kv()
        assert kv["general.file_type"] == 7  # MOSTLY_Q8_0
        if r["rope"] == "none":
            assert kv["llama.context_length"] == 256 and "llama.rope.scaling.type" not in kv
            continue
        assert kv["llama.context_length"] == 2048
        assert kv["llama.rope.scaling.type"] == r["rope"] and kv["llama.rope.scaling.factor"] == 8.0
        if r["rope"] == "yarn":  # linear needs no original context (llama.cpp's scale is 1 / factor)
            assert kv["llama.rope.scaling.original_context_length"] == 256
        assert kv.get("llama.rope.scaling.finetuned", False) == (r["tune"] is not None)
        if r["tune"]:
            cfg = ModelConfig.load(r["finetune"]["checkpoint"])
            assert cfg.rope_finetuned and cfg.max_position_embeddings == 2048
            assert r["finetune"]["pose"] == (r["tune"] == "pose")
            assert r["finetune"]["seq_len"] == (256 if r["tune"] == "pose" else 2048)
            assert r["finetune"]["tokens_per_s"] > 0 and r["finetune"]["training_memory_bytes"] > 0


def test_demo_evaluates_every_length_and_answers_the_document(demo_run: tuple[dict, Path, str]) -> None:
    report, work, _ = demo_run
    for r in report["extension"]["results"]:
        assert sorted(int(n) for n in r["passkey_by_length"]) == [256, 512, 1024, 2048]
        assert r["passkey"]["trials"] == 1 and len(r["passkey"]["cells"]) == 4 * 5
        assert set(r["perplexity"]) == {"256", "2048"} and all(p > 1 for p in r["perplexity"].values())
    assert [a["variant"] for a in report["answers"]] == ["no scaling", "yarn x8 + fine-tune"]
    assert all(a["document_tokens"] > 1500 for a in report["answers"])
    assert Path(report["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_the_builtin_model_retrieves_inside_its_trained_context(demo_run: tuple[dict, Path, str]) -> None:
    """The shipped model does what it was trained for: passkey at 256 tokens in llama.cpp (Q8_0, q8_0 KV)."""
    report, _, _ = demo_run
    base = report["extension"]["results"][0]
    assert base["passkey_by_length"]["256"] >= 0.8, base["passkey"]["cells"][:5]


def test_table_has_a_row_per_variant(demo_run: tuple[dict, Path, str]) -> None:
    from edgerope.recipes.extend import ExtensionReport, VariantResult

    report, _, _ = demo_run
    ext = report["extension"]
    results = [VariantResult(**{**r, "passkey_by_length": {int(k): v for k, v in r["passkey_by_length"].items()},
                                "perplexity": {int(k): v for k, v in r["perplexity"].items()}})
               for r in ext["results"]]  # fmt: skip
    table = format_table(ExtensionReport(ext["base"], ext["original_context"], ext["settings"], results))
    lines = table.splitlines()
    assert "pk@2048" in lines[0] and "ppl@2048" in lines[0]
    assert [line.split("  ")[0].strip() for line in lines[1:6]] == [r["name"] for r in ext["results"]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "x", "rope": "dynamic"}, "unknown rope type"),
        ({"name": "x", "rope": "none", "tune": "full"}, "no scaling"),
        ({"name": "x", "rope": "yarn", "factor": 1.0}, "factor > 1"),
        ({"name": "x", "rope": "yarn", "factor": 8, "tune": "lora"}, "unknown fine-tune"),
        ({"name": "x", "rope": "yarn", "factor": 8, "tune": "full", "data": "poems"}, "unknown data recipe"),
        ({"name": "x", "rope": "yarn", "factor": 8, "lora": True}, "LoRA needs a fine-tune"),
    ],
)
def test_bad_variants_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Variant(**kwargs)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="lengths"):
        Settings(lengths=(16,))
    with pytest.raises(ConfigError, match="trials"):
        Settings(trials=0)
    with pytest.raises(ConfigError, match="steps"):
        Settings(pose_steps=0)


def test_pose_trains_on_as_many_tokens_as_the_full_fine_tune() -> None:
    """By default PoSE (2 x 256 tokens a step) sees the full run's tokens: 300 x 2048 -> 1200 steps, x16 -> 2400."""
    s = Settings(ft_steps=300)
    assert s.pose_steps_for(2048, 256) * 2 * 256 == 300 * 2048
    assert s.pose_steps_for(4096, 256) == 2400
    assert Settings(ft_steps=5).pose_steps_for(2048, 256) == 20
    assert Settings(pose_steps=7).pose_steps_for(4096, 256) == 7  # an explicit count wins


def test_kv_comparison_ranks_cache_types_by_disturbance(demo_run: tuple[dict, Path, str]) -> None:
    """On the fine-tuned model, q4_0 moves next-token distributions more than q8_0 (KL vs the f16 cache)."""
    from edgerope.recipes.extend_eval import kv_comparison

    report, _, _ = demo_run
    ft = report["extension"]["results"][3]
    s = Settings(lengths=(512,), depths=(0.5,), trials=2, ppl_lengths=())
    out = kv_comparison(ft["gguf"], s)
    kv = out["kv"]
    assert list(kv) == ["f16", "q8_0", "q4_0"] and "kl_mean" not in kv["f16"]
    assert 0 < kv["q8_0"]["kl_mean"] < kv["q4_0"]["kl_mean"]
    assert kv["q8_0"]["top1_agreement"] >= kv["q4_0"]["top1_agreement"]
    assert all(set(v["passkey_by_length"]) == {512} for v in kv.values())


def test_text_recipe_lora_and_the_independent_format(tmp_path: Path) -> None:
    """README's command in the experiment: one .txt file, the default retrieval mix, LoRA merged when converted;
    both passkey formats measured, and the report says which data each fine-tune used."""
    from edgerope.models.builtin import tiny_model
    from edgerope.recipes.extend import DATA, run_extension
    from edgerope.recipes.extend_eval import INDEPENDENT_NEEDLE, independent_passkey_text
    from edgerope.train.mix import DEFAULT_RETRIEVAL_MIX

    s = Settings(lengths=(256, 512), depths=(0.5,), trials=2, ppl_lengths=(), ft_steps=2, independent=True)
    variants = [Variant("lora text", "yarn", 2, "full", data="text", lora=True)]
    rep = run_extension(tiny_model(), tmp_path, variants=variants, settings=s)
    r = rep.results[0]
    ft = r.finetune
    assert r.data == DATA["text"] and ft["lora"]["rank"] == 16 and ft["data"]["files"] == 1
    rows = ft["data"]["rows"]  # 2 steps of 1 row: the default share of them retrieval rows
    assert ft["data"]["heldout"]["by"] == "chunks" and rows["retrieval"] == round(DEFAULT_RETRIEVAL_MIX * 2) > 0
    assert rows["text"] + rows["retrieval"] == 2
    assert "--lora" in ft["command"] and "--retrieval-mix" not in ft["command"]
    assert (tmp_path / "lora_text" / "adapter_model.safetensors").is_file()
    kv = open_gguf(r.gguf).kv()
    assert kv["llama.context_length"] == 512 and kv["llama.rope.scaling.finetuned"] is True
    assert set(r.independent_by_length) == {256, 512} and r.independent["task"] == "passkey-independent"
    assert all(c["trials"] == 2 for c in r.independent["cells"])
    table = format_table(rep)
    assert "ipk@512" in table and "lora text: " + DATA["text"] in table
    text = independent_passkey_text(12345, depth=0.5, n_chars=400, seed=[0])
    assert INDEPENDENT_NEEDLE.format(k=12345) in text and "\n" not in text and len(text) <= 400 + 250
