"""``tool_choice: "auto"``: free text until a call begins, the call's grammar from there.

The engine runs in process on the tiny decoders carrying the families' templates; an
untrained model does not call tools by itself, so the first tokens of an answer are
scripted (a large bias on the script's next token, before the grammar's mask), and what
follows the call's start is the model's own, masked. The references are independent:
``jsonschema`` for the arguments, the engine without any grammar for the free text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Hashable, Sequence
from typing import Any

import jsonschema
import pytest
import torch

from tests.support.llm import Outcome, run
from tests.support.tool_templates import TOOL_DECODERS, make_tool_decoder
from tests.unit.test_llm_chat_tools import (
    HISTORY,
    SCHEMAS,
    TOOLS,
    engine_of,
    gateway_args,
    model_request,
)
from tritonop.gateway.app import _completion_body, _StreamedChoice
from tritonop.gateway.backend import Piece
from tritonop.gateway.tools import parse_auto
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.grammar import CallWatch, Trigger
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request
from tritonop_backend.llm.sampling import RowParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = tuple(SCHEMAS)
ASK = HISTORY[1:2]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    root = tmp_path_factory.mktemp("trigger-decoders")
    return {name: load_causal_lm(make_tool_decoder(name, root / name), "float32", "cpu")
            for name in TOOL_DECODERS}


def scripted(engine: LLMEngine, scripts: dict[Hashable, Sequence[int]]) -> LLMEngine:
    """The engine, its requests' first tokens pushed to ``scripts[request_id]``."""
    sample_and_emit = engine._sample_and_emit

    def biased(logits: torch.Tensor, rows: tuple[int, int], params: RowParams) -> Any:
        logits = logits.clone()
        for row, seq in enumerate(engine._running[rows[0]:rows[1]]):
            script = scripts.get(seq.request_id, ())
            if len(seq.generated) < len(script):
                logits[row, script[len(seq.generated)]] += 1000.0
        return sample_and_emit(logits, rows, params)

    engine._sample_and_emit = biased  # type: ignore[method-assign]
    return engine


def free(request: GenerationRequest, policy: GenerationPolicy) -> GenerationRequest:
    """The same request without any grammar."""
    assert request.response_format is not None
    return parse_request({"text_input": request.prompt, "prompt_format": "messages",
                          "max_tokens": request.params.max_tokens, "temperature": 0.0}, policy)


def valid_calls(text: str) -> list[tuple[str, str]]:
    """The calls the gateway reads from an ``auto`` answer, each checked by jsonschema."""
    _, calls = parse_auto(text, NAMES)
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return calls


def invalid(text: str) -> bool:
    """Whether an answer carries no call that parses and validates."""
    try:
        return not valid_calls(text)
    except (jsonschema.ValidationError, ValueError):
        return True


def control(engine: LLMEngine, name: str) -> int:
    token = engine.tokenizer.convert_tokens_to_ids(name)
    assert isinstance(token, int) and token != engine.tokenizer.unk_token_id
    return token


def scripts_of(engine: LLMEngine, family: str) -> dict[str, list[int]]:
    """Answers that begin a call, in each of the family's ways."""
    words = engine.tokenizer
    if family == "qwen2.5":  # the marker after some text, split over several tokens
        ids = words("Let me look. <tool_call>", add_special_tokens=False)["input_ids"]
        assert len(ids) > 2
        return {"text then marker": ids}
    if family in ("mistral-v3", "mistral-v11"):
        return {"control": [control(engine, "[TOOL_CALLS]")]}
    return {"control": [control(engine, "<|python_tag|>")],
            "first brace": words("{", add_special_tokens=False)["input_ids"]}


@pytest.mark.parametrize("family", list(TOOL_DECODERS))
def test_an_auto_call_follows_its_schema_from_where_it_begins(
        family: str, models: dict[str, LoadedModel]) -> None:
    engine = engine_of(models[family])
    request = model_request(gateway_args(ASK, tools=TOOLS), engine.policy)
    assert request.response_format is not None and request.response_format.trigger
    scripts = scripts_of(engine, family)
    outcomes = run(scripted(engine, scripts), dict.fromkeys(scripts, request))
    for key, outcome in outcomes.items():
        assert outcome.last.finish_reason == "stop", (key, outcome.text)
        calls = valid_calls(outcome.text)
        assert 1 <= len(calls) <= (1 if family == "llama-3.1" else 8), (key, outcome.text)
        if key == "text then marker":
            assert parse_auto(outcome.text, NAMES)[0] == "Let me look."
    # The same scripted starts without the grammar: the untrained model writes no valid call.
    unconstrained = run(scripted(engine_of(models[family]), scripts),
                        {key: free(request, engine.policy) for key in scripts})
    assert all(invalid(outcome.text) for outcome in unconstrained.values())


@pytest.mark.parametrize("family", ["qwen2.5", "mistral-v3", "mistral-v11"])
def test_an_answer_that_begins_no_call_is_not_constrained(
        family: str, models: dict[str, LoadedModel]) -> None:
    engine = engine_of(models[family])
    request = model_request(gateway_args(ASK, tools=TOOLS), engine.policy, max_tokens=120)
    auto = run(engine, {"auto": request})["auto"]
    plain = run(engine_of(models[family]), {"free": free(request, engine.policy)})["free"]
    assert auto.tokens == plain.tokens and len(auto.tokens) == 120
    assert auto.last.finish_reason == "length"
    assert "<tool_call>" not in auto.text
    if family.startswith("mistral"):
        assert control(engine, "[TOOL_CALLS]") not in auto.tokens


def test_a_batch_mixes_auto_required_and_free_answers(
        models: dict[str, LoadedModel]) -> None:
    loaded = models["qwen2.5"]
    policy = engine_of(loaded).policy
    auto = model_request(gateway_args(ASK, tools=TOOLS), policy, max_tokens=150)
    required = model_request(gateway_args(ASK, tools=TOOLS, tool_choice="required"), policy,
                             max_tokens=150)
    plain = model_request(gateway_args(ASK), policy, max_tokens=150)
    marker = loaded.tokenizer("Sure. <tool_call>", add_special_tokens=False)["input_ids"]

    def batch(quiet: GenerationRequest) -> dict[Hashable, Outcome]:
        requests = {"calling": auto, "required": required, "quiet": quiet, "plain": plain}
        engine = LLMEngine(loaded.model, loaded.tokenizer, policy, max_sequences=4)
        return run(scripted(engine, {"calling": marker}), requests)

    mixed = batch(auto)
    reference = batch(free(auto, policy))  # the same batch, the quiet row without a grammar
    assert parse_auto(mixed["calling"].text, NAMES)[0] == "Sure."
    assert valid_calls(mixed["calling"].text) and valid_calls(mixed["required"].text)
    assert mixed["quiet"].tokens == reference["quiet"].tokens
    assert mixed["plain"].tokens == reference["plain"].tokens
    assert "<tool_call>" not in mixed["quiet"].text


def pieces_of(outcome: Outcome) -> list[Piece]:
    """The engine's events as the gateway receives them (one Triton response each)."""
    return [Piece(event.text, event.finish_reason, event.prompt_tokens,
                  event.completion_tokens) for event in outcome.events]


@pytest.mark.parametrize("family", ["mistral-v3", "mistral-v11", "llama-3.1"])
def test_a_control_token_call_after_text_is_content_then_a_call(
        family: str, models: dict[str, LoadedModel]) -> None:
    """Text, then the family's control token: the gateway answers the text as ``content``
    and the call as ``tool_calls`` (``finish_reason: tool_calls``), streamed (content
    deltas, then the call's) and not, as it answers a call at the start."""
    engine = engine_of(models[family])
    args = gateway_args(ASK, tools=TOOLS, parallel_tool_calls=False)
    request = model_request(args, engine.policy)
    marker = {"mistral-v3": "[TOOL_CALLS]", "mistral-v11": "[TOOL_CALLS]",
              "llama-3.1": "<|python_tag|>"}[family]
    before = "Let me look it up. "
    script = [*engine.tokenizer(before, add_special_tokens=False)["input_ids"],
              control(engine, marker)]
    outcome = run(scripted(engine, {"after text": script}), {"after text": request})[
        "after text"]
    assert outcome.tokens[:len(script)] == script
    assert outcome.last.finish_reason == "stop", outcome.text
    pieces = pieces_of(outcome)

    body = _completion_body("chat.completion", args, [("".join(p.text for p in pieces),
                                                       pieces[-1], None)], {})
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] == before.strip()
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        SCHEMAS[call["function"]["name"]])

    streamed = _StreamedChoice(0, "chat.completion", args.tools)
    entries = [entry for piece in pieces for entry in streamed.pieces(piece)]
    deltas = [entry["delta"] for entry in entries]
    kinds = ["content" if "content" in d else "tool_calls" for d in deltas if d]
    assert kinds == sorted(kinds) and "tool_calls" in kinds  # the text first, then the call
    assert "".join(d.get("content", "") for d in deltas).strip() == before.strip()
    (named,) = [d["tool_calls"][0] for d in deltas if "tool_calls" in d
                and "id" in d["tool_calls"][0]]
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas
                        if "tool_calls" in d)
    assert named["index"] == 0 and named["function"]["name"] == call["function"]["name"]
    jsonschema.validate(json.loads(arguments), SCHEMAS[named["function"]["name"]])
    assert [entry["finish_reason"] for entry in entries] == [None] * (len(entries) - 1) + [
        "tool_calls"]


def test_a_call_start_its_grammar_refuses_ends_the_answer(
        models: dict[str, LoadedModel]) -> None:
    """A freely sampled token that runs past the start of a call into what the grammar
    refuses: the answer ends there, as text, rather than go on unchecked. (The tiny
    vocabularies have no such token, so the trigger here is a first ``L``, which Mistral's
    grammar of calls, ``[`` after blanks, refuses.)"""
    engine = engine_of(models["mistral-v3"])
    request = model_request(gateway_args(ASK, tools=TOOLS), engine.policy, max_tokens=40)
    assert request.response_format is not None
    odd = dataclasses.replace(request, response_format=dataclasses.replace(
        request.response_format, trigger=Trigger(first="L")))
    script = engine.tokenizer("Let", add_special_tokens=False)["input_ids"]
    outcomes = run(scripted(engine, {"odd": script, "usual": script}),
                   {"odd": odd, "usual": request})
    assert outcomes["odd"].tokens == script[:1] and outcomes["odd"].last.finish_reason == "stop"
    assert outcomes["usual"].tokens[:len(script)] == script
    assert len(outcomes["usual"].tokens) == 40  # the same start, free: it goes on


# The watch alone --------------------------------------------------------------------------


def watched(trigger: Trigger, pieces: list[bytes], controls: frozenset[int] = frozenset()
            ) -> list[int | None]:
    watch = CallWatch(trigger, controls)
    return [watch.push(index, piece) for index, piece in enumerate(pieces)]


def test_the_watch_finds_a_marker_split_over_tokens() -> None:
    hermes = Trigger(marker="<tool_call>")
    assert watched(hermes, [b"Hi", b" <to", b"ol_c", b"all>\n"]) == [None, None, None, 3]
    assert watched(hermes, [b"<tool_call>"]) == [1]
    # From the start of the character before it, which a grammar can read.
    assert watched(hermes, [b"caf\xc3", b"\xa9<tool_call>"]) == [None, 2]
    assert watched(hermes, [b"<tool", b"_cal", b"ls> are"]) == [None, None, None]


def test_the_watch_sees_control_tokens_and_first_characters() -> None:
    mistral = Trigger(controls=("[TOOL_CALLS]",), first="[")
    assert watched(mistral, [b"Ok", b"\xff[TOOL_CALLS]"], frozenset({1})) == [None, 0]
    assert watched(mistral, [b" ", b"\n [{"]) == [None, 1]
    assert watched(mistral, [b"a", b" [1]"]) == [None, None]
