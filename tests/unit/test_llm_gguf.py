"""An LLMService from a GGUF file: prepared once into safetensors, then served like a folder.

The GGUF files are written here from the tiny models of ``tests/support/decoders.py`` with
llama.cpp's ``gguf`` library (``tests/support/gguf.py``), in float32, so the reference is
the original folder's own ``generate``: the file and ``transformers``' reader of it must
lose nothing the engine's output depends on. Llama and Qwen2; Qwen3 is left out because
``transformers`` 5.25 does not read a GGUF's head size for it (real Qwen3 models have the
default 128, the tiny one 32).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.support.decoders import DECODERS, make_decoder
from tests.support.gguf import write_gguf
from tests.support.llm import run
from tests.support.triton import API
from tritonop.artifacts.prepare import prepare
from tritonop.resources import Resource, parse_resource
from tritonop_backend.artifacts import ArtifactError
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
PROMPTS = ["Explain why the sky is blue, step by step, with examples from daily life.",
           "What is the capital of France?", "Hi"]
# Llama 2-style RoPE: Llama 3's scaling is refused in a GGUF (see the last test).
PLAIN_LLAMA = dataclasses.replace(DECODERS["llama"], name="llama",
                                  config=("LlamaConfig", {"tie_word_embeddings": True}))


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_decoders) -> dict[str, Path]:
    return {"llama": make_decoder(PLAIN_LLAMA, tmp_path_factory.mktemp("plain") / "llama"),
            "qwen2": tiny_decoders["qwen2"]}


def service(name: str, source: Path) -> Resource:
    return parse_resource({"apiVersion": API, "kind": "LLMService", "metadata": {"name": name},
                           "spec": {"model": {"source": str(source)}}})


def greedy(model, tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                do_sample=False)
    return list(output[0, ids.shape[1]:].tolist())


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_a_gguf_served_after_prepare_equals_generate_on_the_original(
    originals: dict[str, Path], tmp_path: Path, name: str
) -> None:
    gguf_path = write_gguf(originals[name], tmp_path / f"{name}.gguf")
    root = tmp_path / "artifacts"
    prepare([service(name, gguf_path)], root)
    prepared = root / name / "model"
    assert (prepared / "model.safetensors").is_file()
    # Both ends of a turn stop generation, as in llama.cpp (transformers reads only eos).
    stops = json.loads((originals[name] / "generation_config.json").read_text())["eos_token_id"]
    served = json.loads((prepared / "generation_config.json").read_text())["eos_token_id"]
    assert sorted(served) == sorted(stops)

    loaded = load_causal_lm(prepared, "float32", "cpu")
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    outcomes = run(engine, {i: parse_request({"text_input": prompt}, POLICY)
                            for i, prompt in enumerate(PROMPTS)})
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(originals[name]))
    model = AutoModelForCausalLM.from_pretrained(str(originals[name]), dtype=torch.float32)
    for i, prompt in enumerate(PROMPTS):
        assert outcomes[i].tokens == greedy(model.eval(), tokenizer, prompt), prompt


def test_a_gguf_with_llama3_rope_scaling_is_refused_at_prepare(
    tiny_decoders: dict[str, Path], tmp_path: Path
) -> None:
    """transformers drops the ``rope_freqs`` tensor that carries Llama 3.1's RoPE scaling."""
    gguf_path = write_gguf(tiny_decoders["llama"], tmp_path / "llama3.gguf")
    with pytest.raises(ArtifactError) as caught:
        prepare([service("scaled", gguf_path)], tmp_path / "artifacts")
    assert str(caught.value).startswith(
        f"model source {gguf_path}: the GGUF carries RoPE scaling factors (rope_freqs.weight")
    assert "serve its safetensors folder instead" in str(caught.value)
    assert not (tmp_path / "artifacts" / "scaled" / "model").exists()


def test_a_gguf_whose_header_lies_is_refused_at_prepare_without_reading_on(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    """gguf's reader trusts a header's counts: an array of 2**62 items in a small file made
    it loop and allocate without end. Prepare walks the header first, each count checked
    against the bytes left; a real file cut short is refused the same way."""
    import struct

    lying = tmp_path / "lying.gguf"
    lying.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"name"
                      + struct.pack("<IIQ", 9, 8, 2**62))
    whole = write_gguf(originals["llama"], tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:2000])
    for path, what in ((lying, "metadata field 0"), (cut, "metadata field")):
        with pytest.raises(ArtifactError) as caught:
            prepare([service("lying", path)], tmp_path / "artifacts")
        assert "is not a readable GGUF file" in str(caught.value) and what in str(caught.value)
