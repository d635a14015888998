"""Bad input gets a 400 / INVALID_ARGUMENT naming the problem, and the server keeps serving."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton

GOOD = {"text": "europe climate change storm", "num_results": 3}


def assert_still_serving(triton):
    status, body = triton.generate("ts", GOOD)
    assert status == 200 and len(body["ids"]) == 3, body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "missing required input(s) ['text']"),
        ({"query": "storm"}, "missing required input(s) ['text']"),
        ({"text": "", "num_results": 3}, "text: element 0 is empty or only whitespace"),
        ({"text": " \t\n ", "num_results": 3}, "text: element 0 is empty or only whitespace"),
        ({"text": "storm", "num_results": 0}, "num_results: must be at least 1, got 0"),
        ({"text": "storm", "num_results": -4}, "num_results: must be at least 1, got -4"),
        ({"text": "storm", "num_results": 101},
         "num_results: 101 is above this service's maximum of 100"),
    ],
)
def test_generate_rejects_bad_input(triton, body, message):
    status, answer = triton.generate("ts", body)
    assert status == 400, answer
    assert message in answer["error"]
    assert_still_serving(triton)


def test_num_results_without_text_fails_and_the_server_carries_on(triton):
    """Triton 2.51 counts inputs instead of checking which required one is missing, so
    an ensemble given only its optional input fails with a less helpful message."""
    status, answer = triton.generate("ts", {"num_results": 3})
    assert status == 400 and "ensemble 'ts'" in answer["error"]
    assert_still_serving(triton)


@pytest.mark.parametrize("value", ["five", 2.5])
def test_generate_with_a_wrongly_typed_value_fails_and_the_server_carries_on(triton, value):
    """Triton 2.51's /generate parses JSON before any model runs and answers a wrongly
    typed value with 500 "Unable to parse"; /infer answers it with 400 (tested below)."""
    status, answer = triton.generate("ts", {"text": "storm", "num_results": value})
    assert status == 500 and "Unable to parse" in answer["error"]
    assert_still_serving(triton)


def test_invalid_utf8_is_rejected_over_grpc(triton):
    client = grpcclient.InferenceServerClient(triton.server.grpc_url)
    text = grpcclient.InferInput("text", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"caf\xe9 \xff"]], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer("ts", [text])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "text: element 0 is not valid UTF-8" in err.value.message()
    assert_still_serving(triton)


@pytest.mark.parametrize(
    ("name", "shape", "dtype", "data", "message"),
    [
        ("num_results", [1, 1], "FP32", np.array([[3.0]], np.float32), "data-type"),
        ("text", [1, 2], "BYTES", np.array([[b"a", b"b"]], dtype=object), "shape"),
    ],
)
def test_wrong_dtype_or_shape_is_rejected_over_http(triton, name, shape, dtype, data, message):
    client = httpclient.InferenceServerClient(triton.server.http_url)
    inputs = []
    if name != "text":
        text = httpclient.InferInput("text", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"storm"]], dtype=object))
        inputs.append(text)
    bad = httpclient.InferInput(name, shape, dtype)
    bad.set_data_from_numpy(data)
    inputs.append(bad)
    with pytest.raises(InferenceServerException) as err:
        client.infer("ts", inputs)
    assert err.value.status() == "400"
    assert message in err.value.message()
    assert_still_serving(triton)


def test_bad_requests_do_not_fail_their_batch_mates(triton):
    """Concurrent good and bad requests share batches; only the bad ones fail."""
    bodies = [GOOD if i % 3 else {"text": "  ", "num_results": 3} for i in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda body: triton.generate("ts", body), bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        if body is GOOD:
            assert status == 200 and len(answer["ids"]) == 3, answer
        else:
            assert status == 400 and "empty or only whitespace" in answer["error"]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_infinite_embedding_sent_to_the_search_model_is_a_400(triton, bad):
    client = httpclient.InferenceServerClient(triton.server.http_url)
    vector = np.full((1, 384), 0.05, np.float32)
    vector[0, 3] = bad
    embedding = httpclient.InferInput("embedding", [1, 384], "FP32")
    embedding.set_data_from_numpy(vector)
    with pytest.raises(InferenceServerException) as err:
        client.infer("ts_search", [embedding])
    assert err.value.status() == "400"
    assert "embedding: row 0 holds NaN or infinite values" in err.value.message()
    vector[0, 3] = 0.05
    embedding.set_data_from_numpy(vector)
    assert client.infer("ts_search", [embedding]).as_numpy("ids").shape == (1, 10)
    assert_still_serving(triton)


@pytest.mark.parametrize(("model", "output"), [("ts", "ids"), ("ts_embedding", "embedding")])
def test_a_text_over_the_character_bound_is_a_400_and_others_are_answered(triton, model, output):
    """The tokenizer refuses a text over api.limits.maxInputCharacters (default 32768)
    before tokenizing it; requests sent in the same moment are answered as usual."""
    bodies = [{"text": "storm " * 6000}] + [{"text": "europe climate change storm"}] * 6
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: triton.generate(model, body), bodies))
    status, answer = answers[0]
    assert status == 400, answer
    assert "text: element 0 is 36000 characters long; at most 32768 are allowed" in (
        answer["error"])
    assert [status for status, _ in answers[1:]] == [200] * 6
    assert all(len(body[output]) > 0 for _, body in answers[1:])
