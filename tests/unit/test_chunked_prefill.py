"""Chunked prefill: long prompts computed a chunk a step, between the decode steps of others.

Against ``transformers``' ``generate`` in float32 on tiny random models
(``tests/support/decoders.py``): a Llama, and a Mistral whose 8-token sliding window is
much shorter than the chunks, so a window misapplied across a chunk boundary would show.
Chunks are made small (16-24 tokens) so that prompts of a hundred tokens take several.
"""

from __future__ import annotations

import json
import random
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

from tests.support.decoders import DECODERS
from tests.support.llm import IdsEngine, Outcome, record, run
from tests.support.llm import generate_ids as generate
from tritonop_backend.llm.engine import CANCELLED, LLMEngine
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=12, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
NAMES = ["llama", "mistral"]


@pytest.fixture(scope="module")
def models(tiny_decoders: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_causal_lm(tiny_decoders[name], "float32", "cpu") for name in NAMES}


def ids_request(ids: list[int], **values: Any) -> GenerationRequest:
    return parse_request({"text_input": " ".join(map(str, ids)), **values}, POLICY)


def random_ids(rng: random.Random, vocab: int, count: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(count)]


def record_passes(engine: LLMEngine) -> list[tuple[int, int]]:
    """The (rows, tokens a row) of every prefill pass the engine runs from now on."""
    passes: list[tuple[int, int]] = []
    forward = engine._forward

    def recorded(ids: Any, *args: Any) -> Any:
        if ids.shape[1] > 1:
            passes.append(tuple(ids.shape))
        return forward(ids, *args)

    engine._forward = recorded  # type: ignore[method-assign]
    return passes


def drive(engine: LLMEngine, joining: dict[int, dict[Hashable, GenerationRequest]]
          ) -> tuple[dict[Hashable, Outcome], dict[Hashable, list[int]]]:
    """Run until idle; also, per request, how many tokens it had generated after each step
    (from the first step that found it running)."""
    outcomes: dict[Hashable, Outcome] = {}
    generated: dict[Hashable, dict[int, int]] = {}
    for step in range(1, 500):
        for request_id, item in joining.pop(step - 1, {}).items():
            engine.add(request_id, item)
        record(outcomes, engine.step(), step)
        for seq in engine._running:
            generated.setdefault(seq.request_id, {})[step] = len(seq.generated)
        if not engine.has_work() and not joining:
            return outcomes, generated
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
@pytest.mark.parametrize("cache", [True, False], ids=["prefix-cache", "no-cache"])
@pytest.mark.parametrize("name", NAMES)
def test_a_long_prompt_joins_in_chunks_while_the_others_decode(
    models: dict[str, LoadedModel], name: str, cache: bool, static_decode: bool
) -> None:
    """Three streams run; a 150-token prompt arrives and takes 7 chunks of 24 tokens. Every
    running stream gets a token at every one of those steps, and all outputs, the long
    prompt's too, equal ``generate``."""
    loaded = models[name]
    rng = random.Random(3)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4,
                       prefill_chunk_tokens=24, static_decode=static_decode,
                       prefix_cache_bytes=(1 << 20) if cache else 0)
    short = {i: random_ids(rng, vocab, length) for i, length in enumerate((5, 17, 22))}
    long = random_ids(rng, vocab, 150)
    requests: dict[Hashable, GenerationRequest] = {
        i: ids_request(ids, max_tokens=30) for i, ids in short.items()}
    outcomes, generated = drive(engine, {0: requests, 2: {"long": ids_request(long)}})
    for i, ids in short.items():
        assert outcomes[i].tokens == generate(loaded.model, ids, 30), i
    assert outcomes["long"].tokens == generate(loaded.model, long)
    # Added after step 2: chunks in steps 3 to 9, the last one with its first token.
    assert min(generated["long"]) == 9 and generated["long"][9] == 2
    for i in short:  # one token a step throughout, two in the first (prefill and decode)
        assert [generated[i][step] for step in range(1, 10)] == list(range(2, 11)), i


@pytest.mark.parametrize("name", NAMES)
def test_two_long_prompts_and_short_ones_arriving_together(
    models: dict[str, LoadedModel], name: str
) -> None:
    """One prompt is chunked at a time; the second long one waits for the first, short ones
    pass both; a second copy of a long prompt finds the first's blocks in the cache. Beside
    the short prompt, the first chunk is the short prompt's width, not a whole chunk."""
    loaded = models[name]
    rng = random.Random(4)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=6,
                       prefill_chunk_tokens=16)
    passes = record_passes(engine)
    prompts = {"long": random_ids(rng, vocab, 90), "short": random_ids(rng, vocab, 9),
               "other": random_ids(rng, vocab, 70)}
    prompts["twin"] = list(prompts["long"])
    outcomes, generated = drive(engine, {0: {key: ids_request(ids)
                                             for key, ids in prompts.items()}})
    for key, ids in prompts.items():
        assert outcomes[key].tokens == generate(loaded.model, ids), key
    assert min(generated["short"]) == 1
    assert passes[0] == (2, 9)  # the short prompt and the long one's first 9 tokens
    # 90 tokens: 9, five chunks of 16, and the last token
    assert min(generated["long"]) == 7 < min(generated["other"])
    # The twin computes 16 tokens (the width of the other's chunk in the same pass).
    assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens >= 90 - 16


def test_short_prompts_beside_a_chunk_are_not_padded_to_its_width(
    models: dict[str, LoadedModel]
) -> None:
    """Four short prompts arrive while a long one is in chunks: the pass that admits them
    computes 12 tokens a row (the longest of them), not the chunk's 32, and the long prompt
    moves on by those 12. Every output equals ``generate``."""
    loaded = models["llama"]
    rng = random.Random(6)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=6,
                       prefill_chunk_tokens=32)
    passes = record_passes(engine)
    long = random_ids(rng, vocab, 150)
    short = {i: random_ids(rng, vocab, n) for i, n in enumerate((5, 9, 12, 7))}
    outcomes, _ = drive(engine, {0: {"long": ids_request(long)},
                                 1: {i: ids_request(ids) for i, ids in short.items()}})
    assert passes[:3] == [(1, 32), (5, 12), (1, 32)]
    assert outcomes["long"].tokens == generate(loaded.model, long)
    for i, ids in short.items():
        assert outcomes[i].tokens == generate(loaded.model, ids), i


def test_copies_of_a_long_prompt_wait_for_its_chunks_and_take_them_from_the_cache(
    models: dict[str, LoadedModel]
) -> None:
    """Three copies of a 150-token prompt arrive together (``n=3`` from the gateway): one
    is computed in chunks, the copies wait and take its blocks from the cache, and no pass
    computes more than the prefill budget (they used to be admitted as copies of it and
    computed whole, three rows of 150 tokens, beside its first chunk)."""
    loaded = models["llama"]
    rng = random.Random(8)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4,
                       prefill_chunk_tokens=16, max_prefill_tokens=64)
    passes = record_passes(engine)
    long = random_ids(rng, vocab, 150)
    outcomes, _ = drive(engine, {0: {i: ids_request(long) for i in range(3)}})
    for i in range(3):
        assert outcomes[i].tokens == generate(loaded.model, long), i
    assert max(rows * width for rows, width in passes) <= 64, passes
    assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens >= 2 * 144


def test_prompts_found_in_the_cache_every_step_do_not_hold_a_chunk_to_a_token(
    models: dict[str, LoadedModel]
) -> None:
    """A cached 17-token prompt arrives again every step while a 150-token prompt is in
    chunks of 32: each pass beside it computes a quarter of a chunk at least (it used to
    shrink to the cached prompt's one token, and the long prompt took 150 steps)."""
    loaded = models["llama"]
    rng = random.Random(9)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8,
                       prefill_chunk_tokens=32)
    cached, long = random_ids(rng, vocab, 17), random_ids(rng, vocab, 150)
    drive(engine, {0: {"seed": ids_request(cached, max_tokens=1)}})
    passes = record_passes(engine)
    joining = {step: {f"again-{step}": ids_request(cached, max_tokens=1)} for step in range(1, 40)}
    outcomes, generated = drive(engine, {0: {"long": ids_request(long)}, **joining})
    assert outcomes["long"].tokens == generate(loaded.model, long)
    assert min(width for _, width in passes[:-1]) >= 8, passes  # the last: what was left
    assert min(generated["long"]) <= 150 // 8 + 2


def test_a_chat_through_the_template_in_chunks(models: dict[str, LoadedModel]) -> None:
    loaded = models["llama"]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2,
                       prefill_chunk_tokens=20)
    text = " ".join(["Name a package for playing music, and one for editing images."] * 4)
    messages = [{"role": "system", "content": "You answer in one line."},
                {"role": "user", "content": text}]
    request = parse_request({"text_input": json.dumps(messages), "prompt_format": "messages"},
                            POLICY)
    ids = engine.encode_request(request)
    assert len(ids) > 3 * 20
    assert run(engine, {"chat": request})["chat"].tokens == generate(loaded.model, ids)


def test_cancelling_a_prompt_midway_through_its_chunks(models: dict[str, LoadedModel]) -> None:
    """It ends with "cancelled" and gives its slot back; the others are unaffected."""
    loaded = models["mistral"]
    rng = random.Random(5)
    vocab = loaded.model.config.vocab_size
    engine = IdsEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2,
                       prefill_chunk_tokens=16)
    running, long, after = (random_ids(rng, vocab, n) for n in (12, 120, 40))
    engine.add("running", ids_request(running, max_tokens=20))
    engine.add("long", ids_request(long))
    outcomes: dict[Hashable, Outcome] = {}
    for step in range(1, 4):
        record(outcomes, engine.step(), step)
    assert "long" not in outcomes and engine._partial is not None
    # The prompt in chunks holds a slot: the gauge counts it, so a wait for idleness waits.
    assert engine.running == 2 and engine.waiting == 0
    assert engine.cancel("long")
    engine.add("after", ids_request(after))
    for step in range(4, 200):
        record(outcomes, engine.step(), step)
        if not engine.has_work():
            break
    assert outcomes["long"].last.finish_reason == CANCELLED and outcomes["long"].tokens == []
    assert outcomes["running"].tokens == generate(loaded.model, running, 20)
    assert outcomes["after"].tokens == generate(loaded.model, after)
    assert engine._partial is None and not engine.has_work() and engine.running == 0


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_architecture_with_cached_prefixes_and_chunks(
    tiny_decoders: dict[str, Path], name: str
) -> None:
    """Gemma's mixed sliding and full layers, Phi-3's fused projections, Qwen3's head size:
    a chat warms the prefix cache, then three more share its first blocks, in chunks of 16
    beside each other's decode steps; each equals ``generate``."""
    loaded = load_causal_lm(tiny_decoders[name], "float32", "cpu")
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4,
                       prefill_chunk_tokens=16)
    preamble = "Here is a list of packages: vim, emacs, nano, gimp, inkscape, vlc, mpv. "
    questions = ["Pick an editor.", "Pick a player for videos, and say why in a line.",
                 "Which one draws vector images?", "Name two of them."]

    def chat(question: str) -> GenerationRequest:
        messages = [{"role": "user", "content": preamble + question}]
        return parse_request({"text_input": json.dumps(messages),
                              "prompt_format": "messages"}, POLICY)

    outcomes = run(engine, {0: chat(questions[0])})
    outcomes |= run(engine, {i: chat(q) for i, q in enumerate(questions) if i},
                    joining={2: {"again": chat(questions[0])}})
    assert engine.prefix_cache is not None and engine.prefix_cache.hit_tokens > 0
    for key, question in [*enumerate(questions), ("again", questions[0])]:
        ids = engine.encode_request(chat(question))
        assert len(ids) > 2 * 16
        assert outcomes[key].tokens == generate(loaded.model, ids), key
