"""The CUDA paths against the CPU as the reference: fine-tuning (fp32 and bf16 autocast), resume, pretraining
and PyTorch evaluation.  Every test skips, with its reason, where torch sees no CUDA GPU (CI has none; they run
on a GPU machine by hand: see the README's "The contract, tested")."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers.training import Interrupted, stop_at  # noqa: E402
from helpers.training import small as cpu_small  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch.cuda.is_available() is False")


def small(**kw):
    """test_finetune's fast settings, fp32 unless asked (the CPU reference runs fp32)."""
    return cpu_small(**{"precision": "fp32", **kw})


def test_finetune_on_cuda_follows_the_cpu_run(make_tiny, corpus, tmp_path):
    from edgerope.models.llama import LlamaModel
    from edgerope.train.finetune import finetune

    ck = make_tiny()
    cpu = finetune(ck, tmp_path / "cpu", data=[corpus], **small(device="cpu"))
    gpu = finetune(ck, tmp_path / "gpu", data=[corpus], **small(device="cuda"))
    assert gpu.device.startswith("cuda") and gpu.precision == "fp32" and gpu.peak_memory_bytes > 0
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=0, atol=2e-3)  # same data order, same init
    a, b = (LlamaModel.from_pretrained(tmp_path / p).state_dict() for p in ("cpu", "gpu"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-2


def test_bf16_autocast_is_the_cuda_default(make_tiny, corpus, tmp_path):
    from edgerope.models.config import ModelConfig
    from edgerope.train.finetune import finetune

    rep = finetune(make_tiny(), tmp_path / "o", data=[corpus], **small(device="cuda", precision="auto"))
    assert rep.precision == "bf16" and np.isfinite(rep.losses).all()
    assert ModelConfig.load(tmp_path / "o").torch_dtype == "float32"  # master weights stay fp32


def test_resume_on_cuda_continues_the_run(make_tiny, corpus, tmp_path):
    from edgerope.train.finetune import finetune

    ck = make_tiny()
    kw = small(device="cuda", grad_accum=2, save_every=3)
    straight = finetune(ck, tmp_path / "a", data=[corpus], **kw)

    with pytest.raises(Interrupted):
        finetune(ck, tmp_path / "b", data=[corpus], **kw, progress=stop_at(3))
    resumed = finetune(ck, tmp_path / "b", data=[corpus], **kw, resume=True)
    assert resumed.resumed_from_step == 3
    # CUDA kernels may reduce in a different order run to run: equal to float noise, not bit for bit
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=0, atol=1e-4)


def test_pretrain_on_cuda_follows_the_cpu_run(tmp_path):
    import json

    from edgerope.recipes.pretrain import TinyRecipe, pretrain

    r = TinyRecipe(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, steps=4, batch_size=4, warmup=2)  # fmt: skip
    cpu = json.loads((pretrain(tmp_path / "cpu", r, device="cpu") / "recipe.json").read_text())
    gpu = json.loads((pretrain(tmp_path / "gpu", r, device="cuda") / "recipe.json").read_text())
    np.testing.assert_allclose(gpu["losses"], cpu["losses"], rtol=0, atol=2e-3)
    assert "threads" not in gpu["machine"]  # the GPU's name is recorded instead
