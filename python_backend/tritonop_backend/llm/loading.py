"""Loading a causal LM for the engine, and turning a GGUF file into one once.

De-quantizing SmolLM2's GGUF takes about 20 s on two cores, every time. The model
repository therefore ships a safetensors directory made once by :func:`prepare_gguf`;
a manifest records which source file it came from, so a second call is a cheap check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tritonop_backend.llm.architectures import check_model_dir
from tritonop_backend.llm.attention import use_decode_attention
from tritonop_backend.llm.packing import can_pack, pack_linear_layers

LOGGER = logging.getLogger(__name__)

MANIFEST = "tritonop-manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for :class:`~tritonop_backend.llm.engine.LLMEngine`.

    Attributes:
        model: the causal LM in eval mode, on ``device``.
        tokenizer: its tokenizer.
        device: where it runs.
        dtype: the dtype its weights have.
        note: why the dtype differs from the one asked for, if it does.
        packed_layers: linear layers whose weights were packed for oneDNN at load
            (bfloat16 on a CPU; see ``packing.py``).
    """

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    note: str | None = None
    packed_layers: int = 0


CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags of native bfloat16 matrix products (AVX-512 BF16 dot products, AMX tiles)."""


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bfloat16 matrices natively (``/proc/cpuinfo`` flags).

    Decoding a small model on a CPU is bound by reading the weights once per step, so
    bfloat16 weights halve that where the CPU computes in bfloat16 natively (measured with
    SmolLM2-135M: a decode step of 8 rows 1.9x faster on AVX-512 BF16); elsewhere oneDNN
    converts them on the fly and float32 is faster.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_dtype(
    dtype: str, device: torch.device, native_bf16: bool | None = None
) -> tuple[torch.dtype | str, str | None]:
    """Map a dtype name to what the device can run well.

    On a CPU, "auto" means bfloat16 where the CPU has native bfloat16 matrix products
    (:func:`cpu_has_native_bf16`), float32 elsewhere: decoding is bound by reading the
    weights, so half the bytes is nearly twice the speed (measured with SmolLM2-135M at 8
    rows: 129 against 243 ms a step), while without native support oneDNN converts them on
    the fly and float32 is faster. Greedy output still equals ``generate`` in the same
    dtype for a request alone. In a mixed batch bfloat16 rounding depends on which rows
    share a step, so a greedy sequence may leave ``generate``'s where two tokens are
    near-tied (measured: 3-4 of 8 prompts within 40 tokens; none in float32); the tests
    hold it to the check vLLM uses for that (see ``tests/support/llm.py``). "float32"
    asks for exact equality whatever shares the batch. float16 on any CPU, and bfloat16
    without native support, are emulated or slow, so float32 is used and the caller is
    told why. On CUDA, "auto" keeps the checkpoint's own dtype, and bfloat16 falls back
    to float16 on GPUs without it.

    Args:
        dtype: "auto" or a name in :data:`DTYPES`.
        device: where the model will run.
        native_bf16: whether the CPU has native bfloat16; None reads ``/proc/cpuinfo``.

    Returns:
        The dtype (or "auto") to load with, and a note when it is not what was asked.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if device.type == "cpu":
        if dtype == "float32":
            return torch.float32, None
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        if dtype == "auto":
            return (torch.bfloat16 if native else torch.float32), None
        if dtype == "float16" or not native:
            return torch.float32, f"{dtype} is slow or unsupported on this CPU; using float32"
        return DTYPES[dtype], None
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16, "this GPU has no bfloat16; using float16"
    return (DTYPES[dtype] if dtype != "auto" else "auto"), None


def load_causal_lm(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "cpu",
    *,
    pack: bool = True,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a Hugging Face causal LM directory (safetensors) and its tokenizer, offline.

    Args:
        model_dir: a directory with ``config.json``, weights and tokenizer files.
        dtype: "auto", "float32", "bfloat16" or "float16".
        device: "cpu", "cuda" or "cuda:N".
        pack: in bfloat16 on a CPU, pack the linear layers' weights for oneDNN once
            and run decode attention with each group's query heads packed together
            (``packing.py``, ``attention.py``: the same outputs, faster steps); False
            keeps the stock model, as the tests' independent reference does.
        trust_remote_code: run the Python code the folder ships (``auto_map``), as
            ``transformers``' option of that name does; see ``architectures.py``.

    Returns:
        The model in eval mode on the device, with a note if the dtype was changed.

    Raises:
        UnsupportedModelError: for an architecture the engine does not serve (checked
            before anything is loaded; prepare checks the same first).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(model_dir, trust_remote_code=trust_remote_code)
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available")
    torch_dtype, note = resolve_dtype(dtype, target)
    if note:
        LOGGER.warning("%s", note)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    # On CUDA, load straight onto the GPU: a 7B model would otherwise pass through host RAM.
    placement = str(target) if target.type == "cuda" else None
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch_dtype, use_safetensors=True, device_map=placement,
        trust_remote_code=trust_remote_code,
    )
    model.to(target)
    model.eval()
    weights_dtype = next(model.parameters()).dtype
    packed = 0
    if pack and can_pack(weights_dtype, target):
        packed = pack_linear_layers(model)
        grouped = use_decode_attention(model)
        LOGGER.info("packed %d linear layers for oneDNN; grouped decode attention: %s",
                    packed, grouped)
    return LoadedModel(model, tokenizer, target, weights_dtype, note, packed)


def prepare_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantize a GGUF file once into a safetensors model directory.

    The directory gets the model in float32 (exact for de-quantized weights), the
    tokenizer files and a manifest naming the source's size, mtime and sha256. A later
    call whose source has the same size and mtime returns at once; if only the mtime
    changed, the hash decides. The directory is written beside its final place and
    renamed into it, so a crash never leaves a half-written model behind.

    Returns:
        ``out_dir``, ready for :func:`load_causal_lm`.
    """
    source = Path(gguf_path).resolve()
    target = Path(out_dir)
    if _up_to_date(source, target):
        return target
    LOGGER.info("de-quantizing %s into %s", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert(source, staging)
        (staging / MANIFEST).write_text(json.dumps(_manifest(source, staging), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """Load through transformers' GGUF reader, drop the quantizer, save plain safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    # The weights are already de-quantized; the quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos = model.generation_config.eos_token_id
    known = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stops = set(_end_of_generation_ids(source)) - set(known)
    if stops:
        model.generation_config.eos_token_id = sorted({*known, *stops})
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


EOG_FIELDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
              "tokenizer.ggml.eom_token_id")
"""The GGUF fields of the tokens that end a generation in llama.cpp. transformers reads only
the first, so a Llama 3 GGUF whose end of turn (``<|eot_id|>``) is stored as ``eot`` would
otherwise run on past the end of its answer."""


def _end_of_generation_ids(source: Path) -> list[int]:
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields
    return [int(fields[name].parts[fields[name].data[0]][0])
            for name in EOG_FIELDS if name in fields and fields[name].data]


def _manifest(source: Path, out: Path) -> dict[str, Any]:
    stat = source.stat()
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {
        "source": source.name,
        "source_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "source_sha256": _sha256(source),
        "format": "safetensors",
        "dtype": "float32",
        "files": files,
    }


def _up_to_date(source: Path, target: Path) -> bool:
    """Whether ``target`` was made from this exact source and is still complete."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    stat = source.stat()
    files = manifest.get("files", {})
    complete = all(
        (target / name).is_file() and (target / name).stat().st_size == size
        for name, size in files.items()
    )
    if not complete or manifest.get("source_bytes") != stat.st_size:
        return False
    if manifest.get("source_mtime_ns") == stat.st_mtime_ns:
        return True
    return bool(manifest.get("source_sha256") == _sha256(source))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
