"""Fine-tuning: loss goes down, the output carries its rope, resume is exact, PoSE is flat, DDP matches one process.

References: the output is re-read with ``LlamaModel.from_pretrained`` and converted by ``edgerope.convert.export``
and its GGUF keys read with ``gguf.GGUFReader``; the 2-process run is launched with torch's own launcher
(``python -m torch.distributed.run``) and compared with a single-process run of the same global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers.training import Interrupted, small, stop_at

from edgerope.cli import cli
from edgerope.errors import ConfigError, DataError, OutputError, RopeConfigError, TrainingError
from edgerope.models.config import ModelConfig
from edgerope.models.llama import LlamaModel
from edgerope.rope.scaling import Default, Linear, Yarn, ntk_theta
from edgerope.train.finetune import finetune
from edgerope.train.mix import DEFAULT_RETRIEVAL_MIX
from edgerope.train.recipe import estimate_memory, lr_multiplier

ROOT = Path(__file__).resolve().parents[2]


def test_loss_decreases_and_output_carries_the_rope(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    seen = []
    rep = finetune(ck, tmp_path / "out", data=[corpus], **small(steps=12, eval_every=6, lr=1e-2), progress=seen.append)
    assert [p.step for p in seen] == list(range(1, 13))
    assert all(p.tokens_per_s > 0 and p.eta_s >= 0 for p in seen)
    first, last = np.mean(rep.losses[:3]), np.mean(rep.losses[-3:])
    assert last < first - 0.3, rep.losses
    assert [s for s, _ in rep.heldout_losses] == [6, 12]
    assert rep.peak_memory_bytes > 0 and rep.memory_estimate_bytes > 0

    cfg = ModelConfig.load(tmp_path / "out")
    assert cfg.rope == Yarn(theta=10000.0, factor=2.0, original_max_position_embeddings=256)
    assert cfg.max_position_embeddings == 512 and cfg.rope_finetuned is True
    model = LlamaModel.from_pretrained(tmp_path / "out")
    src = LlamaModel.from_pretrained(ck)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, src.state_dict()[k])]
    assert changed, "the weights did not change"
    assert (tmp_path / "out" / "tokenizer.model").is_file()

    from edgerope.convert.export import convert

    gg = tmp_path / "out.gguf"
    convert(tmp_path / "out", gg, outtype="f32")  # no rope flags: the config carries it
    kv = {k: f.contents() for k, f in gguf.GGUFReader(gg).fields.items()}
    assert kv["llama.rope.scaling.type"] == "yarn"
    assert kv["llama.rope.scaling.factor"] == pytest.approx(2.0)
    assert kv["llama.rope.scaling.original_context_length"] == 256
    assert kv["llama.context_length"] == 512
    assert kv["llama.rope.scaling.finetuned"] is True


@pytest.mark.parametrize(
    ("rope", "want"),
    [("linear", Linear(theta=10000.0, factor=4.0)), ("ntk", Default(theta=ntk_theta(10000.0, 4.0, 64)))],
)
def test_linear_and_ntk_outputs(make_tiny, corpus, tmp_path, rope, want):
    finetune(make_tiny(), tmp_path / "o", data=[corpus], **small(rope=rope, factor=4, steps=1))
    cfg = ModelConfig.load(tmp_path / "o")
    assert cfg.rope == want and cfg.max_position_embeddings == 1024 and cfg.rope_finetuned


def test_resume_is_bit_exact(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    straight = finetune(ck, tmp_path / "a", data=[corpus], **small(grad_accum=2, save_every=3))

    with pytest.raises(Interrupted):
        finetune(ck, tmp_path / "b", data=[corpus], **small(grad_accum=2, save_every=3), progress=stop_at(3))
    assert not (tmp_path / "b" / "config.json").exists()  # no output from an interrupted run
    resumed = finetune(ck, tmp_path / "b", data=[corpus], **small(grad_accum=2, save_every=3), resume=True)
    assert resumed.resumed_from_step == 3
    assert resumed.losses == straight.losses  # bit-exact on CPU fp32
    a, b = (LlamaModel.from_pretrained(tmp_path / p).state_dict() for p in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    with pytest.raises(RuntimeError):
        finetune(ck, tmp_path / "o", data=[corpus], **small(save_every=2), progress=lambda p: _raise(p.step == 2))
    with pytest.raises(TrainingError) as e:
        finetune(ck, tmp_path / "o", data=[corpus], **small(save_every=2, lr=1e-3, batch_size=4), resume=True)
    assert "lr: 0.003 -> 0.001" in e.value.what and "global_batch: 2 -> 4" in e.value.what
    with pytest.raises(OutputError):  # neither resume nor force: the old run is not silently replaced
        finetune(ck, tmp_path / "o", data=[corpus], **small())
    with pytest.raises(TrainingError, match="nothing to resume"):
        finetune(ck, tmp_path / "fresh", data=[corpus], **small(), resume=True)


def _raise(cond: bool) -> None:
    if cond:
        raise RuntimeError("interrupted")


def test_pose_shapes_and_memory_are_flat_in_the_target(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    cfg = ModelConfig.load(ck)
    shapes: dict[int, list] = {}
    for factor in (4, 16):
        seen = shapes.setdefault(factor, [])

        def hook(module, args, output, seen=seen):
            if isinstance(module, LlamaModel) and module.training:
                seen.append((tuple(args[0].shape), tuple(args[1].shape), int(args[1].max())))

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            rep = finetune(
                ck, tmp_path / f"p{factor}", data=[corpus], **small(factor=factor, pose=True, seq_len=None, steps=2)
            )
        finally:
            handle.remove()
        assert rep.seq_len == 256 and rep.target_context == 256 * factor
    assert [s[:2] for s in shapes[4]] == [s[:2] for s in shapes[16]] == [((2, 256), (2, 256))] * 2
    assert max(s[2] for s in shapes[16]) > 1024  # positions reach far past the 4x target's range
    assert all(s[2] < 256 * f for f in shapes for s in shapes[f])
    est = [estimate_memory(cfg.replace(max_position_embeddings=256 * f), batch_size=2, seq_len=256,
                           grad_checkpointing=False) for f in (4, 16)]  # fmt: skip
    assert est[0] == est[1]
    full = estimate_memory(cfg, batch_size=2, seq_len=4096, grad_checkpointing=False)
    assert full > 4 * est[0]


def test_grad_checkpointing_same_result_less_memory(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    a = finetune(ck, tmp_path / "a", data=[corpus], **small(steps=2))
    b = finetune(ck, tmp_path / "b", data=[corpus], **small(steps=2), grad_checkpointing=True)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    assert b.memory_estimate_bytes < a.memory_estimate_bytes


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        (dict(factor=1), RopeConfigError, "must exceed the original"),
        (dict(factor=None, target_context=200), RopeConfigError, "must exceed the original"),
        (dict(factor=4, target_context=2048), RopeConfigError, "inconsistent"),
        (dict(rope="dynamic"), RopeConfigError, "unknown rope type"),
        (dict(rope="keep"), ConfigError, "--factor"),  # small() asks for factor 2
        (dict(rope="keep", factor=None, target_context=512), ConfigError, "--target-context"),
        (dict(memory_limit=1 << 20), TrainingError, "PoSE"),
        (dict(precision="fp8"), ConfigError, "unknown precision"),
        (dict(device="tpu"), ConfigError, "unknown device"),
    ],
)
def test_refusals(make_tiny, corpus, tmp_path, kw, err, match):
    with pytest.raises(err) as e:
        finetune(make_tiny(), tmp_path / "o", data=[corpus], **small(**kw))
    assert match in e.value.message
    assert not (tmp_path / "o").exists()


def test_data_refusals(make_tiny, tmp_path):
    ck = make_tiny()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no training text"):
        finetune(ck, tmp_path / "o", data=[tmp_path / "empty"], **small())
    short = tmp_path / "short"
    short.mkdir()
    for i in range(3):
        (short / f"{i}.txt").write_text("a few words only")
    with pytest.raises(DataError, match="fewer than one sequence"):
        finetune(ck, tmp_path / "o", data=[short], **small(seq_len=256))
    assert not (tmp_path / "o" / "config.json").exists()


def test_already_scaled_checkpoint_is_refused(make_tiny, corpus, tmp_path):
    ck = make_tiny(
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256},
        max_position_embeddings=512,
    )
    with pytest.raises(RopeConfigError, match="already scaled"):
        finetune(ck, tmp_path / "o", data=[corpus], **small(factor=4))
    rep = finetune(ck, tmp_path / "o", data=[corpus], **small(factor=4, steps=1), rescale=True)
    assert rep.original_context == 256 and rep.target_context == 1024


def test_keep_trains_at_the_checkpoints_own_rope(make_tiny, corpus, tmp_path):
    """rope="keep": an already scaled checkpoint trains at its rope, no "already scaled" refusal, and the output
    keeps it; an unscaled one trains at plain rope over its context (tests/models/test_families.py: LongRoPE)."""
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256}
    ck = make_tiny(rope_parameters=yarn, max_position_embeddings=512)
    rep = finetune(ck, tmp_path / "y", data=[corpus], **small(rope="keep", factor=None, seq_len=None, steps=1))
    assert (rep.original_context, rep.target_context, rep.seq_len) == (256, 512, 512)
    before = ModelConfig.load(ck)
    assert ModelConfig.load(tmp_path / "y") == before.replace(rope_finetuned=True)
    with pytest.raises(ConfigError, match="--rescale"):
        finetune(ck, tmp_path / "r", data=[corpus], **small(rope="keep", factor=None), rescale=True)

    plain = make_tiny()
    rep = finetune(plain, tmp_path / "p", data=[corpus], **small(rope="keep", factor=None, seq_len=None, steps=1))
    assert (rep.original_context, rep.target_context, rep.seq_len) == (256, 256, 256)
    after = ModelConfig.load(tmp_path / "p")
    assert after.rope == Default(theta=10000.0) and after.max_position_embeddings == 256 and after.rope_finetuned
    with pytest.raises(ConfigError, match="PoSE trains inside a window shorter"):
        finetune(plain, tmp_path / "q", data=[corpus], **small(rope="keep", factor=None, seq_len=None, pose=True))


def test_keep_rows_default_to_the_context_at_most_32k_and_the_memory_check_holds(make_tiny, corpus, tmp_path):
    long = make_tiny(max_position_embeddings=65536)
    with pytest.raises(TrainingError) as e:
        finetune(long, tmp_path / "o", data=[corpus], **small(rope="keep", factor=None, seq_len=None),
                 memory_limit=1 << 30)  # fmt: skip
    assert "seq_len 32768" in e.value.message and "a shorter --seq-len" in e.value.message
    assert "PoSE" not in e.value.message  # unscaled: no longer context for PoSE to reach
    assert not (tmp_path / "o").exists()


def test_cli_keep_refuses_a_factor(make_tiny, corpus, tmp_path):
    args = ["finetune", str(make_tiny()), "--rope", "keep", "--factor", "2", "--data", str(corpus), "-o", str(tmp_path)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "--factor" in r.output and "Traceback" not in r.output


def test_lr_schedule_warmup_then_decay():
    m = [lr_multiplier(s, steps=100, warmup=10, schedule="cosine") for s in range(100)]
    assert m[0] < m[5] < m[9] < m[10] == 1.0
    assert all(a >= b for a, b in zip(m[10:], m[11:], strict=False)) and m[-1] >= 0.1


def test_cli_json(make_tiny, corpus, tmp_path):
    ck = make_tiny()
    args = ["finetune", str(ck), "--rope", "yarn", "--factor", "2", "--data", str(corpus), "-o", str(tmp_path / "o")]
    args += [
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--seq-len",
        "32",
        "--device",
        "cpu",
        "--json",
        "--retrieval-mix",
        "0",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert len(out["losses"]) == 2 and out["target_context"] == 512
    r = CliRunner().invoke(cli, [*args[:-1], "--factor", "0.5"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = """
import json, sys
from edgerope.train.finetune import finetune
from edgerope.train.mix import DEFAULT_RETRIEVAL_MIX
ck, data, out, bs = sys.argv[1:5]
r = finetune(ck, out, rope="yarn", factor=2, data=[data], steps=3, batch_size=int(bs), grad_accum=2,
             seq_len=128, lr=3e-3, seed=0, device="cpu", pose=True, save_every=2, retrieval_mix=0.5)
if r.world_size == 1 or __import__("os").environ["RANK"] == "0":
    open(out + ".json", "w").write(json.dumps(r.to_dict()))
"""


def test_ddp_two_processes_match_one(make_tiny, corpus, tmp_path):
    """Two ranks x batch 2 x accumulation 2 against one process with the same global batch of 8 rows (PoSE, half
    of them retrieval rows: each rank takes its slice of the same interleaved stream).

    The tolerance is this CPU's float noise for this training, measured, not a number fitted to one machine:
    a second single-process run starts from weights moved by one ulp each (what one rounding difference
    anywhere does), and its distance from the first is the spread rounding alone produces (Adam amplifies
    it where gradients are tiny).  Distances are L2 over all weights.  A wrong all-reduce or data split moves
    weights by the order of the training itself (measured: training 3.2, one ulp 6e-3, DDP 2e-4).
    """
    from safetensors.numpy import load_file, save_file

    ck = make_tiny()
    nudged = tmp_path / "nudged"
    shutil.copytree(ck, nudged)
    weights = load_file(ck / "model.safetensors")
    save_file({k: np.nextafter(v, np.float32(np.inf)) for k, v in weights.items()}, nudged / "model.safetensors")
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, ref = tmp_path / "one", tmp_path / "ref"
    for src, out in ((ck, one), (nudged, ref)):
        subprocess.run([sys.executable, str(script), str(src), str(corpus), str(out), "4"], env=env, check=True)
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1"]
    launch += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    subprocess.run([*launch, str(script), str(ck), str(corpus), str(two), "2"], env=env, check=True, timeout=120)
    r1, rn, r2 = (json.loads(Path(f"{p}.json").read_text()) for p in (one, ref, two))
    assert r2["world_size"] == 2 and r1["world_size"] == rn["world_size"] == 1
    loss_noise = float(np.abs(np.subtract(rn["losses"], r1["losses"])).max())
    np.testing.assert_allclose(r2["losses"], r1["losses"], atol=max(10 * loss_noise, 1e-6), rtol=0)
    w0, a, an, b = (LlamaModel.from_pretrained(p).state_dict() for p in (ck, one, ref, two))

    def dist(x, y):
        return float(sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in x) ** 0.5)

    err, noise, moved = dist(a, b), dist(a, an), dist(a, w0)
    assert noise < 0.01 * moved, f"rounding alone moves the weights by {noise} of {moved}: the check would be vacuous"
    assert err <= 2 * noise, f"DDP differs by {err} (L2); one ulp of the start weights alone moves them by {noise}"


def test_cli_summary_and_stale_temp_checkpoint_ignored(make_tiny, corpus, tmp_path):
    ck, out = make_tiny(), tmp_path / "o"
    args = ["finetune", str(ck), "--factor", "2", "--data", str(corpus), "-o", str(out), "--steps", "3"]
    args += ["--batch-size", "1", "--seq-len", "32", "--device", "cpu", "--save-every", "2", "--retrieval-mix", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "yarn x2 from 256" in r.output and "output:" in r.output
    stale = out / "checkpoints" / ".step-0000003.tmp-999"  # what a crash mid-save leaves behind
    stale.mkdir()
    r = CliRunner().invoke(cli, [*args, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["resumed_from_step"] == 2


def test_bf16_autocast_on_cpu(make_tiny, corpus, tmp_path):
    rep = finetune(make_tiny(), tmp_path / "o", data=[corpus], **small(steps=2, precision="bf16"))
    assert rep.precision == "bf16" and all(np.isfinite(rep.losses))
    assert ModelConfig.load(tmp_path / "o").torch_dtype == "float32"  # master weights stay in the source dtype


def test_whole_documents_trains_without_learning_the_padding(make_tiny, corpus, tmp_path):
    """--whole-documents pads rows instead of cutting documents; the padding is never a target."""
    ck = make_tiny()
    rep = finetune(ck, tmp_path / "w", data=[corpus], **small(steps=8, lr=1e-2), whole_documents=True)
    assert rep.settings["whole_documents"] is True
    assert np.isfinite(rep.losses).all() and np.mean(rep.losses[-3:]) < np.mean(rep.losses[:3])


# ---------------------------------------------------------------------------------------------------- issue 14


@pytest.fixture(scope="module")
def one_file(tmp_path_factory) -> Path:
    """What a user has: one long plain-text file (CPython's documentation topics, ~120 KB)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("one_file") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]), encoding="utf-8")
    return path


def test_one_text_file_fine_tunes_with_the_default_data_recipe(make_tiny, one_file, tmp_path):
    """One file: held out by chunks (not refused for having one document), the retrieval mix on by default."""
    rep = finetune(make_tiny(), tmp_path / "o", data=[one_file], rope="yarn", factor=2, steps=4, seq_len=128,
                   lr=3e-3, device="cpu")  # fmt: skip
    d = rep.data
    assert d["files"] == 1 and d["documents"] == 1
    assert d["heldout"]["by"] == "chunks" and d["heldout"]["chunks"] >= 1 and d["heldout_rows"] >= 1
    assert 0.03 < d["heldout"]["fraction"] < 0.07  # --holdout 0.05 of the file's tokens
    assert d["retrieval_mix"]["fraction"] == DEFAULT_RETRIEVAL_MIX and d["rows"] == {"text": 1, "retrieval": 3}
    assert sum(d["retrieval_rows_by_first_sample"].values()) == 3
    assert rep.heldout_losses and np.isfinite(rep.losses).all()


def test_data_problems_name_the_flag_to_change(make_tiny, tmp_path):
    ck = make_tiny()
    small_file = tmp_path / "small.md"
    small_file.write_text("A short markdown note. " * 8)  # about 110 tokens: one row of 65, not two
    with pytest.raises(DataError) as e:
        finetune(ck, tmp_path / "o", data=[small_file], **small())
    assert "--holdout" in e.value.message and "--seq-len" in e.value.message
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"body": "text"}) + "\n")
    with pytest.raises(DataError, match="--text-field"):
        finetune(ck, tmp_path / "o", data=[jsonl], **small())
    jsonl.write_text("".join(json.dumps({"body": f"line {i} " * 30}) + "\n" for i in range(40)))
    rep = finetune(ck, tmp_path / "o", data=[jsonl], **small(steps=1), text_field="body")
    assert rep.data["documents"] == 40 and rep.data["heldout"]["by"] == "documents"
    with pytest.raises(ConfigError, match="--retrieval-mix 0"):
        finetune(ck, tmp_path / "o2", data=[jsonl], **small(retrieval_mix=0.5))  # 64-token rows


def test_resume_with_the_retrieval_mix_is_bit_exact(make_tiny, one_file, tmp_path):
    ck = make_tiny()
    kw = dict(data=[one_file], rope="yarn", factor=2, steps=5, seq_len=128, lr=3e-3, device="cpu", save_every=2)
    straight = finetune(ck, tmp_path / "a", **kw, retrieval_mix=0.6)
    with pytest.raises(Interrupted):
        finetune(ck, tmp_path / "b", **kw, retrieval_mix=0.6, progress=stop_at(3))
    resumed = finetune(ck, tmp_path / "b", **kw, retrieval_mix=0.6, resume=True)
    assert resumed.resumed_from_step == 2 and resumed.losses == straight.losses
    a, b = (LlamaModel.from_pretrained(tmp_path / p).state_dict() for p in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TrainingError, match="retrieval_mix"):
        finetune(ck, tmp_path / "b", **kw, retrieval_mix=0.3, resume=True)


def test_row_mean_loss_weighs_rows_not_tokens():
    from edgerope.train.loop import row_mean_loss

    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :5] = -100  # one answer token
    labels[2] = -100  # no target at all: left out
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
    ce = ce.view(3, 6)
    want = (ce[0, 5] + ce[1].mean()) / 2
    assert torch.allclose(row_mean_loss(logits, labels), want)


def test_lora_trains_adapters_only_and_resumes_exactly(make_tiny, corpus, tmp_path):
    from edgerope.train.lora import LoraSettings, lora_params

    ck = make_tiny()
    lora = LoraSettings(rank=4)
    seen = []
    rep = finetune(ck, tmp_path / "o", data=[corpus], **small(steps=12, lr=3e-2), lora=lora, progress=seen.append)
    cfg = ModelConfig.load(ck)
    assert rep.trainable_params == lora_params(cfg, lora) == rep.lora["trainable_params"] < cfg.n_params / 4
    assert np.mean(rep.losses[-3:]) < np.mean(rep.losses[:3]) - 0.1, rep.losses
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file() and not (tmp_path / "o" / "config.json").exists()
    kw = dict(data=[corpus], **small(steps=5, lr=3e-2, save_every=2), lora=lora)
    straight = finetune(ck, tmp_path / "a", **kw)
    with pytest.raises(Interrupted):
        finetune(ck, tmp_path / "b", **kw, progress=stop_at(3))
    assert (tmp_path / "b" / "checkpoints" / "step-0000002" / "adapter_model.safetensors").is_file()
    resumed = finetune(ck, tmp_path / "b", **kw, resume=True)
    assert resumed.resumed_from_step == 2 and resumed.losses == straight.losses
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / p / "adapter_model.safetensors") for p in ("a", "b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_memory_refusal_suggests_lora_when_it_would_fit(make_tiny, corpus, tmp_path):
    from edgerope.train.lora import LoraSettings, lora_params

    ck = make_tiny()
    cfg = ModelConfig.load(ck).replace(max_position_embeddings=512)
    full = estimate_memory(cfg, batch_size=2, seq_len=64, grad_checkpointing=False)
    lo = estimate_memory(cfg, batch_size=2, seq_len=64, grad_checkpointing=False,
                         lora_params=lora_params(cfg, LoraSettings()), lora_rank=16)  # fmt: skip
    assert lo < full
    with pytest.raises(TrainingError, match="--lora") as e:
        finetune(ck, tmp_path / "o", data=[corpus], **small(memory_limit=(lo + full) // 2))
    assert "every weight trained" in e.value.message
    with pytest.raises(TrainingError) as e:  # too little even for LoRA: not suggested
        finetune(ck, tmp_path / "o", data=[corpus], **small(memory_limit=lo // 2))
    assert "--lora" not in e.value.message
    rep = finetune(ck, tmp_path / "o", data=[corpus], **small(steps=1, memory_limit=(lo + full) // 2),
                   lora=LoraSettings())  # fmt: skip
    assert rep.memory_estimate_bytes == lo


@pytest.mark.llama
def test_gguf_option_writes_the_model_ready_to_run(make_tiny, corpus, tmp_path):
    """--gguf q8_0: the fine-tuned GGUF beside the checkpoint, rope metadata included (LoRA: merged)."""
    from edgerope.runtime.runtime import Runtime
    from edgerope.train.lora import LoraSettings

    ck = make_tiny()
    for name, lora in (("full", None), ("lora", LoraSettings(rank=4))):
        rep = finetune(ck, tmp_path / name, data=[corpus], **small(steps=2), lora=lora, gguf="q8_0")
        path = tmp_path / name / "model.q8_0.gguf"
        assert rep.gguf["path"] == str(path) and rep.gguf["merged_lora"] == (lora is not None)
        kv = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}
        assert kv["llama.rope.scaling.type"] == "yarn" and kv["llama.context_length"] == 512
        assert kv["llama.rope.scaling.finetuned"] is True and kv["general.file_type"] == 7
        with Runtime.open(path, n_ctx=512) as rt:
            assert rt.info.n_ctx_train == 512
    with pytest.raises(ConfigError, match="--gguf"):
        finetune(ck, tmp_path / "x", data=[corpus], **small(), gguf="q3_weird")
    r = CliRunner().invoke(
        cli,
        ["finetune", str(ck), "--factor", "2", "--data", str(corpus), "-o", str(tmp_path / "cli"), "--steps", "1",
         "--seq-len", "32", "--retrieval-mix", "0", "--device", "cpu", "--gguf", "f16"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"edgerope ask {tmp_path / 'cli' / 'model.f16.gguf'}" in r.output
