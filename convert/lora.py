"""LoRA adapters to GGUF: merged into the base weights, or as llama.cpp's LoRA adapter file.  No torch.

An adapter folder is what ``edgerope finetune --lora`` writes (or any PEFT LoRA adapter of a Llama-family
model): ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r)), ``adapter_config.json`` (rank ``r``, ``lora_alpha``, target modules) and, from
edgerope, ``edgerope_adapter.json`` (the base checkpoint and the fine-tuned config: its scaled rope).

What it does:

* ``read_adapter_folder`` reads and checks one against its base checkpoint (every pair complete, shapes
  matching the base's projections; PEFT options edgerope cannot reproduce -- DoRA, rsLoRA, fan-in-fan-out,
  bias training, extra trained modules -- refused);
* ``merge_adapter`` writes the merged Hugging Face checkpoint W' = W + (alpha / r) B A (streamed, one tensor in
  memory at a time; merged tensors float32 or the base's dtype) with the fine-tuned config, and
  ``convert_merged`` turns an adapter folder into a GGUF through ``edgerope.convert.export`` (merged
  checkpoint in a hidden temp folder beside the output, removed afterwards);
* ``write_adapter_gguf`` writes llama.cpp's adapter GGUF (facts from llama.cpp's ``convert_lora_to_gguf.py``
  and ``src/llama-adapter.cpp``, docs/llama_cpp.md): ``general.type`` "adapter", ``general.architecture``
  of the base, ``adapter.type`` "lora", ``adapter.lora.alpha``; per target ``<gguf name>.lora_a`` stored
  (r, in) -- GGML ne [in, r] -- and ``<gguf name>.lora_b`` (out, r); llama.cpp adds
  ``scale x alpha / r x B (A x)`` to each matching matmul, r read from lora_a.  The ``llama`` arch's Q/K
  row permutation (docs/llama_cpp.md §3.1) applies to the rows of B.  The rope the adapter was trained at
  is recorded (``edgerope.adapter.rope``), so the runtime can refuse a base GGUF whose rope differs.

What it does not do: train (``edgerope.train.lora``), load an adapter into llama.cpp
(``edgerope.runtime``), quantize adapter tensors (they stay F32 or F16), adapters on embeddings or norms.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgerope.convert import families
from edgerope.convert.export import GGUF_ARCHS, ConvertReport, convert
from edgerope.convert.safetensors_reader import SafetensorsCheckpoint, to_float32
from edgerope.errors import CheckpointError, ConfigError, OutputError
from edgerope.gguf.verify import open_written
from edgerope.models.config import ModelConfig
from edgerope.models.layout import hf_tensor_shapes
from edgerope.rope.hf import to_hf_rope
from edgerope.rope.scaling import describe
from edgerope.system.files import atomic_output, check_output, partial_path, remove_path, track_temp

ADAPTER_WEIGHTS, ADAPTER_CONFIG, EDGEROPE_ADAPTER = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "edgerope_adapter.json",
)
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# config fields a fine-tune may change (the rope, the context, provenance): the rest must be the base's
ROPE_FIELDS = ("rope", "rope_local", "max_position_embeddings", "rope_finetuned", "name", "torch_dtype")
ROPE_KEY = "edgerope.adapter.rope"  # JSON: {"rope_parameters": ..., "context_length": ..., "rotary_dim": ...}
ADAPTER_OUTTYPES = {
    "f32": (np.float32, gguf.GGMLQuantizationType.F32),
    "f16": (np.float16, gguf.GGMLQuantizationType.F16),
}


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a LoRA adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterFolder:
    """A checked adapter: its base, the fine-tuned config, and the low-rank pair of every adapted weight."""

    path: Path
    base: Path
    config: ModelConfig  # the fine-tuned model's config (the base's when the adapter does not record one)
    rank: int
    alpha: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # HF weight name -> (A (r, in), B (out, r)) float32

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, name: str) -> np.ndarray:
        """(alpha / r) B A for the weight ``name``, float32 (out, in)."""
        a, b = self.pairs[name]
        return (self.scale * (b.astype(np.float64) @ a.astype(np.float64))).astype(np.float32)  # (out, r) @ (r, in)


def _json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}", where=str(path)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name} is not a JSON object", where=str(path))
    return raw


def _peft_settings(cfg: dict[str, Any], where: str) -> tuple[int, float]:
    """(rank, alpha) of a PEFT ``adapter_config.json``; refuses what a plain low-rank sum would not reproduce."""
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    for flag, why in (
        ("use_dora", "DoRA rescales each weight column"),
        ("use_rslora", "rsLoRA scales by alpha / sqrt(r)"),
        ("fan_in_fan_out", "fan-in-fan-out stores the weights transposed"),
    ):
        if cfg.get(flag):
            problems.append(f"{flag} is set: {why}, which llama.cpp's adapter format does not")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias is {cfg.get('bias')!r}: trained biases are not carried")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}: fully trained modules are not carried")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank_pattern / alpha_pattern are not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"r {rank!r} and lora_alpha {alpha!r} must be a positive integer and number")
    if problems:
        raise ConfigError("this LoRA adapter cannot be converted:\n    - " + "\n    - ".join(problems), where=where)
    return int(rank), float(alpha)  # type: ignore[arg-type]


def _base_dir(adapter: Path, meta: dict[str, Any], peft_cfg: dict[str, Any], base: str | Path | None) -> Path:
    found = base or meta.get("base_model") or peft_cfg.get("base_model_name_or_path")
    if not found or not (Path(found) / "config.json").is_file():
        raise CheckpointError(
            f"the adapter's base checkpoint {str(found)!r} is not a local model folder",
            where=str(adapter / ADAPTER_CONFIG),
            fix="name the base Hugging Face folder with --base",
        )
    return Path(found)


def read_adapter_folder(path: str | Path, *, base: str | Path | None = None) -> AdapterFolder:
    """Read and check the adapter folder ``path`` against its base (recorded, or ``base``)."""
    from safetensors.numpy import load_file

    d = Path(path)
    if not is_adapter_folder(d):
        raise CheckpointError("not a LoRA adapter folder (no adapter_config.json)", where=str(d))
    peft_cfg = _json(d / ADAPTER_CONFIG)
    rank, alpha = _peft_settings(peft_cfg, str(d / ADAPTER_CONFIG))
    meta = _json(d / EDGEROPE_ADAPTER) if (d / EDGEROPE_ADAPTER).is_file() else {}
    base_dir = _base_dir(d, meta, peft_cfg, base)
    base_cfg = ModelConfig.load(base_dir)
    cfg = ModelConfig.from_hf(meta["config"], where=str(d / EDGEROPE_ADAPTER)) if "config" in meta else base_cfg
    if cfg.replace(**{f: getattr(base_cfg, f) for f in ROPE_FIELDS if hasattr(base_cfg, f)}) != base_cfg:
        raise CheckpointError(
            "the adapter was trained on a model of another shape than its base",
            where=str(base_dir),
            fix="name the base the adapter was trained from with --base",
        )
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"no {ADAPTER_WEIGHTS}", where=str(d))
    tensors = load_file(str(d / ADAPTER_WEIGHTS))
    pairs = _pairs(tensors, rank, hf_tensor_shapes(base_cfg), where=str(d / ADAPTER_WEIGHTS))
    return AdapterFolder(d, base_dir, cfg, rank, alpha, pairs)


def _pairs(
    tensors: dict[str, np.ndarray], rank: int, shapes: dict[str, tuple[int, ...]], *, where: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found: dict[str, dict[str, np.ndarray]] = {}
    problems = []
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            if name.endswith(f".{part}.weight"):
                found.setdefault(name.removesuffix(f".{part}.weight") + ".weight", {})[part] = value
                break
        else:
            problems.append(f"{key}: not a lora_A / lora_B weight")
    pairs = {}
    for weight, ab in sorted(found.items()):
        a, b = ab.get("lora_A"), ab.get("lora_B")
        shape = shapes.get(weight)
        if a is None or b is None:
            problems.append(f"{weight}: lora_A or lora_B is missing")
        elif shape is None or len(shape) != 2:
            problems.append(f"{weight}: the base has no such 2-D weight")
        elif a.shape != (rank, shape[1]) or b.shape != (shape[0], rank):
            problems.append(f"{weight}: A {a.shape} and B {b.shape} do not fit {shape} at rank {rank}")
        else:
            pairs[weight] = (a.astype(np.float32), b.astype(np.float32))
    if problems or not pairs:
        raise CheckpointError(
            "the adapter does not fit its base:\n    - " + "\n    - ".join(problems[:12] or ["no LoRA weights"]),
            where=where,
        )
    return pairs


# ---------------------------------------------------------------------------------------------------- merged


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> tuple[bytes, int]:
    """The header bytes (8-byte length + JSON padded to 8) for (name, dtype, shape, nbytes) in order; data size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, offset


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as safetensors ``dtype`` storage (BF16: round to nearest even, as uint16)."""
    if dtype == "F32":
        return values.astype(np.float32)
    if dtype == "F16":
        return values.astype(np.float16)
    if dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    raise CheckpointError(f"cannot write merged weights as {dtype}")


def merge_adapter(
    adapter: AdapterFolder,
    out_dir: str | Path,
    *,
    merged_dtype: str | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the merged Hugging Face checkpoint of ``adapter`` to ``out_dir`` (atomic folder): the base's tensors,
    each adapted weight W + (alpha / r) B A stored as ``merged_dtype`` (F32, F16 or BF16; None: F32), the
    fine-tuned config, the tokenizer files (the adapter's, else the base's)."""
    out = Path(out_dir)
    check_output(out, force=force)
    dtype = merged_dtype or "F32"
    with SafetensorsCheckpoint(adapter.base) as ckpt:
        missing = sorted(set(adapter.pairs) - set(ckpt.entries))
        if missing:
            raise CheckpointError(f"the base checkpoint lacks {missing[:4]}", where=str(adapter.base))
        names = sorted(ckpt.entries)
        entries = []
        for n in names:
            e = ckpt.entries[n]
            if n in adapter.pairs:
                entries.append((n, dtype, e.shape, e.n_elements * np.dtype(_cast(np.zeros(1), dtype).dtype).itemsize))
            else:
                entries.append((n, e.dtype, e.shape, e.nbytes))
        head, total = _safetensors_header(entries)
        with atomic_output(out) as tmp:
            tmp.mkdir(parents=True)
            with (tmp / "model.safetensors").open("wb") as f:
                f.write(head)
                done = 0
                for n, _, _, nbytes in entries:
                    if n in adapter.pairs:
                        data = _cast(ckpt.float32(n) + adapter.delta(n), dtype)
                    else:
                        data = np.ascontiguousarray(ckpt.raw(n))
                    if data.nbytes != nbytes:  # pragma: no cover - the header and the data disagree
                        raise AssertionError(f"{n}: {data.nbytes} bytes, {nbytes} planned")
                    f.write(memoryview(data).cast("B"))
                    done += nbytes
                    if progress is not None:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
            cfg = adapter.config.replace(torch_dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype])
            (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n", encoding="utf-8")
            for name in TOKENIZER_FILES:
                src = adapter.path / name if (adapter.path / name).is_file() else adapter.base / name
                if src.is_file():
                    (tmp / name).write_bytes(src.read_bytes())
            _check_merged(tmp, adapter, dtype)
    return out


def _check_merged(folder: Path, adapter: AdapterFolder, dtype: str) -> None:
    """Re-read a few merged weights and one untouched tensor and compare them with what was meant."""
    with SafetensorsCheckpoint(folder) as got, SafetensorsCheckpoint(adapter.base) as base:
        if set(got.entries) != set(base.entries):
            raise OutputError("the merged checkpoint does not hold the base's tensors", where=str(folder))
        for n in list(adapter.pairs)[:2]:
            want = to_float32(_cast(base.float32(n) + adapter.delta(n), dtype), dtype)
            if not np.array_equal(got.float32(n), want):
                raise OutputError(f"merged {n} did not read back as written", where=str(folder))


def merged_dtype_for(outtype: str, base: Path) -> str:
    """F32 for an f32 GGUF or an f32 base; otherwise the base's float dtype (as a full fine-tune writes)."""
    if outtype == "f32":
        return "F32"
    with SafetensorsCheckpoint(base) as ckpt:
        e = ckpt.entries.get("model.embed_tokens.weight") or next(iter(ckpt.entries.values()))
        return e.dtype if e.dtype in ("F32", "F16", "BF16") else "F32"


def convert_merged(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f16",
    base: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **convert_options: Any,
) -> tuple[ConvertReport, Any]:
    """The adapter folder merged into its base and converted to the GGUF ``out_path``: (convert report,
    llama.cpp quantizer report or None).  ``outtype``: an ``edgerope convert`` outtype (K-quants chained
    through llama.cpp's quantizer).  The merged checkpoint lives in a hidden temp folder beside the output."""
    adapter = read_adapter_folder(adapter_dir, base=base)
    out = Path(out_path)
    check_output(out, force=force)
    tmp = track_temp(partial_path(out, "merged"))
    try:
        direct = outtype.lower() in ("f32", "f16", "bf16", "q8_0")
        merge_adapter(adapter, tmp, merged_dtype=merged_dtype_for(outtype.lower() if direct else "f16", adapter.base))
        if direct:
            return convert(tmp, out, outtype=outtype.lower(), force=force, progress=progress, **convert_options), None
        from edgerope.convert.quantize import convert_quantized

        return convert_quantized(tmp, out, qtype=outtype, force=force, progress=progress, **convert_options)
    finally:
        remove_path(tmp)


# ---------------------------------------------------------------------------------------------------- adapter GGUF


@dataclass(frozen=True)
class AdapterGGUFReport:
    """What ``write_adapter_gguf`` wrote."""

    path: Path
    arch: str
    outtype: str
    n_pairs: int
    rank: int
    alpha: float
    bytes: int
    rope: str  # the rope the base GGUF must compute
    context_length: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def adapter_rope_json(cfg: ModelConfig) -> str:
    """The rope an adapter of ``cfg`` was trained at, as stored under ``ROPE_KEY``."""
    from edgerope.convert.export import extended_context

    return json.dumps(
        {
            "rope_parameters": to_hf_rope(cfg.rope, head_dim=cfg.rotary_dim),
            "context_length": extended_context(cfg, cfg.rope),
            "rotary_dim": cfg.rotary_dim,
            "describe": describe(cfg.rope),
        },
        sort_keys=True,
    )


def write_adapter_gguf(
    adapter_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f32",
    base: str | Path | None = None,
    force: bool = False,
) -> AdapterGGUFReport:
    """llama.cpp's LoRA adapter GGUF for the adapter folder (see the module docstring); atomic, re-read."""
    t0 = time.perf_counter()
    if outtype not in ADAPTER_OUTTYPES:
        raise ConfigError(f"adapter tensors are written as {' or '.join(ADAPTER_OUTTYPES)}, not {outtype!r}")
    adapter = read_adapter_folder(adapter_dir, base=base)
    cfg, out = adapter.config, Path(out_path)
    arch = cfg.gguf_arch
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"no GGUF architecture for {cfg.model_type}", where=str(adapter.base))
    check_output(out, force=force, inputs=[adapter.path / ADAPTER_WEIGHTS])
    tmap = gguf.get_tensor_name_map(GGUF_ARCHS[arch], cfg.num_hidden_layers)
    np_type, qtype = ADAPTER_OUTTYPES[outtype]
    tensors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for hf_name, (a, b) in adapter.pairs.items():
        name = tmap.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:
            raise CheckpointError(f"gguf has no name for {hf_name}", where=str(adapter.path))
        order = families.row_order(cfg, hf_name, b.shape[0])
        tensors[name] = (a, b if order is None else b[order])  # W rows permuted <=> B rows permuted
    rope_json = adapter_rope_json(cfg)
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        w.add_string(ROPE_KEY, rope_json)
        for name, (a, b) in tensors.items():
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.astype(np_type)), raw_dtype=qtype)  # (r, in)
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.astype(np_type)), raw_dtype=qtype)  # (out, r)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _verify_adapter_gguf(tmp, arch, adapter.alpha, {k: v for k, v in tensors.items()}, np_type)
    ctx = json.loads(rope_json)["context_length"]
    return AdapterGGUFReport(
        out, arch, outtype, len(tensors), adapter.rank, adapter.alpha, out.stat().st_size, describe(cfg.rope), ctx,
        time.perf_counter() - t0,
    )  # fmt: skip


def _verify_adapter_gguf(
    path: Path, arch: str, alpha: float, tensors: dict[str, tuple[np.ndarray, np.ndarray]], np_type: type
) -> None:
    g = open_written(path, what="the adapter GGUF")
    meta = {k: v.value for k, v in g.metadata.items()}
    problems = []
    for k, want in (("general.type", "adapter"), ("general.architecture", arch), ("adapter.type", "lora")):
        if meta.get(k) != want:
            problems.append(f"{k} is {meta.get(k)!r}, not {want!r}")
    if meta.get("adapter.lora.alpha") != float(np.float32(alpha)):
        problems.append(f"adapter.lora.alpha is {meta.get('adapter.lora.alpha')!r}, not {alpha}")
    for name, (a, b) in tensors.items():
        for suffix, want in (("lora_a", a), ("lora_b", b)):
            info = g.tensor(f"{name}.{suffix}")
            got = g.tensor_values(f"{name}.{suffix}") if info is not None else None
            if (
                got is None
                or info.shape != want.shape[::-1]
                or not np.array_equal(got, want.astype(np_type).astype(np.float64).ravel())
            ):
                problems.append(f"{name}.{suffix} did not read back as written")
    if problems:
        raise OutputError("the adapter GGUF failed verification:\n    - " + "\n    - ".join(problems), where=str(path))
