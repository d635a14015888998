"""Decoders served on a CUDA GPU by ``tritonop serve``: greedy equals ``generate`` there.

The tiny Mistral (sliding window) and Qwen2 of ``tests/support/decoders.py``, each an
LLMService with ``device: cuda`` and ``gpus: 1`` in float32, served by the ``tritonop
serve`` command through a real ``tritonserver`` (a GPU model instance) and the gateway.
Greedy ``/v1/completions`` answers, sent together, must equal ``transformers``' ``generate``
on the same GPU token for token, and Triton's log must say each model loaded on CUDA.

Skipped without CUDA (CI has none). On a GPU machine: ``pytest -m gpu``. The speed of a
Mistral-7B-shaped model served this way is ``bench/llm_gpu.py``'s (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.llm import greedy_completions
from tests.support.triton import API, free_port, serving

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NAMES = ["mistral", "qwen2"]
PROMPTS = ["Explain why the sky is blue, step by step, with examples from daily life.",
           "What is the capital of France?", "Hi"]
MAX_TOKENS = 12


def test_greedy_on_the_gpu_through_tritonop_serve_equals_generate(tmp_path: Path,
                                                                  tiny_decoders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = []
    for name in NAMES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "apiVersion": API, "kind": "LLMService", "metadata": {"name": name}, "spec": {
                "model": {"source": str(tiny_decoders[name]), "dtype": "float32",
                          "device": "cuda", "maxContextLength": 256},
                "gpus": 1,
                "generation": {"limits": {"maxTokens": 64}, "defaults": {"maxTokens": 16}},
                "engine": {"maxSequences": 4, "maxWaiting": 8}}}))
        files.append(str(path))
    port = free_port()
    workdir = tmp_path / "serve"
    with serving([*files, "--workdir", str(workdir), "--openai-port", str(port),
                  "--artifacts-root", str(tmp_path / "artifacts")]):
        answers = {name: greedy_completions(f"http://127.0.0.1:{port}/v1", name, PROMPTS,
                                            MAX_TOKENS) for name in NAMES}
    log = (workdir / "tritonserver.log").read_text(errors="replace")
    for name in NAMES:
        assert f"{name}: {tiny_decoders[name]} loaded on cuda" in log, name
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_decoders[name]))
        model = AutoModelForCausalLM.from_pretrained(str(tiny_decoders[name]),
                                                     dtype=torch.float32).to("cuda").eval()
        for prompt, answer in zip(PROMPTS, answers[name], strict=True):
            ids = torch.tensor([tokenizer(prompt)["input_ids"]], device="cuda")
            with torch.no_grad():
                output = model.generate(ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=MAX_TOKENS, do_sample=False)
            new = output[0, ids.shape[1]:].tolist()
            assert answer["choices"][0]["text"] == tokenizer.decode(
                new, skip_special_tokens=True), (name, prompt)
            assert answer["usage"]["completion_tokens"] == len(new), (name, prompt)
