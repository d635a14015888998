"""Log probabilities through the gateway and Triton, read by the official ``openai`` client.

SmolLM2 greedy: the chosen token is the most likely one, so each entry's token and logprob
equal its first top entry's; the tokens' bytes spell the answer; streamed entries join
into the non-streamed ones. That the numbers are the model's own ``log_softmax`` is
checked against ``transformers`` in ``tests/unit/test_llm_logprobs.py``.
"""

from __future__ import annotations

import math

import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.triton

ASK = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


def check_entry(entry, top: int) -> None:
    assert len(entry.top_logprobs) == top
    assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert entry.logprob <= 0
    best = entry.top_logprobs[0]
    assert (best.token, best.bytes) == (entry.token, entry.bytes)  # greedy: the argmax
    assert math.isclose(best.logprob, entry.logprob, abs_tol=1e-6)
    values = [item.logprob for item in entry.top_logprobs]
    assert values == sorted(values, reverse=True)


def test_chat_logprobs_streamed_and_not(client):
    answer = client.chat.completions.create(model="chat", messages=ASK, max_tokens=16,
                                            temperature=0, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens - (choice.finish_reason == "stop")
    for entry in content:
        check_entry(entry, 3)
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == choice.message.content

    chunks = list(client.chat.completions.create(
        model="chat", messages=ASK, max_tokens=16, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    # The same tokens and top tokens; the log-probabilities equal within float rounding: the
    # second request's prompt rows come from the engine's prefix cache, computed in another
    # pass than the first request's (1e-4 is far below any gap between the top tokens).
    assert [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.bytes, [t.token for t in e.top_logprobs]) for e in content]
    for ours, theirs in zip(streamed, content, strict=True):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.logprob for t in ours.top_logprobs] == pytest.approx(
            [t.logprob for t in theirs.top_logprobs], abs=1e-4)

    plain = client.chat.completions.create(model="chat", messages=ASK, max_tokens=16,
                                           temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_chat_logprobs_without_top_entries(client):
    answer = client.chat.completions.create(model="chat", messages=ASK, max_tokens=4,
                                            temperature=0.8, seed=1, logprobs=True)
    content = answer.choices[0].logprobs.content
    assert len(content) == 4
    assert all(entry.top_logprobs == [] and entry.logprob <= 0 for entry in content)


def test_completions_logprobs_streamed_and_not(client):
    answer = client.completions.create(model="chat", prompt=PROMPT, max_tokens=8,
                                       temperature=0, logprobs=3)
    choice = answer.choices[0]
    listed = choice.logprobs
    assert len(listed.tokens) == len(listed.token_logprobs) == len(listed.top_logprobs) == 8
    assert "".join(listed.tokens) == choice.text
    assert listed.text_offset == [sum(len(t) for t in listed.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(listed.tokens, listed.token_logprobs, listed.top_logprobs,
                                   strict=True):
        assert len(top) == 3
        assert max(top, key=top.get) == token
        assert math.isclose(top[token], logprob, abs_tol=1e-6)

    chunks = list(client.completions.create(model="chat", prompt=PROMPT, max_tokens=8,
                                            temperature=0, logprobs=3, stream=True))
    parts = [chunk.choices[0].logprobs for chunk in chunks
             if chunk.choices and chunk.choices[0].logprobs]
    assert [t for part in parts for t in part.tokens] == listed.tokens
    assert [v for part in parts for v in part.token_logprobs] == listed.token_logprobs
    assert [o for part in parts for o in part.text_offset] == listed.text_offset


@pytest.mark.parametrize(("route", "body", "field"), [
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("chat", {"logprobs": "yes"}, "logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"logprobs": 2, "top_logprobs": 2}, "top_logprobs"),
], ids=str)
def test_bad_logprobs_are_400_naming_the_field(client, route, body, field):
    with pytest.raises(openai.BadRequestError) as caught:
        if route == "chat":
            client.chat.completions.create(model="chat", messages=ASK, max_tokens=2,
                                           extra_body=body)
        else:
            client.completions.create(model="chat", prompt=PROMPT, max_tokens=2,
                                      extra_body=body)
    assert caught.value.body["param"] == field
    assert caught.value.body["message"].startswith(f"{field}:")
