"""Every decoder architecture, served from its Hugging Face folder by one real tritonserver.

The tiny random models of ``tests/support/decoders.py`` (Mistral with an 8-token sliding
window, Llama 3, Qwen2, Qwen3, Gemma 2 and 3, Phi-3), each an LLMService in float32 whose
``model.source`` is the folder, prepared and served as ``tritonop serve`` does. Greedy
output through Triton's ``/generate`` and through the gateway's ``/v1/completions`` must
equal ``transformers``' ``generate``, text and token count, for requests sent together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.decoders import DECODERS
from tests.support.llm import greedy_completions
from tests.support.triton import API, RunningTriton, free_port, running_triton
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import GatewayThread
from tritonop.resources import Resource, parse_resource

pytestmark = pytest.mark.triton

NAMES = list(DECODERS)
PROMPTS = ["Explain why the sky is blue, step by step, with examples from daily life.",
           "What is the capital of France?", "Hi"]
COMPLETIONS = ["mistral", "gemma2"]
"""Served through the gateway as well: the sliding window, and mixed layers with soft-capping."""
MAX_TOKENS = 12


def llm_service(name: str, folder: Path) -> Resource:
    """One LLMService over a model folder, in float32, one thread, up to 4 rows together."""
    body = {"apiVersion": API, "kind": "LLMService", "metadata": {"name": name}, "spec": {
        "model": {"source": str(folder), "maxContextLength": 256, "dtype": "float32"},
        "generation": {"limits": {"maxTokens": 64}, "defaults": {"maxTokens": 16}},
        "engine": {"maxSequences": 4, "maxWaiting": 8, "threads": 1}}}
    return parse_resource(body)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_decoders) -> Iterator[tuple[RunningTriton, GatewayThread]]:
    resources = [llm_service(name, tiny_decoders[name]) for name in NAMES]
    root = tmp_path_factory.mktemp("decoders-artifacts")
    with running_triton(resources, root, tmp_path_factory.mktemp("decoders-triton")) as triton:
        address = TritonAddress(triton.server.grpc_url, triton.server.http_url)
        gateway = GatewayThread(gateway_config(resources), address, free_port()).start()
        try:
            yield triton, gateway
        finally:
            gateway.stop()


Reference = Callable[[str, list[int]], tuple[str, int]]


@pytest.fixture(scope="module")
def references(tiny_decoders) -> dict[str, Any]:
    """A stock float32 model and tokenizer per architecture, loaded by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {name: (AutoTokenizer.from_pretrained(str(tiny_decoders[name])),
                   AutoModelForCausalLM.from_pretrained(str(tiny_decoders[name]),
                                                        dtype=torch.float32).eval())
            for name in NAMES}


def generate(tokenizer: Any, model: Any, ids: list[int]) -> tuple[str, int]:
    """Greedy text and token count from ``generate``, the independent reference."""
    import torch

    inputs = torch.tensor([ids])
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                max_new_tokens=MAX_TOKENS, do_sample=False)
    new = output[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_greedy_through_generate_equals_transformers(served, references, name):
    """Three prompts of different lengths at once, so that they share the engine's steps."""
    triton, _ = served
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda prompt: triton.generate(name, {
            "text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}), PROMPTS))
    tokenizer, model = references[name]
    for prompt, (status, body) in zip(PROMPTS, answers, strict=True):
        assert status == 200, body
        expected = generate(tokenizer, model, chat_ids(tokenizer, prompt))
        assert (body["text_output"], body["completion_tokens"]) == expected, prompt


@pytest.mark.parametrize("name", COMPLETIONS)
def test_greedy_through_the_gateways_completions_equals_transformers(served, references, name):
    """``/v1/completions`` takes the prompt verbatim (the tokenizer's own BOS, no template)."""
    _, gateway = served
    tokenizer, model = references[name]

    answers = greedy_completions(f"{gateway.url}/v1", name, PROMPTS, MAX_TOKENS)
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = list(tokenizer(prompt)["input_ids"])
        text, count = generate(tokenizer, model, ids)
        assert answer["choices"][0]["text"] == text, prompt
        assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (
            len(ids), count)
