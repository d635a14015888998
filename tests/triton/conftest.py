"""One real tritonserver per test session, serving several EmbeddingSearch variants.

* ``ts``: TorchScript encoder, mean pooling, response cache on;
* ``ox``: ONNX encoder, mean pooling;
* ``oxf``: ``ox`` with ``stages.fuse``: tokenizer, encoder and pooling in one model;
* ``mx``: TorchScript encoder, max pooling;
* ``tiny``: a 12-text corpus and a one-slot encoder queue, for backpressure;
* ``flt``: the 12 texts as JSONL records with fields (``FILTER_RECORDS``), for filters;
* ``hn``: the ``ox`` corpus through an int8 hnsw index, its ``package`` field kept;
* ``enc-<name>``: each tiny random-weight encoder of tests/support/encoders.py (every
  architecture tritonop serves) over the 12-text corpus, prepared from its
  sentence-transformers folder with its own pooling, normalization and prompts, ONNX and
  TorchScript in turn;
* ``i8-bert``: the tiny BERT again, ONNX at ``precision: int8`` (quantized at prepare);
* ``big``: 4,500 demo texts, fused, ONNX: an exact index large enough for the int8 screen.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_CORPUS
from tests.support.encoders import TINY_ENCODERS
from tests.support.triton import (
    API,
    FILTER_FIELDS,
    FILTER_RECORDS,
    TINY_TEXTS,
    RunningTriton,
    embedding_search,
    running_triton,
    seed_export,
)
from tritonop.resources import parse_resource


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.txt"
    path.write_text("\n".join(TINY_TEXTS) + "\n")
    return path


@pytest.fixture(scope="session")
def fields_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fields") / "fields.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in FILTER_RECORDS))
    return path


@pytest.fixture(scope="session")
def big_corpus(tmp_path_factory) -> Path:
    """4,500 demo texts: past the int8 screen's smallest index (SCREEN_ROWS)."""
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    with open(DEMO_CORPUS, encoding="utf-8") as demo:
        path.write_text("".join(itertools.islice(demo, 4500)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def triton(tmp_path_factory, exported, corpus, tiny_corpus, fields_corpus, tiny_encoders,
           big_corpus) -> Iterator[RunningTriton]:
    root = tmp_path_factory.mktemp("artifacts")
    one_slot = {"maxBatchSize": 1, "maxQueueSize": 1, "threads": 1}
    resources = [
        embedding_search("ts", corpus, cache={"enabled": True, "size": "8Mi"}),
        embedding_search("ox", corpus, model={"format": "onnx"}),
        embedding_search("oxf", corpus, model={"format": "onnx"}, stages={"fuse": True}),
        embedding_search("mx", corpus, model={"pooling": "max"}),
        embedding_search("tiny", tiny_corpus, stages={"encoder": one_slot},
                         search={"defaultTopK": 3, "maxTopK": 100}),
        parse_resource({"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "flt"},
                        "spec": {"corpus": {"source": str(fields_corpus), "fields": [
                            {"name": n, "type": t} for n, t in FILTER_FIELDS.items()]}}}),
        # The approximate index (test_search_hnsw.py): int8 graph over the real corpus.
        parse_resource({"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "hn"},
                        "spec": {"corpus": {"source": str(corpus), "fields": [
                            {"name": "package", "type": "string"}]},
                            "model": {"format": "onnx"},
                            "search": {"index": "hnsw", "quantization": "int8"}}}),
        embedding_search("big", big_corpus, model={"format": "onnx"}, stages={"fuse": True}),
    ]
    for resource in resources:
        seed_export(resource, root, exported)
    # Prepared from their folders, as a user's model is: export, checks and index included.
    resources += [
        embedding_search(f"enc-{encoder.name}", tiny_corpus,
                         model={"source": str(tiny_encoders[encoder.name]),
                                "format": ("onnx", "torchscript")[position % 2]})
        for position, encoder in enumerate(TINY_ENCODERS)
    ]
    resources.append(embedding_search("i8-bert", tiny_corpus, model={
        "source": str(tiny_encoders["bert"]), "format": "onnx", "precision": "int8"}))
    with running_triton(resources, root, tmp_path_factory.mktemp("triton")) as running:
        yield running
