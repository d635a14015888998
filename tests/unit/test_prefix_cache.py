"""Prefix caching in the engine, against ``transformers``' own ``generate``.

Tiny random models (``tests/support/decoders.py``) in float32, where greedy output must
equal ``generate``'s token for token whether a prompt's first blocks were computed or
copied from the cache. Mistral's 8-token sliding window is shorter than the prompts and
the cached prefixes, so a window misapplied over copied keys would change the tokens.
Some tests give prompts as token ids (``IdsEngine``) to place differences exactly at
block boundaries; the others go through the chat template.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.llm import IdsEngine, run
from tests.support.llm import generate_ids as generate
from tritonop_backend.llm.engine import DEFER_MIN_TOKENS, LLMEngine
from tritonop_backend.llm.kv import KVShape
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request
from tritonop_backend.llm.prefix import BLOCK_TOKENS, PrefixCache, block_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=12, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
NAMES = ["llama", "mistral"]
SYSTEM = ("You are a terse assistant for a Debian package archive. Answer with one package "
          "name and one line that says what it does, nothing else, and never apologise.")
PREAMBLE = ("Here is a list of packages: vim, emacs, nano, gimp, inkscape, vlc, mpv, firefox, "
            "chromium, gzip, bzip2, xz-utils, zstd. Pick from it.")
QUESTIONS = ["Name a package for playing music.", "Which package edits images?",
             "What compresses files?", "Name a text editor.", "Which one is a web browser?"]


@pytest.fixture(scope="module")
def models(tiny_decoders: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_causal_lm(tiny_decoders[name], "float32", "cpu") for name in NAMES}


def chat(question: str, preamble: str = PREAMBLE, **values: Any) -> GenerationRequest:
    """A system turn and a question after a shared preamble (the tiny Mistral's template,
    like Mistral's older ones, drops the system turn)."""
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{preamble}\n\n{question}"}]
    return parse_request({"text_input": json.dumps(messages), "prompt_format": "messages",
                          **values}, POLICY)


def ids_request(ids: list[int], **values: Any) -> GenerationRequest:
    return parse_request({"text_input": " ".join(map(str, ids)), **values}, POLICY)


def computed_tokens(engine: LLMEngine) -> list[int]:
    """Record the query tokens (padding included) of every prefill pass."""
    counts: list[int] = []
    prefill, forward = engine._prefill, engine._forward
    inside = [False]

    def prefilling(admitted: list[Any]) -> Any:
        inside[0] = True
        try:
            return prefill(admitted)
        finally:
            inside[0] = False

    def counting(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if inside[0]:
            counts.append(int(ids.numel()))
        return forward(ids, mask, positions)

    engine._prefill = prefilling  # type: ignore[method-assign]
    engine._forward = counting  # type: ignore[method-assign]
    return counts


def common_blocks(first: list[int], second: list[int]) -> int:
    """Whole blocks at the start of both."""
    same = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
                min(len(first), len(second)))
    return same // BLOCK_TOKENS


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
@pytest.mark.parametrize("name", NAMES)
def test_a_shared_system_prompt_is_computed_once_and_outputs_equal_generate(
    models: dict[str, LoadedModel], name: str, static_decode: bool
) -> None:
    """One chat warms the cache; then four arrive together, and one joins a busy batch."""
    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8,
                       static_decode=static_decode)
    cache = engine.prefix_cache
    assert cache is not None
    computed = computed_tokens(engine)
    outcomes = run(engine, {"warm": chat(QUESTIONS[0])})
    assert cache.hit_tokens == 0 and len(cache) > 0
    outcomes |= run(engine, {i: chat(q) for i, q in enumerate(QUESTIONS[1:4])},
                    joining={4: {"late": chat(QUESTIONS[4])}})
    prompts = {key: engine.encode_request(chat(q)) for key, q in
               [("warm", QUESTIONS[0]), (0, QUESTIONS[1]), (1, QUESTIONS[2]),
                (2, QUESTIONS[3]), ("late", QUESTIONS[4])]}
    for key, ids in prompts.items():
        assert outcomes[key].tokens == generate(loaded.model, ids), key
    shared = common_blocks(prompts["warm"], prompts["late"])
    assert shared >= 2
    # A pass computes as many tokens in each row as the row with the most uncached ones.
    assert cache.hit_tokens >= 4 * (shared - 1) * BLOCK_TOKENS
    assert sum(computed[1:]) < sum(len(ids) for ids in list(prompts.values())[1:]) / 2


@pytest.mark.parametrize("name", NAMES)
def test_without_the_cache_the_outputs_are_the_same(
    models: dict[str, LoadedModel], name: str
) -> None:
    loaded = models[name]
    outcomes = {}
    for budget in (0, 1 << 20):
        engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4,
                           prefix_cache_bytes=budget)
        assert (engine.prefix_cache is None) == (budget == 0)
        run(engine, {"warm": chat(QUESTIONS[0])})
        outcomes[budget] = run(engine, {i: chat(q) for i, q in enumerate(QUESTIONS)})
    assert {k: o.tokens for k, o in outcomes[0].items()} == \
        {k: o.tokens for k, o in outcomes[1 << 20].items()}


def _variants(rng: random.Random, vocab: int) -> dict[str, list[int]]:
    """Prompts that a cache keyed wrongly would confuse with ``base``.

    ``base`` is four whole blocks and one token. The others share all of it but the last
    token; all but the last block (which differs 5 tokens before the end, within the
    reach of two 8-token sliding windows); or the last blocks but not the first.
    """
    base = [rng.randrange(3, vocab) for _ in range(4 * BLOCK_TOKENS + 1)]

    def changed(at: int) -> list[int]:
        return [*base[:at], (base[at] + 1 - 3) % (vocab - 3) + 3, *base[at + 1 :]]

    last_token, last_block, first_block = changed(-1 % len(base)), changed(-5 % len(base)), \
        changed(0)
    return {"base": base, "last token": last_token, "last block": last_block,
            "first block": first_block, "aligned": base[:-1], "aligned, last token":
            [*base[:-2], last_token[-1]]}


@pytest.mark.parametrize("name", NAMES)
def test_the_cache_never_hands_out_rows_of_another_prefix(
    models: dict[str, LoadedModel], name: str
) -> None:
    """Each variant runs after ``base`` is cached, alone and then all together; each
    output equals ``generate`` on that variant's own tokens. The model's output depends on
    these differences (checked), so rows of the wrong prefix would show; with Mistral's
    sliding windows, only on the last tokens (the first block is out of their reach)."""
    loaded = models[name]
    vocab = loaded.model.config.vocab_size
    prompts = _variants(random.Random(7), vocab)
    expected = {key: generate(loaded.model, ids) for key, ids in prompts.items()}
    visible = ["last token", "last block"] + ([] if name == "mistral" else ["first block"])
    assert all(expected[key] != expected["base"] for key in visible)
    for together in (False, True):
        engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8)
        run(engine, {"base": ids_request(prompts["base"])})
        if together:
            outcomes = run(engine, {key: ids_request(ids) for key, ids in prompts.items()})
        else:
            outcomes = {}
            for key, ids in prompts.items():
                outcomes |= run(engine, {key: ids_request(ids)})
        for key in prompts:
            assert outcomes[key].tokens == expected[key], (key, together)
        assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens > 0


def test_a_block_is_found_only_after_the_same_blocks() -> None:
    """The same tokens in a block after another first block are another block."""
    cache = PrefixCache(KVShape(2, 2, 4, torch.float32), 1 << 20, torch.device("cpu"),
                        block_tokens=4)
    first = list(range(8))
    other = [9, 9, 9, 9, *first[4:]]

    def read(lo: int, hi: int) -> torch.Tensor:
        return torch.arange(lo, hi, dtype=torch.float32).expand(4, 2, hi - lo).unsqueeze(-1) \
            .expand(4, 2, hi - lo, 4).clone()

    assert cache.store(block_keys(first, 4), read) == 2
    assert cache.lookup(block_keys(first, 4), 2) == 2
    assert cache.lookup(block_keys(other, 4), 2) == 0
    assert cache.lookup(block_keys([*first[:4], 0, 0, 0, 0], 4), 2) == 1
    assert torch.equal(cache.fetch(block_keys(first, 4), 6), read(0, 6))


@pytest.mark.parametrize("name", NAMES)
def test_identical_prompts_admitted_together_are_computed_once(
    models: dict[str, LoadedModel], name: str
) -> None:
    """What the gateway's ``n`` sends: one pass of one row; greedy copies equal generate,
    sampled copies equal the same request sent alone with the same seed."""
    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8)
    computed = computed_tokens(engine)
    question = QUESTIONS[2]
    requests = {"greedy": chat(question), "again": chat(question)} | {
        seed: chat(question, temperature=0.9, seed=seed) for seed in (1, 2, 3)}
    outcomes = run(engine, requests)
    ids = engine.encode_request(chat(question))
    assert computed[0] == len(ids)
    assert outcomes["greedy"].tokens == outcomes["again"].tokens == generate(loaded.model, ids)
    alone = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=1,
                      prefix_cache_bytes=0)
    for seed in (1, 2, 3):
        assert outcomes[seed].tokens == run(alone, {seed: requests[seed]})[seed].tokens
    assert len({tuple(outcomes[seed].tokens) for seed in (1, 2, 3)}) > 1


@pytest.mark.parametrize("name", NAMES)
def test_a_burst_sharing_a_new_prefix_computes_it_once(
    models: dict[str, LoadedModel], name: str
) -> None:
    """Five chats with a new preamble of over 128 tokens (``DEFER_MIN_TOKENS``) arrive at
    once: the first is computed, the rest wait one step and take its blocks."""
    loaded = models[name]
    policy = GenerationPolicy(default_max_tokens=12, max_tokens_limit=64,
                              default_temperature=0.0, max_context_tokens=480)
    engine = LLMEngine(loaded.model, loaded.tokenizer, policy, max_sequences=8)
    computed = computed_tokens(engine)
    preamble = " ".join([PREAMBLE] * 2)
    prompts = [engine.encode_request(chat(q, preamble)) for q in QUESTIONS]
    assert common_blocks(prompts[0], prompts[1]) * BLOCK_TOKENS >= DEFER_MIN_TOKENS
    outcomes = run(engine, {i: chat(q, preamble) for i, q in enumerate(QUESTIONS)})
    for i, ids in enumerate(prompts):
        assert outcomes[i].tokens == generate(loaded.model, ids)
    assert computed[0] == len(prompts[0])
    assert sum(computed) < sum(len(ids) for ids in prompts) / 2


@pytest.mark.parametrize("name", NAMES)
def test_memory_stays_within_the_budget_over_500_requests(
    models: dict[str, LoadedModel], name: str
) -> None:
    """500 requests over random prefixes (30 of 1-6 blocks, each with a random tail) through
    a cache of 40 blocks: the bytes its tensors hold never exceed the budget, it evicts,
    it hits, and every 25th request still equals ``generate``."""
    loaded = models[name]
    rng = random.Random(11)
    vocab = loaded.model.config.vocab_size
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 6) * BLOCK_TOKENS)]
                for _ in range(30)]
    prompts = [[*rng.choice(prefixes), *(rng.randrange(3, vocab)
                                         for _ in range(rng.randint(1, 20)))]
               for _ in range(500)]
    probe = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=1)
    assert probe.prefix_cache is not None
    budget = 40 * probe.prefix_cache.block_bytes
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8,
                       max_waiting=500, prefix_cache_bytes=budget)
    cache = engine.prefix_cache
    assert cache is not None
    for i, ids in enumerate(prompts):
        engine.add(i, ids_request(ids, max_tokens=12 if i % 25 == 0 else 2))
    outcomes: dict[int, list[int]] = {}
    most = 0
    while engine.has_work():
        for event in engine.step():
            outcomes.setdefault(int(event.request_id), []).extend(event.token_ids)
        most = max(most, cache.nbytes)
        assert cache.nbytes <= budget
    assert most > budget * 3 // 4 and cache.evictions > 100 and cache.hit_tokens > 500
    for i in range(0, 500, 25):
        assert outcomes[i] == generate(loaded.model, prompts[i]), i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_on_a_gpu_shared_prefixes_equal_generate(tiny_decoders: dict[str, Path],
                                                 name: str) -> None:
    """The same on CUDA, with the decode steps replayed as CUDA graphs."""
    loaded = load_causal_lm(tiny_decoders[name], "float32", "cuda")
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8)
    run(engine, {"warm": chat(QUESTIONS[0])})
    outcomes = run(engine, {i: chat(q) for i, q in enumerate(QUESTIONS)} | {"twin": chat(
        QUESTIONS[1])})
    assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens > 0
    for i, question in enumerate(QUESTIONS):
        assert outcomes[i].tokens == generate(loaded.model, engine.encode_request(chat(question)))
    assert outcomes["twin"].tokens == outcomes[1].tokens
