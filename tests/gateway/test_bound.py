"""The admission bound and the request parsing on their own, without Triton."""

from __future__ import annotations

import asyncio

import pytest

from tests.gateway.conftest import llm
from tritonop.gateway.admission import AdmissionBound, Overloaded
from tritonop.gateway.config import (
    Admission,
    GatewayConfig,
    InputLimits,
    ModelEntry,
    default_admission,
    gateway_config,
)
from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import (
    MAX_BODY_BYTES,
    check_content_type,
    check_length,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_json,
    parse_search,
)
from tritonop.resources import iter_resources

MODELS = {"chat": ModelEntry("chat", "chat", Admission(1, 1), max_tokens_limit=100),
          "news": ModelEntry("news", "embedding", Admission(1, 1), max_top_k=10,
                             default_top_k=3)}


def test_bound_serves_in_order_refuses_beyond_the_queue_and_survives_cancellation():
    async def main() -> list[str]:
        bound = AdmissionBound(1, 2)
        order: list[str] = []

        async def job(name: str, hold: float) -> None:
            async with bound.place():
                order.append(name)
                await asyncio.sleep(hold)

        first = asyncio.create_task(job("a", 0.05))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(job(n, 0)) for n in ("b", "c")]
        await asyncio.sleep(0)
        assert (bound.in_flight, bound.waiting) == (1, 2)
        with pytest.raises(Overloaded):
            await bound.acquire()
        waiting[0].cancel()  # a client that leaves while waiting gives its place up
        await asyncio.gather(first, *waiting, return_exceptions=True)
        assert (bound.in_flight, bound.waiting) == (0, 0)
        return order

    assert asyncio.run(main()) == ["a", "c"]


def test_defaults_follow_batching_and_spec_api_overrides(tmp_path):
    examples = {r.name: r for r in iter_resources(["examples/chat.yaml",
                                                   "examples/news-search.yaml"])}
    chat, news = examples["chat"], examples["news"]
    assert default_admission(chat.spec) == Admission(chat.spec.engine.max_sequences,
                                                     chat.spec.engine.max_waiting)
    encoder = news.spec.stages.encoder
    assert default_admission(news.spec).max_in_flight == encoder.max_batch_size * \
        encoder.instances
    config = gateway_config(list(examples.values()))
    assert set(config.models) == {"chat", "news"}
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("body, param", [
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 101},
     "max_tokens"),
    ({"model": "chat", "messages": [{"role": "user", "content": "x"}],
      "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "chat", "messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
    ({"model": "chat", "messages": [{"role": "tool", "content": "x"}]},
     "messages[0].tool_call_id"),
    ({"model": "news", "messages": [{"role": "user", "content": "x"}]}, "model"),
])
def test_chat_errors_name_the_field(body, param):
    with pytest.raises(APIError) as caught:
        parse_chat(body, MODELS)
    assert caught.value.param == param and caught.value.status == 400
    assert caught.value.message.startswith(param)


def test_unknown_model_is_404():
    with pytest.raises(APIError) as caught:
        parse_search({"model": "nope", "text": "x"}, MODELS)
    assert caught.value.status == 404 and caught.value.param == "model"


def test_valid_bodies_become_model_inputs():
    args = parse_chat({"model": "chat", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"}], "max_completion_tokens": 5, "top_k": 4,
        "stop": "\n", "stream": True, "stream_options": {"include_usage": True}}, MODELS)
    assert args.prompt_format == "messages" and args.include_usage
    assert args.sampling == {"max_tokens": 5, "top_k": 4} and args.stop == ("\n",)
    assert '"role": "system"' in args.prompt
    completion = parse_completion({"model": "chat", "prompt": ["Once"]}, MODELS)
    assert (completion.prompt, completion.prompt_format) == ("Once", "raw")
    assert parse_search({"model": "news", "query": "q"}, MODELS).num_results == 3


@pytest.mark.parametrize("raw", [b"\xff", b"[]", b"{", b'{"a": NaN}', b"[" * 50_000])
def test_bodies_that_are_not_json_objects_are_400(raw):
    with pytest.raises(APIError) as caught:
        parse_json(raw)
    assert caught.value.status == 400 and caught.value.param == "body"


def test_the_llm_model_reads_the_prompt_formats_the_gateway_sends():
    from tritonop_backend.errors import RequestError
    from tritonop_backend.llm.params import GenerationPolicy, parse_request

    policy = GenerationPolicy()
    turns = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]'
    chat = parse_request({"text_input": turns, "prompt_format": b"messages"}, policy)
    assert chat.messages == (("system", "Be brief."), ("user", "Hi")) and not chat.raw
    raw = parse_request({"text_input": "Once upon", "prompt_format": "raw"}, policy)
    assert raw.raw and raw.messages is None
    plain = parse_request({"text_input": "Hi"}, policy)  # what /generate clients send
    assert not plain.raw and plain.messages is None
    for values, field in [({"text_input": "Hi", "prompt_format": "yaml"}, "prompt_format"),
                          ({"text_input": "[1]", "prompt_format": "messages"}, "messages[0]"),
                          ({"text_input": "{", "prompt_format": "messages"}, "text_input")]:
        with pytest.raises(RequestError) as caught:
            parse_request(values, policy)
        assert caught.value.field == field


SMALL = InputLimits(max_embedding_inputs=4, max_input_characters=10)
BOUNDED = {"chat": ModelEntry("chat", "chat", Admission(1, 1), max_tokens_limit=100,
                              limits=SMALL),
           "news": ModelEntry("news", "embedding", Admission(1, 1), max_top_k=10,
                              default_top_k=3, limits=SMALL)}
USER = {"role": "user", "content": "x" * 6}


@pytest.mark.parametrize("parse, body, param, bound", [
    (parse_embeddings, {"model": "news", "input": ["a"] * 5}, "input", "at most 4 texts"),
    (parse_embeddings, {"model": "news", "input": ["ok", " \n"]}, "input[1]", "empty"),
    (parse_embeddings, {"model": "news", "input": ""}, "input", "empty"),
    (parse_embeddings, {"model": "news", "input": ["ok", "x" * 11]}, "input[1]",
     "at most 10 characters"),
    (parse_search, {"model": "news", "text": "x" * 11}, "text", "at most 10 characters"),
    (parse_search, {"model": "news", "query": "x" * 11}, "query", "at most 10 characters"),
    (parse_chat, {"model": "chat", "messages": [USER, USER]}, "messages",
     "at most 10 characters (all message contents together), got 12"),
    (parse_completion, {"model": "chat", "prompt": "x" * 11}, "prompt",
     "at most 10 characters"),
    (parse_chat, {"model": "chat", "messages": [{"role": "user", "content": "x"}],
                  "stop": ["y" * 200, "z" * 57]}, "stop", "at most 256 characters in all"),
])
def test_inputs_beyond_the_model_limits_are_400s_naming_the_field_and_the_bound(
        parse, body, param, bound):
    with pytest.raises(APIError) as caught:
        parse(body, BOUNDED)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.message.startswith(f"{param}: ") and bound in caught.value.message


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


HI = b'"messages": [{"role": "user", "content": "x"}]'


@pytest.mark.parametrize("parse, body, param, problem", [
    # Numbers too large for a float are out of range, not a fault.
    (parse_chat, b'{"model": "chat", ' + HI + b', "temperature": 1' + b"0" * 400 + b"}",
     "temperature", "must lie in"),
    # Unpaired surrogates anywhere (JSON escapes can carry them, UTF-8 cannot), by field.
    (parse_chat, b'{"model": "chat", ' + HI + b', "tools": [{"type": "function", '
     b'"function": {"name": "f", "description": "\\udc00"}}]}',
     "tools[0].function.description", "unpaired surrogate"),
    (parse_chat, b'{"\\ud800": 1}', "body", "unpaired surrogate"),
    (parse_search, b'{"model": "news", "text": "a", "filter": {"\\ud800": "x"}}', "filter",
     "unpaired surrogate"),
    # Nesting that later steps would write out again by recursion.
    (parse_chat, b'{"model": "chat", ' + HI + b', "response_format": ' + b'{"a": ' * 70
     + b"1" + b"}" * 71, "response_format" + ".a" * 63, "nests deeper than 64 levels"),
])
def test_bodies_that_used_to_fail_inside_are_400s_naming_the_field(parse, body, param,
                                                                    problem):
    with pytest.raises(APIError) as caught:
        parse(parse_json(body), MODELS)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    assert problem in caught.value.message


def test_a_conversation_is_bounded_in_messages_and_in_the_ids_and_names_of_calls():
    many = {"model": "chat", "messages": [{"role": "user", "content": ""}] * 2049}
    with pytest.raises(APIError) as caught:
        parse_chat(many, BOUNDED)
    assert caught.value.param == "messages" and "at most 2048 messages" in caught.value.message
    long_ids = {"model": "chat", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "id": "i" * 5}]},
        {"role": "tool", "content": "", "tool_call_id": "i" * 5}]}
    with pytest.raises(APIError) as caught:
        parse_chat(long_ids, BOUNDED)  # 1 + 5 + 1 + 2 + 5 characters: over 10
    assert caught.value.param == "messages" and "got 14" in caught.value.message


def test_inputs_at_the_limits_pass():
    assert len(parse_embeddings({"model": "news", "input": ["x" * 10] * 4}, BOUNDED).texts) == 4
    parse_chat({"model": "chat", "messages": [{"role": "user", "content": "x" * 10}],
                "stop": ["y" * 256]}, BOUNDED)


@pytest.mark.parametrize("value", ["application/x-www-form-urlencoded", "text/plain",
                                   "multipart/form-data; boundary=x", "application/jsonx",
                                   None, ""])
def test_bodies_not_declared_json_are_415_naming_content_type(value):
    with pytest.raises(APIError) as caught:
        check_content_type(value)
    assert caught.value.status == 415 and caught.value.param == "Content-Type"
    assert "application/json" in caught.value.message


def test_json_content_types_with_parameters_pass():
    for value in ("application/json", "Application/JSON; charset=utf-8"):
        check_content_type(value)


def test_a_declared_length_above_the_limit_is_413_before_reading():
    check_length(str(MAX_BODY_BYTES))
    with pytest.raises(APIError) as caught:
        check_length(str(512 * 1024 * 1024))
    assert caught.value.status == 413 and str(MAX_BODY_BYTES) in caught.value.message


def test_limits_travel_from_the_spec_to_the_gateway_document():
    chat = llm("chat", api={"limits": {"maxEmbeddingInputs": 7, "streamStallSeconds": 2.5}})
    config = gateway_config([chat])
    assert config.models["chat"].limits == InputLimits(
        max_embedding_inputs=7, stream_stall_seconds=2.5)
    assert GatewayConfig.from_json(config.to_json()) == config
