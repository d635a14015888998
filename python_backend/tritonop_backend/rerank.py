"""Re-scoring (query, document) pairs with an exported cross-encoder.

A cross-encoder reads the query and one document together, as one pair of texts
(``[CLS] query [SEP] document [SEP]`` for BERT, with token type 1 for the document), and
gives one logit; sentence-transformers' ``CrossEncoder.predict`` then applies the model's
activation (:data:`ACTIVATIONS`). The prepare step exports the classification model
(token ids, mask and token types in, the logit out) into the ``rerank`` folder of an
artifacts version, with the pair tokenizer and :class:`RerankManifest`; this module runs
it, batched over every pair of every request in a Triton batch.

Pairs are truncated, not refused, at the model's maximum length, the longer text first
(``longest_first``, as ``transformers`` truncates for ``CrossEncoder``); a text over the
character bound is refused before tokenizing, as the embedding path does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tritonop_backend.artifacts import (
    ArtifactError,
    _Manifest,
    check_version,
    resolve_setting,
)
from tritonop_backend.encoder import onnx_session
from tritonop_backend.errors import RequestError

RERANK_FOLDER = "rerank"
"""The folder of an artifacts version that holds the exported cross-encoder."""
RERANK_MANIFEST_KIND = "tritonop-cross-encoder"
CROSS_ENCODER_FILES = {"torchscript": "cross_encoder.pt", "onnx": "cross_encoder.onnx"}
PAIR_TOKENIZER_FILE = "tokenizer.json"
ACTIVATIONS = ("sigmoid", "identity", "tanh")
"""What ``CrossEncoder.predict`` applies to the logit: sentence-transformers' default for
one label is a sigmoid; a model may name another (``activation_fn``) in its files."""
PAIRS_PER_RUN = 64
"""Pairs the cross-encoder runs at once: enough to keep the matrix products busy, few
enough that one request's thousand documents do not pad every pair to its longest."""


@dataclass(frozen=True)
class RerankManifest(_Manifest):
    """What the prepare step exported into the ``rerank`` folder.

    Attributes:
        source: the cross-encoder's source as the resource named it.
        fingerprint: a hash of the source model's files.
        format: ``torchscript`` or ``onnx``.
        max_sequence_length: tokens per pair, the model's own (special tokens included).
        activation: one of :data:`ACTIVATIONS`, applied to the logit.
        max_abs_diff: the largest |exported - transformers| logit on the check pairs.
        model_type: ``config.json``'s ``model_type``.
    """

    source: str
    fingerprint: str
    format: str
    max_sequence_length: int
    activation: str
    max_abs_diff: float = 0.0
    model_type: str = "bert"

    @staticmethod
    def _kind() -> str:
        return RERANK_MANIFEST_KIND

    @staticmethod
    def _hint() -> str:
        return "prepare the resource again (tritonop prepare) to export its cross-encoder"

    @property
    def model_file(self) -> str:
        return CROSS_ENCODER_FILES[self.format]


def activate(logits: np.ndarray, activation: str) -> np.ndarray:
    """The score ``CrossEncoder.predict`` gives for ``logits`` under ``activation``."""
    logits = np.asarray(logits, dtype=np.float32)
    if activation == "sigmoid":
        # exp of a non-positive number only: no overflow for large logits of either sign.
        positive = np.exp(-np.abs(logits))
        return np.where(logits >= 0, 1 / (1 + positive), positive / (1 + positive)).astype(
            np.float32)
    if activation == "tanh":
        return np.tanh(logits).astype(np.float32)
    if activation == "identity":
        return logits
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def rank(scores: Sequence[float] | np.ndarray, top_n: int) -> list[int]:
    """Indices of the ``top_n`` best scores, best first; equal scores keep their order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [int(i) for i in order[:top_n]]


GROWTH = 1.5
"""A run of pairs ends where the next pair is over this times its shortest: 50 documents of
12-23 tokens then run as two (30 pairs padded to 17 tokens, 20 to 23) rather than one padded
to 23, 12% shorter on two threads (1.25: 9%)."""
MIN_PAIRS_PER_RUN = 8
"""Pairs a run holds at least before a length ends it: smaller runs keep few cores busy."""


def runs(lengths: np.ndarray, most: int = PAIRS_PER_RUN, growth: float = GROWTH,
         least: int = MIN_PAIRS_PER_RUN) -> list[slice]:
    """Runs of ``lengths`` (sorted) that pad little: a run ends when it holds ``most`` pairs
    or, once it holds ``least``, when the next pair is over ``growth`` times its shortest."""
    found, start = [], 0
    for end in range(1, len(lengths) + 1):
        if (end == len(lengths) or end - start == most
                or (end - start >= least and lengths[end] > growth * lengths[start])):
            found.append(slice(start, end))
            start = end
    return found


class PairTokenizer:
    """The cross-encoder's fast tokenizer, encoding (query, document) pairs.

    Special tokens and token types as the model's post-processor gives them, truncation
    of the longer text first at ``max_length``, no padding (done per run).
    """

    def __init__(self, tokenizer_file: Path, max_length: int) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        self.max_length = max_length

    def encode(self, pairs: Sequence[tuple[str, str]]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``input_ids``, ``attention_mask``, ``token_type_ids``, each ``[n, longest]``."""
        encodings = self._tokenizer.encode_batch(list(pairs))
        length = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            mask[row, :n] = 1
            types[row, :n] = encoding.type_ids
        return ids, mask, types

    def lengths(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Tokens of each pair after truncation (special tokens included)."""
        return [len(e.ids) for e in self._tokenizer.encode_batch(list(pairs))]


class CrossEncoderGraph(Protocol):
    """Token ids, mask and token types in, one logit per row out."""

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray) -> np.ndarray: ...


class _TorchScript:
    def __init__(self, path: Path, threads: int, device: str) -> None:
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self._module = torch.jit.load(str(path), map_location=self._device).eval()

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(a).to(self._device)
                    for a in (input_ids, attention_mask, token_type_ids)]
            return self._module(*args).float().cpu().numpy().reshape(-1)


class _Onnx:
    def __init__(self, path: Path, threads: int, device: str) -> None:
        self._session = onnx_session(path, threads, device)
        # An architecture without token types (DistilBERT) exports a graph without that input.
        self._inputs = {i.name for i in self._session.get_inputs()}

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids}
        feeds = {name: value for name, value in feeds.items() if name in self._inputs}
        (logits,) = self._session.run(["logits"], feeds)
        return np.asarray(logits, dtype=np.float32).reshape(-1)


def load_graph(model_dir: Path, threads: int = 1, device: str = "cpu") -> CrossEncoderGraph:
    """The exported cross-encoder of ``model_dir`` (its manifest names the format)."""
    manifest = RerankManifest.read(model_dir)
    path = Path(model_dir) / manifest.model_file
    if manifest.format == "torchscript":
        return _TorchScript(path, threads, device)
    return _Onnx(path, threads, device)


class Reranker:
    """Scores of (query, document) pairs, as ``CrossEncoder.predict`` gives them."""

    def __init__(self, tokenizer: PairTokenizer, graph: CrossEncoderGraph,
                 activation: str) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.tokenizer, self.graph, self.activation = tokenizer, graph, activation

    @classmethod
    def load(cls, model_dir: Path, max_length: int | None = None, threads: int = 1,
             device: str = "cpu") -> Reranker:
        manifest = RerankManifest.read(model_dir)
        tokenizer = PairTokenizer(Path(model_dir) / PAIR_TOKENIZER_FILE,
                                  max_length or manifest.max_sequence_length)
        return cls(tokenizer, load_graph(model_dir, threads, device), manifest.activation)

    def score(self, pairs: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """One score per pair, in order, and each pair's token count after truncation.

        Pairs are sorted by length and run in groups of similar lengths (:func:`runs`), so
        that a run pads little (padding does not change a pair's logit).
        """
        if not pairs:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int32)
        lengths = np.array(self.tokenizer.lengths(pairs), dtype=np.int32)
        order = np.argsort(lengths, kind="stable")
        logits = np.empty(len(pairs), dtype=np.float32)
        for run in runs(lengths[order]):
            rows = order[run]
            ids, mask, types = self.tokenizer.encode([pairs[i] for i in rows])
            logits[rows] = self.graph(ids, mask, types)
        return activate(logits, self.activation), lengths


def decode(values: Iterable[object], field: str, max_characters: int) -> list[str]:
    """BYTES elements as strings, as they are (the cross-encoder reads them unstripped).

    Raises:
        RequestError: an element is not UTF-8, longer than ``max_characters``, or empty.
    """
    texts = []
    for position, value in enumerate(values):
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RequestError(f"{field}[{position}]",
                                   f"is not valid UTF-8 (byte {err.start})") from None
        text = str(value)
        if len(text) > max_characters:
            raise RequestError(f"{field}[{position}]", f"at most {max_characters} characters, "
                               f"got {len(text)}")
        if not text.strip():
            raise RequestError(f"{field}[{position}]", "must not be empty or only whitespace")
        texts.append(text)
    return texts


Inputs = dict[str, "np.ndarray | None"]


class RerankStage:
    """``query`` (BYTES ``[rows, 1]``) and ``documents`` (BYTES ``[rows, n]``) -> ``scores``
    (FP32 ``[rows, n]``), one score per document, and ``tokens`` (INT32 ``[rows, n]``), each
    pair's token count (for usage); every pair of the batch in one run."""

    inputs = ("query", "documents")

    def __init__(self, parameters: dict[str, str], device: str = "cpu") -> None:
        if "artifacts_fingerprint" in parameters:
            check_version(Path(parameters["artifacts_dir"]), parameters["artifacts_fingerprint"])
        model_dir = Path(parameters["rerank_dir"])
        manifest = RerankManifest.read(model_dir)
        max_length = resolve_setting(parameters.get("max_sequence_length", "auto"),
                                     manifest.max_sequence_length)
        self.reranker = Reranker.load(model_dir, max_length,
                                      int(parameters.get("threads", "1")), device)
        self.max_characters = int(parameters["max_input_characters"])
        self.max_documents = int(parameters.get("max_documents", "0")) or None

    @classmethod
    def from_reranker(cls, reranker: Reranker, max_characters: int,
                      max_documents: int | None = None) -> RerankStage:
        """A stage over a reranker already loaded (tests)."""
        stage = cls.__new__(cls)
        stage.reranker, stage.max_characters = reranker, max_characters
        stage.max_documents = max_documents
        return stage

    def run(self, batch: list[Inputs]) -> list[dict[str, np.ndarray] | RequestError]:
        checked: list[tuple[list[str], list[list[str]]] | RequestError] = []
        for inputs in batch:
            try:
                checked.append(self._check(inputs))
            except RequestError as err:
                checked.append(err)
        pairs = [(query, document) for item in checked if not isinstance(item, RequestError)
                 for query, documents in zip(*item, strict=True) for document in documents]
        scored, lengths = self.reranker.score(pairs)
        start = 0
        results: list[dict[str, np.ndarray] | RequestError] = []
        for item in checked:
            if isinstance(item, RequestError):
                results.append(item)
                continue
            rows, width = len(item[1]), len(item[1][0])
            end = start + rows * width
            results.append({"scores": scored[start:end].reshape(rows, width),
                            "tokens": lengths[start:end].reshape(rows, width)})
            start = end
        return results

    def _check(self, inputs: Inputs) -> tuple[list[str], list[list[str]]]:
        query, documents = inputs.get("query"), inputs.get("documents")
        if query is None:
            raise RequestError("query", "is required")
        if documents is None:
            raise RequestError("documents", "is required")
        queries = decode(query.reshape(-1), "query", self.max_characters)
        rows = documents.reshape(len(queries), -1) if documents.size else None
        if rows is None or rows.shape[1] == 0:
            raise RequestError("documents", "must hold at least one document")
        if self.max_documents is not None and rows.shape[1] > self.max_documents:
            raise RequestError("documents", f"at most {self.max_documents} documents per "
                               f"query, got {rows.shape[1]}")
        return queries, [decode(row, "documents", self.max_characters) for row in rows]


__all__ = ["ACTIVATIONS", "ArtifactError", "RerankManifest", "RerankStage", "Reranker",
           "activate", "rank"]


@dataclass(frozen=True)
class RerankedSearch:
    """The search-then-rerank model's (``<name>_reranked``) settings and checks.

    It searches the ensemble ``<name>`` for :meth:`search_count` candidates, re-scores each
    row's with ``<name>_rerank`` and answers the best ``num_results`` (:func:`best_rows`).
    """

    candidates: int
    default_k: int
    max_k: int
    max_characters: int | None = None

    @classmethod
    def of(cls, parameters: dict[str, str]) -> RerankedSearch:
        limit = parameters.get("max_input_characters")
        return cls(int(parameters["candidates"]), int(parameters["default_top_k"]),
                   int(parameters["max_top_k"]), int(limit) if limit else None)

    def documents(self, texts: np.ndarray) -> np.ndarray:
        """A row's candidate texts as the cross-encoder takes them: cut to its character
        bound (a corpus text may be longer; the cross-encoder reads far fewer tokens than
        that many characters, so the scores are the same)."""
        return cut_texts(texts, self.max_characters)

    def num_results(self, requested: np.ndarray | None, rows: int) -> int:
        """The request's ``num_results`` (one value for all its rows), checked.

        Raises:
            RequestError: naming ``num_results``.
        """
        if requested is None:
            return self.default_k
        values = np.unique(requested.reshape(-1))
        if requested.size != rows or len(values) != 1:
            raise RequestError("num_results", "give one value, the same for every text in "
                               "the request")
        k = int(values[0])
        if not 1 <= k <= self.max_k:
            raise RequestError("num_results", f"must lie in [1, {self.max_k}], got {k}")
        return k

    def search_count(self, k: int) -> int:
        """Candidates to search for: ``candidates``, at least ``k``, at most ``max_k``."""
        return min(max(self.candidates, k), self.max_k)


def cut_texts(texts: Any, limit: int | None) -> Any:
    """``texts`` (str or UTF-8 bytes, any array shape) cut to ``limit`` characters each."""
    if limit is None:
        return texts

    def cut(value: Any) -> Any:
        if isinstance(value, bytes):
            text = value.decode("utf-8", "replace")
            return text[:limit].encode() if len(text) > limit else value
        return value[:limit]

    if isinstance(texts, np.ndarray):
        return np.vectorize(cut, otypes=[object])(texts) if texts.size else texts
    return [cut(text) for text in texts]


def best_rows(ids: np.ndarray, texts: np.ndarray, search_scores: np.ndarray,
              rerank_scores: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Each row's ``k`` best candidates by the cross-encoder's score, best first.

    Args:
        ids, texts, search_scores: the search's ``[rows, m]`` answers.
        rerank_scores: each row's cross-encoder scores of its ``m`` candidates.
        k: results per row (fewer where a row has fewer candidates).
    """
    keep = min(k, ids.shape[1])
    order = [rank(scores, keep) for scores in rerank_scores]
    return {
        "ids": np.array([row[o] for row, o in zip(ids, order, strict=True)],
                        dtype=np.int64).reshape(len(ids), keep),
        "scores": np.array([s[o] for s, o in zip(rerank_scores, order, strict=True)],
                           dtype=np.float32).reshape(len(ids), keep),
        "texts": np.array([row[o] for row, o in zip(texts, order, strict=True)],
                          dtype=object).reshape(len(ids), keep),
        "search_scores": np.array([row[o] for row, o in zip(search_scores, order, strict=True)],
                                  dtype=np.float32).reshape(len(ids), keep),
    }
