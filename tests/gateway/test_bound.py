"""The admission bound and the request parsing on their own, without Triton."""

from __future__ import annotations

import asyncio

import pytest

from tritonop.gateway.admission import AdmissionBound, Overloaded
from tritonop.gateway.config import Admission, ModelEntry, default_admission, gateway_config
from tritonop.gateway.errors import APIError
from tritonop.gateway.protocol import parse_chat, parse_completion, parse_json, parse_search
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
    ({"model": "chat", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
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
