"""The LLM path on a CUDA GPU: loading in the named dtype, greedy against ``generate``.

Nothing is downloaded: a small Mistral-architecture model with random weights and a
word-level tokenizer are saved to a directory, then loaded with ``load_causal_lm``, the
loader the Triton model uses, so device placement and dtypes are covered as well as the
engine's CUDA tensors (key/value buffer, masks, per-row sampling generators). The
references are ``transformers``' own ``generate`` on the same GPU.

Skipped without CUDA (CI has none). On a GPU machine: ``pytest -m gpu``. This module
imports only torch, transformers, tokenizers and ``tritonop_backend``, so it also runs
where the operator's own dependencies are not installed.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.decoders import DECODERS
from tests.support.llm import decoded, run
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=128, apply_chat_template=False)
WORDS = [f"w{i}" for i in range(500)]
RNG = random.Random(5)
# Prompts of different lengths, so that a batch has left padding to get right.
PROMPTS = [" ".join(RNG.choices(WORDS, k=length)) for length in (3, 11, 26, 7)]


def save_tiny_mistral(directory: Path) -> Path:
    """A 2-layer Mistral with random weights and a word-level tokenizer, saved to disk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {word: i + 3 for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                           pad_token_id=2)
    MistralForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="module")
def fp32(model_dir: Path) -> LoadedModel:
    return load_causal_lm(model_dir, "float32", "cuda")


def request(prompt: str, **values: Any) -> GenerationRequest:
    return parse_request({"text_input": prompt, **values}, POLICY)


def generate_greedy(loaded: LoadedModel, engine: LLMEngine, prompt: str, tokens: int) -> list[int]:
    ids = torch.tensor([engine.encode_prompt(prompt)], device="cuda")
    output = loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=tokens, do_sample=False, pad_token_id=2)
    return list(output[0, ids.shape[1]:].tolist())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_loads_on_the_gpu_in_the_named_dtype_and_generates(model_dir: Path, dtype: str) -> None:
    loaded = load_causal_lm(model_dir, dtype, "cuda")
    assert loaded.device.type == "cuda" and loaded.note is None
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    assert loaded.dtype == getattr(torch, dtype)
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    outcomes = run(engine, {i: request(p, max_tokens=12, temperature=0.8, seed=i)
                            for i, p in enumerate(PROMPTS)})
    for outcome in outcomes.values():
        assert outcome.last.finish_reason in ("length", "stop")
        assert 1 <= len(outcome.tokens) <= 12
        assert outcome.text == decoded(engine, outcome.tokens)


@pytest.mark.parametrize("static_decode", [None, False], ids=["cuda-graphs", "eager"])
def test_greedy_equals_generate_alone_and_in_a_batch(
    fp32: LoadedModel, static_decode: bool | None
) -> None:
    """By default decode steps replay CUDA graphs (one per batch-size bucket)."""
    engine = LLMEngine(fp32.model, fp32.tokenizer, POLICY, max_sequences=4,
                       static_decode=static_decode)
    references = [generate_greedy(fp32, engine, prompt, 16) for prompt in PROMPTS]
    assert len({tuple(r) for r in references}) == len(PROMPTS), "prompts should differ"
    for prompt, expected in zip(PROMPTS, references, strict=True):
        assert run(engine, {"a": request(prompt)})["a"].tokens == expected
    sampled = request(PROMPTS[0], temperature=1.0, top_p=0.9, top_k=50,
                      repetition_penalty=1.2, seed=3)
    together = run(engine, {0: request(PROMPTS[0]), 1: request(PROMPTS[1]), "s": sampled},
                   joining={3: {2: request(PROMPTS[2]), 3: request(PROMPTS[3])}})
    for i, expected in enumerate(references):
        assert together[i].tokens == expected, f"prompt {i}"
    if static_decode is None:
        assert engine._static is not None and engine._static.graphs
        assert engine._static.recordings >= 3  # buckets of 1, 2 and 4 rows at least


def test_a_graph_per_width_bucket_as_the_sequence_grows(fp32: LoadedModel) -> None:
    """300 tokens cross the width buckets 64, 128, 256 and the whole 500-column buffer:
    the step reads the columns in use, one recorded graph per bucket."""
    policy = GenerationPolicy(default_max_tokens=300, max_tokens_limit=300,
                              default_temperature=0.0, max_context_tokens=400,
                              apply_chat_template=False)
    engine = LLMEngine(fp32.model, fp32.tokenizer, policy, max_sequences=2)
    prompt = PROMPTS[2]
    outcome = run(engine, {"a": parse_request({"text_input": prompt}, policy)})["a"]
    assert outcome.tokens == generate_greedy(fp32, engine, prompt, 300)
    assert engine._kv.capacity == 500
    assert engine._static is not None and engine._static.recordings == 4
    assert sorted(width for _, width in engine._static._inputs) == [64, 128, 256, 500]


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(fp32: LoadedModel) -> None:
    engine = LLMEngine(fp32.model, fp32.tokenizer, POLICY, max_sequences=4)

    def sampled(seed: int) -> GenerationRequest:
        return request(PROMPTS[1], max_tokens=24, temperature=1.0, seed=seed)

    alone = run(engine, {"a": sampled(11)})["a"].tokens
    crowded = run(engine, {"x": request(PROMPTS[2], max_tokens=5), "a": sampled(11),
                           "b": sampled(12)})
    assert crowded["a"].tokens == alone
    assert crowded["b"].tokens != alone


CHAT_POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=64,
                               default_temperature=0.0, max_context_tokens=256)
CHAT_PROMPTS = ["Explain why the sky is blue, step by step, with examples from daily life.",
                "What is the capital of France?", "Hi"]


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_architecture_replays_cuda_graphs_equal_to_generate(
    tiny_decoders: dict[str, Path], name: str
) -> None:
    """The tiny models of ``tests/support/decoders.py`` (sliding windows shorter than the
    prompts; Gemma's mixed layers get one recorded mask per layer kind), chat-templated,
    three prompts of mixed lengths together, in float32 on the GPU."""
    loaded = load_causal_lm(tiny_decoders[name], "float32", "cuda")
    engine = LLMEngine(loaded.model, loaded.tokenizer, CHAT_POLICY, max_sequences=4)
    assert engine._static is not None and engine._static.graphs
    outcomes = run(engine, {i: parse_request({"text_input": prompt}, CHAT_POLICY)
                            for i, prompt in enumerate(CHAT_PROMPTS)})
    for i, prompt in enumerate(CHAT_PROMPTS):
        ids = torch.tensor([engine.encode_prompt(prompt)], device="cuda")
        output = loaded.model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=16, do_sample=False)
        assert outcomes[i].tokens == output[0, ids.shape[1]:].tolist(), prompt
    assert engine._static.recordings >= 1
