"""``/v1/rerank`` in the Cohere / Jina shape, and ``rerank`` on search (pure: no I/O).

Request: ``{"model", "query", "documents": [str | {"text": str}], "top_n",
"return_documents"}``. Answer: ``{"model", "results": [{"index", "relevance_score",
"document"?: {"text"}}], "usage": {"prompt_tokens", "total_tokens"}}``, best first.

Decisions: ``top_n`` beyond the number of documents returns all of them (as Cohere does;
``top_n`` must still be at least 1), none returns all; ``return_documents`` defaults to
false (Cohere's default); a document longer than the model's maximum length is
truncated, not refused (the cross-encoder reads the start of it, as ``CrossEncoder``
does), while one longer than ``maxInputCharacters`` is a 400 before any tokenizer reads
it. The scores are the model's, as ``CrossEncoder.predict`` gives them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritonop.gateway.config import ModelEntry
from tritonop.gateway.errors import invalid
from tritonop.gateway.protocol import Fields, characters, integer, model_name, text
from tritonop_backend.rerank import rank

ROUTE = "/v1/rerank"


@dataclass(frozen=True)
class RerankArgs:
    """A validated rerank request; ``top_n`` is at most the number of documents."""

    model: str
    query: str
    documents: list[str]
    top_n: int
    return_documents: bool


def _entry(fields: Fields, models: Mapping[str, ModelEntry]) -> ModelEntry:
    entry = model_name(fields, models, "embedding", ROUTE)
    if entry.rerank_candidates <= 0:
        raise invalid("model", f"'{entry.name}' has no reranker (its spec.rerank is not set)")
    return entry


def _nonempty(value: Any, name: str, entry: ModelEntry) -> str:
    value = text(value, name)
    characters(len(value), name, entry)
    if not value.strip():
        raise invalid(name, "must not be empty or only whitespace")
    return value


def _document(item: Any, index: int, entry: ModelEntry) -> str:
    where = f"documents[{index}]"
    if isinstance(item, dict):
        extra = sorted(set(item) - {"text"})
        if extra:
            raise invalid(f"{where}.{extra[0]}", "is not a recognised field (send text)")
        if "text" not in item:
            raise invalid(f"{where}.text", "is required")
        return _nonempty(item["text"], f"{where}.text", entry)
    if not isinstance(item, str):
        raise invalid(where, "must be a string or an object with text")
    return _nonempty(item, where, entry)


def parse_rerank(body: Mapping[str, Any], models: Mapping[str, ModelEntry]) -> RerankArgs:
    """A ``/v1/rerank`` body, every field checked against the model's bounds."""
    fields = Fields(body)
    entry = _entry(fields, models)
    query = fields.get("query")
    if query is None:
        raise invalid("query", "is required")
    query = _nonempty(query, "query", entry)
    documents = fields.get("documents")
    if documents is None:
        raise invalid("documents", "is required")
    if not isinstance(documents, list):
        raise invalid("documents", "must be a list of strings or of objects with text")
    if not documents:
        raise invalid("documents", "must not be an empty list")
    bound = entry.max_rerank_documents
    if len(documents) > bound:
        raise invalid("documents", f"at most {bound} documents, got {len(documents)}")
    texts = [_document(item, index, entry) for index, item in enumerate(documents)]
    top_n = fields.get("top_n")
    top_n = len(texts) if top_n is None else integer(top_n, "top_n", 1, bound)
    return_documents = fields.get("return_documents")
    if return_documents is None:
        return_documents = False
    if not isinstance(return_documents, bool):
        raise invalid("return_documents", "must be true or false")
    fields.finish()
    return RerankArgs(entry.name, query, texts, min(top_n, len(texts)), return_documents)


def rerank_body(args: RerankArgs, scores: np.ndarray, tokens: Sequence[int]) -> dict[str, Any]:
    """The answer: the ``top_n`` best documents, best first, and the tokens read."""
    results = []
    for index in rank(scores, args.top_n):
        result: dict[str, Any] = {"index": index, "relevance_score": float(scores[index])}
        if args.return_documents:
            result["document"] = {"text": args.documents[index]}
        results.append(result)
    used = int(sum(tokens))
    return {"object": "list", "model": args.model, "results": results,
            "usage": {"prompt_tokens": used, "total_tokens": used}}


def candidates(entry: ModelEntry, num_results: int) -> int:
    """Search results a reranked search asks for: the model's ``rerank.candidates``, at
    least the results asked for, at most what one search may return (``maxTopK``)."""
    return min(max(entry.rerank_candidates, num_results), entry.max_top_k)
