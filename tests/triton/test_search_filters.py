"""Filtered search through a real tritonserver and the gateway against numpy's argsort of the
masked scores, and bad filters answered 400 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.support.triton import FILTER_RECORDS, free_port, post_json
from tritonop.gateway.backend import TritonAddress
from tritonop.gateway.config import gateway_config
from tritonop.gateway.server import GatewayThread
from tritonop.render.repository import artifact_dirs

pytestmark = pytest.mark.triton

FILTERS = [
    {"lang": "en"},
    {"tags": "europe", "year": {"gte": 2018, "lt": 2025}},
    {"or": [{"draft": True}, {"lang": {"in": ["de", "xx"]}}]},
    {"and": [{"year": {"gt": 2016}}, {"or": [{"tags": {"in": ["tech", "weather"]}},
                                             {"lang": "fr"}]}]},
    {"year": {"lte": 2017}},  # 3 rows: fewer than k
    {"lang": "ja"},  # no row: an empty answer
]


@pytest.fixture(scope="module")
def gateway(triton) -> Iterator[str]:
    address = TritonAddress(triton.server.grpc_url, triton.server.http_url)
    thread = GatewayThread(gateway_config([triton.resources["flt"]]), address,
                           free_port()).start()
    try:
        yield thread.url
    finally:
        thread.stop()


def matches(spec: dict, record: dict) -> bool:
    """The filter read literally against one record."""
    for key, value in spec.items():
        if key in ("and", "or"):
            parts = [matches(part, record) for part in value]
            if not (all(parts) if key == "and" else any(parts)):
                return False
            continue
        held = record.get(key)
        for op, operand in (value.items() if isinstance(value, dict) else [("in", [value])]):
            if held is None:
                return False
            items = held if isinstance(held, list) else [held]
            if op == "in" and not any(item == want for item in items for want in operand):
                return False
            if op != "in" and not {"gt": held > operand, "gte": held >= operand,
                                   "lt": held < operand, "lte": held <= operand}[op]:
                return False
    return True


def expected(triton, text: str, spec: dict, k: int) -> tuple[list[int], np.ndarray]:
    """numpy: the served query embedding against the index, non-matching rows masked."""
    index_dir = artifact_dirs(triton.resources["flt"], str(triton.artifacts_root))[1]
    matrix = load_file(f"{index_dir}/embeddings.safetensors")["embeddings"]
    status, body = triton.generate("flt_embedding", {"text": text})
    assert status == 200, body
    query = np.array(body["embedding"], dtype=np.float32)
    scores = matrix @ (query / np.linalg.norm(query))
    mask = np.array([matches(spec, record) for record in FILTER_RECORDS])
    order = np.argsort(-np.where(mask, scores, -np.inf), kind="stable")[:min(k, mask.sum())]
    return order.tolist(), scores[order]


@pytest.mark.parametrize("spec", FILTERS, ids=[json.dumps(f) for f in FILTERS])
def test_filtered_search_equals_numpy(triton, gateway, spec):
    text, k = "storm over europe", 5
    ids, scores = expected(triton, text, spec, k)
    status, body = post_json(f"{gateway}/v1/search",
                             {"model": "flt", "text": text, "num_results": k, "filter": spec})
    assert status == 200, body
    assert [hit["id"] for hit in body["data"]] == ids
    np.testing.assert_allclose([hit["score"] for hit in body["data"]], scores, atol=1e-5)
    for hit in body["data"]:
        assert matches(spec, FILTER_RECORDS[hit["id"]])
        assert hit["text"] == FILTER_RECORDS[hit["id"]]["text"]
    # The search model's own input, through Triton's generate endpoint: the same answer.
    status, direct = triton.generate("flt", {"text": text, "num_results": k,
                                             "filter": json.dumps(spec)})
    assert status == 200, direct
    assert direct["ids"] == ids


@pytest.mark.parametrize("spec, param", [
    ({"lnag": "en"}, "filter.lnag"),
    ({"year": "2020"}, "filter.year"),
    ({"or": [{"lang": {"near": "en"}}]}, "filter.or[0].lang.near"),
])
def test_bad_filter_is_400_naming_the_field(triton, gateway, spec, param):
    status, body = post_json(f"{gateway}/v1/search",
                             {"model": "flt", "text": "storm", "filter": spec})
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["message"].startswith(f"{param}: ")
    # Triton's search model refuses it too, naming the same place.
    status, direct = triton.generate("flt", {"text": "storm", "filter": json.dumps(spec)})
    assert status == 400
    assert f"{param}: " in direct["error"]
