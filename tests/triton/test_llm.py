"""LLMService on a real tritonserver: greedy equals transformers, streaming, batching, errors.

A second server (its own fixture) serves SmolLM2-135M-Instruct twice:

* ``chat``: up to 8 sequences decode together, in float32: greedy output must equal
  ``generate`` exactly whatever shares the batch, which only float32 guarantees (the
  bfloat16 that ``dtype: auto`` picks on a CPU with native support is checked in
  ``tests/unit/test_llm_dtype.py``);
* ``solo``: one slot and one waiting place, to see queueing, rejection and cancellation;
  ``dtype: auto``, as shipped.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.support.triton import API, RunningTriton, running_triton
from tritonop.resources import parse_resource
from tritonop.runtime.metrics import model_metric

pytestmark = pytest.mark.triton

PROMPTS = ["What is the capital of France?", "Name three colors.",
           "Write one sentence about the sea."]


def llm(name: str, dtype: str = "auto", **spec: Any):
    body = {"apiVersion": API, "kind": "LLMService", "metadata": {"name": name}, "spec": {
        "model": {"maxContextLength": 512, "dtype": dtype},
        "generation": {"limits": {"maxTokens": 256}, "defaults": {"maxTokens": 32}},
        **spec}}
    return parse_resource(body)


def seed_model(smol_dir: Path, root: Path, name: str) -> None:
    """Hard-link the session's prepared model in place, so preparing finds it current."""
    target = root / name / "model"
    if not target.exists():
        shutil.copytree(smol_dir, target, copy_function=_link)


def _link(source: str, destination: str) -> None:
    try:
        Path(destination).hardlink_to(source)
    except OSError:
        shutil.copy2(source, destination)


@pytest.fixture(scope="module")
def llm_triton(tmp_path_factory, smol_dir) -> Iterator[RunningTriton]:
    root = tmp_path_factory.mktemp("llm-artifacts")
    resources = [llm("chat", "float32",
                     engine={"maxSequences": 8, "maxWaiting": 16, "threads": 2}),
                 llm("solo", engine={"maxSequences": 1, "maxWaiting": 1, "threads": 1})]
    for resource in resources:
        seed_model(smol_dir, root, resource.name)
    with running_triton(resources, root, tmp_path_factory.mktemp("llm-triton")) as running:
        yield running


def _generate_reference(smol_dir: Path, dtype_name: str) -> Any:
    """Greedy completions from transformers' own generate on a stock model, one thread."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=dtype).eval()

    def complete(prompt: str, max_tokens: int) -> tuple[str, int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as the served models; bfloat16 sums may split by thread
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     do_sample=False, max_new_tokens=max_tokens)
        finally:
            torch.set_num_threads(before)
        new = out[0, ids.shape[1]:].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    return complete


@pytest.fixture(scope="module")
def reference(smol_dir):
    """Greedy completions from transformers' own generate, the independent reference."""
    return _generate_reference(smol_dir, "float32")


def generate(triton: RunningTriton, model: str, **body: Any) -> tuple[int, dict[str, Any]]:
    return triton.generate(model, body)


def test_greedy_alone_equals_transformers_generate(llm_triton, reference):
    for prompt in PROMPTS:
        status, body = generate(llm_triton, "chat", text_input=prompt, max_tokens=24,
                                temperature=0)
        assert status == 200, body
        text, count = reference(prompt, 24)
        assert (body["text_output"], body["completion_tokens"]) == (text, count)
        assert body["finish_reason"] in ("stop", "length")


def test_greedy_among_other_requests_equals_transformers_generate(llm_triton, reference):
    others = [dict(text_input="Tell me a long story about a dragon.", max_tokens=60,
                   temperature=0.9, top_k=40, seed=1),
              dict(text_input="Hi", max_tokens=5, temperature=1.2, top_p=0.8),
              dict(text_input="List ten fruits, one per line, with a short note on each.",
                   max_tokens=48, temperature=0.7, repetition_penalty=1.3, seed=7),
              dict(text_input="Count to twenty.", max_tokens=40, temperature=0.5)]
    greedy = [dict(text_input=p, max_tokens=24, temperature=0) for p in PROMPTS]
    with ThreadPoolExecutor(len(others) + len(greedy)) as pool:
        background = [pool.submit(generate, llm_triton, "chat", **body) for body in others]
        time.sleep(0.3)  # greedy requests join a batch that is already decoding
        answers = list(pool.map(lambda body: generate(llm_triton, "chat", **body), greedy))
        assert all(f.result()[0] == 200 for f in background)
    for prompt, (status, body) in zip(PROMPTS, answers, strict=True):
        assert status == 200
        assert (body["text_output"], body["completion_tokens"]) == reference(prompt, 24)


def test_as_shipped_greedy_alone_equals_generate_in_bfloat16(llm_triton, smol_dir):
    """``solo`` runs ``dtype: auto`` as the example ships it: on a CPU with native bfloat16
    that is bfloat16 with the linear layers packed for oneDNN (``llm/packing.py``) and
    grouped decode attention (``llm/attention.py``). Alone, a greedy request equals
    generate in bfloat16 on a stock copy of the model."""
    from tritonop_backend.llm.loading import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("dtype auto is float32 on this CPU (covered by the chat model's tests)")
    reference = _generate_reference(smol_dir, "bfloat16")
    for prompt in PROMPTS[:2]:
        status, body = generate(llm_triton, "solo", text_input=prompt, max_tokens=24,
                                temperature=0)
        assert status == 200, body
        assert (body["text_output"], body["completion_tokens"]) == reference(prompt, 24)


def sse_events(response: requests.Response) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines(chunk_size=None):  # as bytes arrive, no buffering
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


def test_streamed_events_arrive_early_and_add_up_to_the_whole_text(llm_triton):
    body = {"text_input": "Write a haiku about batching.", "max_tokens": 48,
            "temperature": 0, "stream": True}
    whole = generate(llm_triton, "chat", **{**body, "stream": False})[1]
    with requests.post(f"{llm_triton.http}/v2/models/chat/generate_stream", json=body,
                       stream=True, timeout=120) as response:
        stream = sse_events(response)
        events = [next(stream)]
        # The first event is here while the sequence is still decoding: it was sent as
        # soon as it was produced, not at the end.
        assert metric(llm_triton, "tritonop_llm_running_sequences", "chat") >= 1
        events += list(stream)
    assert len(events) > 3
    assert "".join(event["text_output"] for event in events) == whole["text_output"]
    final = events[-1]
    assert final["finish_reason"] in ("stop", "length")
    assert final["completion_tokens"] == whole["completion_tokens"]
    assert all(event["finish_reason"] == "" for event in events[:-1])


def test_grpc_streaming(llm_triton):
    received: list[Any] = []
    done = threading.Event()

    def callback(result, error):
        received.append(error or result)
        final = error is not None or result.get_response().parameters[
            "triton_final_response"].bool_param
        if final:
            done.set()

    client = grpcclient.InferenceServerClient(llm_triton.server.grpc_url)
    inputs = []
    for name, value, dtype in [("text_input", np.array([[b"Say hello."]], dtype=object), "BYTES"),
                               ("max_tokens", np.array([[12]], np.int32), "INT32"),
                               ("temperature", np.array([[0.0]], np.float32), "FP32"),
                               ("stream", np.array([[True]]), "BOOL")]:
        tensor = grpcclient.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.start_stream(callback=callback)
    client.async_stream_infer("chat", inputs, enable_empty_final_response=True)
    assert done.wait(120)
    client.stop_stream()
    texts = [r.as_numpy("text_output")[0, 0].decode() for r in received
             if not isinstance(r, Exception) and r.as_numpy("text_output") is not None]
    expected = generate(llm_triton, "chat", text_input="Say hello.", max_tokens=12,
                        temperature=0)[1]["text_output"]
    assert "".join(texts) == expected


def metric(triton: RunningTriton, name: str, model: str) -> float:
    page = requests.get(f"http://localhost:{triton.server.ports.metrics}/metrics",
                        timeout=10).text
    assert name in page, f"{name} not in /metrics"
    return model_metric(page, name, model)


def test_concurrent_requests_share_decode_steps(llm_triton):
    """Continuous batching, seen in the engine's own counters: with 8 requests at once,
    each forward pass produces several tokens (one per running sequence)."""
    steps = metric(llm_triton, "tritonop_llm_steps_total", "chat")
    tokens = metric(llm_triton, "tritonop_llm_generated_tokens_total", "chat")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: generate(
            llm_triton, "chat", text_input=f"Tell me fact number {i} about space.",
            max_tokens=32, temperature=0.8, seed=i, stop=["\n\n\n"]), range(8)))
    assert all(status == 200 for status, _ in answers)
    new_steps = metric(llm_triton, "tritonop_llm_steps_total", "chat") - steps
    new_tokens = metric(llm_triton, "tritonop_llm_generated_tokens_total", "chat") - tokens
    assert new_tokens == sum(body["completion_tokens"] for _, body in answers)
    assert new_tokens / new_steps >= 3, f"{new_tokens} tokens in {new_steps} steps"


def test_a_short_request_after_a_long_one_finishes_first(llm_triton):
    finished: list[str] = []

    def run(name: str, max_tokens: int) -> None:
        generate(llm_triton, "chat", text_input="Describe the ocean in detail.",
                 max_tokens=max_tokens, temperature=0.7, seed=3, stop=["zzzz"])
        finished.append(name)

    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(run, "long", 200)
        time.sleep(1.0)
        short = pool.submit(run, "short", 4)
        short.result(), long.result()
    assert finished == ["short", "long"]


def test_disconnected_stream_frees_its_slot(llm_triton):
    body = {"text_input": "Tell me an endless story.", "max_tokens": 256, "temperature": 0.8,
            "stream": True}
    with requests.post(f"{llm_triton.http}/v2/models/solo/generate_stream", json=body,
                       stream=True, timeout=120) as response:
        for event in sse_events(response):
            if event["text_output"]:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while metric(llm_triton, "tritonop_llm_running_sequences", "solo") > 0:
        assert time.monotonic() < deadline, "the cancelled sequence kept its slot"
        time.sleep(0.1)
    status, answer = generate(llm_triton, "solo", text_input="Hi", max_tokens=4)
    assert status == 200 and answer["completion_tokens"] > 0


def test_beyond_the_queue_bound_requests_are_rejected_unavailable(llm_triton):
    slow = {"text_input": "Tell me a long story.", "max_tokens": 200, "temperature": 0.8,
            "stop": ["zzzz"]}
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(generate, llm_triton, "solo", **slow) for _ in range(2)]
        deadline = time.monotonic() + 60
        while metric(llm_triton, "tritonop_llm_waiting_requests", "solo") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        # One decoding, one waiting: the next has no place, and hears so at once.
        started = time.monotonic()
        status, answer = generate(llm_triton, "solo", text_input="one more")
        took = time.monotonic() - started
        stream_error = stream_errors(llm_triton, "solo", b"and one more")
        assert all(f.result()[0] == 200 for f in running)
    # The model answers UNAVAILABLE; Triton 2.51 (the pinned server) turns every model error
    # of /generate into a 400 (its /infer and gRPC keep the code; /infer does not take
    # decoupled models). The gateway answers 429 before Triton is asked (tests/gateway).
    assert status == 400, answer
    assert "the service is at capacity: 1 sequences running and 1 waiting" in answer["error"]
    assert took < 1.0
    assert "the service is at capacity" in stream_error


def stream_errors(triton: RunningTriton, model: str, prompt: bytes) -> str:
    """The error message a gRPC stream gets for ``prompt`` (errors in a stream carry
    no status code, only the message)."""
    client = grpcclient.InferenceServerClient(triton.server.grpc_url)
    errors: list[Any] = []
    finished = threading.Event()
    client.start_stream(callback=lambda result, error: (errors.append(error), finished.set()))
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[prompt]], dtype=object))
    client.async_stream_infer(model, [text])
    assert finished.wait(60)
    client.stop_stream()
    assert errors[0] is not None, "the request was not rejected"
    return errors[0].message()


BAD = [
    ({"text_input": ""}, "text_input: must not be empty"),
    ({"text_input": "   "}, "text_input: must not be empty"),
    ({"text_input": "word " * 600}, "text_input"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens: must lie in [1, 256], got 0"),
    ({"text_input": "hi", "max_tokens": 257}, "max_tokens: must lie in [1, 256], got 257"),
    ({"text_input": "hi", "temperature": -0.5}, "temperature: must be >= 0"),
    ({"text_input": "hi", "top_p": 0}, "top_p: must lie in (0, 1]"),
    ({"text_input": "hi", "top_p": 1.5}, "top_p: must lie in (0, 1]"),
    ({"text_input": "hi", "top_k": -1}, "top_k: must be >= 0"),
    ({"text_input": "hi", "repetition_penalty": 0}, "repetition_penalty: must be > 0"),
    ({"text_input": "hi", "stop": ["s" * 1000] * 16},
     "stop: stop strings may hold at most 256 characters in all, got 16000"),
]


@pytest.mark.parametrize(("body", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_is_a_400_naming_the_parameter(llm_triton, body, message):
    status, answer = generate(llm_triton, "chat", **body)
    assert status == 400, answer
    assert message in answer["error"]
    status, answer = generate(llm_triton, "chat", text_input="Hi", max_tokens=3)
    assert status == 200 and answer["completion_tokens"] > 0


OVER_THE_BOUND = [
    ({"text_input": "word " * 6554},
     "text_input: the prompt is 32770 characters long; at most 32768 are allowed"),
    ({"text_input": "word " * 6554, "prompt_format": "raw"},
     "text_input: the prompt is 32770 characters long; at most 32768 are allowed"),
    ({"text_input": json.dumps([{"role": "system", "content": "s" * 16384},
                                {"role": "user", "content": "u" * 16385}]),
      "prompt_format": "messages"},
     "messages: the contents are 32769 characters long together; at most 32768 are allowed"),
]


@pytest.mark.parametrize(("body", "message"), OVER_THE_BOUND, ids=["text", "raw", "messages"])
def test_a_prompt_over_the_character_bound_is_a_400_and_others_are_answered(
        llm_triton, reference, body, message):
    """api.limits.maxInputCharacters (default 32768) is checked before the prompt is
    templated or tokenized; a request sent in the same moment is answered as usual."""
    good = dict(text_input=PROMPTS[0], max_tokens=8, temperature=0)
    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(generate, llm_triton, "chat", **body)
        answered = pool.submit(generate, llm_triton, "chat", **good)
        (status, answer), (good_status, good_answer) = refused.result(), answered.result()
    assert status == 400, answer
    assert message in answer["error"]
    assert good_status == 200, good_answer
    assert good_answer["text_output"] == reference(PROMPTS[0], 8)[0]


def test_invalid_utf8_prompt_is_rejected(llm_triton):
    assert "text_input: is not valid UTF-8" in stream_errors(llm_triton, "chat",
                                                               b"caf\xe9 \xff")


def test_a_bad_request_does_not_disturb_its_batch_mates(llm_triton, reference):
    bodies = [dict(text_input=PROMPTS[0], max_tokens=24, temperature=0),
              dict(text_input="hi", top_p=7.0),
              dict(text_input=PROMPTS[1], max_tokens=24, temperature=0),
              dict(text_input="", max_tokens=4)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: generate(llm_triton, "chat", **body), bodies))
    assert [status for status, _ in answers] == [200, 400, 200, 400]
    assert answers[0][1]["text_output"] == reference(PROMPTS[0], 24)[0]
    assert answers[2][1]["text_output"] == reference(PROMPTS[1], 24)[0]
