"""What each model of the embedding-search ensemble does to one batch of requests.

A stage takes the inputs of every request in a batch (one dict of numpy arrays per
request, ``None`` for an optional input that was left out) and returns, per request,
either its outputs or the :class:`RequestError` that request earned. The batched work
happens once for all good requests; a bad request never fails its batch-mates.

The Triton adapters in :mod:`tritonop_backend.models` only move tensors in and out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np

from tritonop_backend.artifacts import (
    TOKENIZER_FILE,
    ArtifactError,
    IndexManifest,
    ModelManifest,
    check_version,
    resolve_prompt,
    resolve_setting,
)
from tritonop_backend.batching import pad_and_stack, split_rows
from tritonop_backend.encoder import encode_ragged, load_encoder
from tritonop_backend.errors import RequestError
from tritonop_backend.pooling import POOLING_MODES, l2_normalize, pool
from tritonop_backend.search import CorpusIndex, check_finite, load_index
from tritonop_backend.text import decode_texts
from tritonop_backend.tokenizer import TextTokenizer

Inputs = Mapping[str, Union[np.ndarray, None]]
Outputs = dict[str, np.ndarray]
Result = Union[Outputs, RequestError]
Parameters = Mapping[str, str]


class Stage(Protocol):
    """One model of the pipeline, free of Triton."""

    inputs: tuple[str, ...]

    def run(self, batch: list[Inputs]) -> list[Result]: ...


def run_valid(
    batch: list[Inputs],
    check: Callable[[Inputs], object],
    work: Callable[[list[object]], list[Outputs]],
) -> list[Result]:
    """Check each request alone, then do the batched ``work`` once for those that passed."""
    checked: list[object] = []
    results: list[Result | None] = []
    for inputs in batch:
        try:
            checked.append(check(inputs))
            results.append(None)
        except RequestError as err:
            results.append(err)
    done = iter(work(checked) if checked else [])
    return [next(done) if result is None else result for result in results]


def _required(inputs: Inputs, name: str) -> np.ndarray:
    value = inputs.get(name)
    if value is None:
        raise RequestError(name, "is required")
    return value


def _model_settings(parameters: Parameters) -> tuple[Path, ModelManifest, int, str]:
    """Model directory, its manifest, and the max length and pooling with "auto" resolved."""
    check_artifacts(parameters)
    model_dir = Path(parameters["model_dir"])
    manifest = ModelManifest.read(model_dir)
    max_length = resolve_setting(parameters.get("max_sequence_length", "auto"),
                                 manifest.max_sequence_length)
    pooling = resolve_setting(parameters.get("pooling", "auto"), manifest.pooling)
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    return model_dir, manifest, max_length, pooling


def check_artifacts(parameters: Parameters) -> None:
    """Refuse to load from an artifacts version other than the rendered one.

    Configs rendered before artifacts were versioned carry no fingerprint: nothing to check.
    """
    if "artifacts_fingerprint" in parameters:
        check_version(Path(parameters["artifacts_dir"]), parameters["artifacts_fingerprint"])


class TokenizerStage:
    """``text`` (BYTES ``[rows, 1]``) -> ``input_ids``, ``attention_mask`` (INT64).

    Texts longer than ``max_input_characters`` (the resource's
    ``api.limits.maxInputCharacters``) are refused before tokenizing: the tokenizer reads
    a whole text before it truncates, and its batch-mates wait for it.

    Every text gets the query prompt (``query_prompt``: ``auto`` for the model's own, or a
    JSON string): this stage serves both search queries and ``/v1/embeddings`` inputs,
    which are queries in sentence-transformers' sense (``encode_query``); corpus texts get
    the document prompt when the index is built, outside Triton.
    """

    inputs = ("text",)

    def __init__(self, parameters: Parameters, device: str = "cpu") -> None:
        model_dir, manifest, max_length, _ = _model_settings(parameters)
        prompt = resolve_prompt(parameters.get("query_prompt", "auto"), manifest.query_prompt)
        self.tokenizer = TextTokenizer(model_dir / TOKENIZER_FILE, max_length, prompt)
        self.max_characters = int(parameters["max_input_characters"])

    @classmethod
    def from_tokenizer(cls, tokenizer: TextTokenizer, max_characters: int) -> TokenizerStage:
        """A tokenizer stage over a tokenizer already loaded (for tests and benchmarks)."""
        stage = cls.__new__(cls)
        stage.tokenizer, stage.max_characters = tokenizer, max_characters
        return stage

    def run(self, batch: list[Inputs]) -> list[Result]:
        def check(inputs: Inputs) -> list[str]:
            return decode_texts(_required(inputs, "text").reshape(-1), "text",
                                self.max_characters)

        def work(groups: list[object]) -> list[Outputs]:
            encoded = self.tokenizer.encode_groups(groups)  # type: ignore[arg-type]
            return [{"input_ids": ids, "attention_mask": mask} for ids, mask in encoded]

        return run_valid(batch, check, work)


class EncoderStage:
    """``input_ids``, ``attention_mask`` -> ``token_embeddings`` (FP32 ``[rows, len, dim]``)."""

    inputs = ("input_ids", "attention_mask")

    def __init__(self, parameters: Parameters, device: str = "cpu") -> None:
        model_dir, _, self.max_length, _ = _model_settings(parameters)
        self.vocab_size = _vocab_size(model_dir / TOKENIZER_FILE)
        self.encoder = load_encoder(model_dir, int(parameters.get("threads", "1")), device)

    def run(self, batch: list[Inputs]) -> list[Result]:
        def check(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
            ids = _required(inputs, "input_ids")
            mask = _required(inputs, "attention_mask")
            if ids.shape != mask.shape or ids.ndim != 2:
                raise RequestError("attention_mask", f"shape {mask.shape} != input_ids {ids.shape}")
            if not 1 <= ids.shape[1] <= self.max_length:  # the tokenizer's own bound
                raise RequestError("input_ids", f"rows of 1 to {self.max_length} tokens, got "
                                   f"{ids.shape[1]}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
                raise RequestError("input_ids", f"ids must be in [0, {self.vocab_size})")
            if mask.size and (not np.isin(mask, (0, 1)).all() or (np.diff(mask) > 0).any()):
                raise RequestError("attention_mask", "each row must be 1s (its tokens), then "
                                   "0s (padding)")
            return ids, mask

        def work(pairs: list[object]) -> list[Outputs]:
            hidden = encode_ragged(self.encoder, pairs)  # type: ignore[arg-type]
            return [{"token_embeddings": h} for h in hidden]

        return run_valid(batch, check, work)


class PoolingStage:
    """``token_embeddings``, ``attention_mask`` -> ``embedding`` (FP32 ``[rows, dim]``)."""

    inputs = ("token_embeddings", "attention_mask")

    def __init__(self, parameters: Parameters, device: str = "cpu") -> None:
        _, manifest, _, self.mode = _model_settings(parameters)
        self.dimension = manifest.dimension
        # auto: as the model's sentence-transformers modules do (a Normalize module or not).
        self.normalize = resolve_setting(parameters.get("normalize", "auto"), manifest.normalize)

    def run(self, batch: list[Inputs]) -> list[Result]:
        def check(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
            hidden = _required(inputs, "token_embeddings")
            mask = _required(inputs, "attention_mask")
            if hidden.ndim != 3 or hidden.shape[:2] != mask.shape:
                raise RequestError("attention_mask", f"shape {mask.shape} does not fit "
                                   f"token_embeddings {hidden.shape}")
            if hidden.shape[2] != self.dimension or hidden.shape[1] < 1:
                raise RequestError("token_embeddings", f"rows of 1 or more tokens of "
                                   f"{self.dimension} values, got {hidden.shape[1:]}")
            if not np.isin(mask, (0, 1)).all() or not mask.any(axis=1).all():
                raise RequestError("attention_mask", "0s and 1s, with a 1 (a token) in "
                                   "every row")
            return hidden, mask

        def work(pairs: list[object]) -> list[Outputs]:
            hidden = [pair[0] for pair in pairs]  # type: ignore[index]
            masks = [pair[1] for pair in pairs]  # type: ignore[index]
            pooled = pool(pad_and_stack(hidden), pad_and_stack(masks), self.mode)
            if self.normalize:
                pooled = l2_normalize(pooled)
            return [{"embedding": e} for e in split_rows(pooled, masks, trim=False)]

        return run_valid(batch, check, work)


def run_chain(steps: tuple[Stage, ...], batch: list[Inputs], outputs: tuple[str, ...]
              ) -> list[Result]:
    """Run ``steps`` one after the other over ``batch``, as an ensemble would in one process.

    Each step reads its inputs from what the request brought and what earlier steps gave
    it; a request that a step refuses keeps that error and leaves the later steps. Returns
    the named ``outputs`` of each request that came through.
    """
    # What each request brought, then what each step gave it (optional inputs may be None).
    tensors: list[dict[str, Any]] = [dict(inputs) for inputs in batch]
    errors: list[RequestError | None] = [None] * len(batch)
    for step in steps:
        going = [i for i, error in enumerate(errors) if error is None]
        if not going:
            break
        answers = step.run([{name: tensors[i].get(name) for name in step.inputs}
                            for i in going])
        for i, answer in zip(going, answers, strict=True):
            if isinstance(answer, RequestError):
                errors[i] = answer
            else:
                tensors[i].update(answer)
    return [error if error is not None
            else {name: carried[name] for name in outputs}
            for error, carried in zip(errors, tensors, strict=True)]


class EmbedStage:
    """``text`` -> ``embedding``, ``attention_mask``: :class:`TokenizerStage`,
    :class:`EncoderStage` and :class:`PoolingStage` run in turn in one process.

    The model of ``spec.stages.fuse``: what ``<name>_embedding`` computes through three
    Python models, with one queue, one dynamic batcher and no tensors passed between stub
    processes. ``attention_mask`` is the tokenizer's, as the three-model ensemble answers
    it (its row sums are the token counts the gateway reports).
    """

    inputs = ("text",)
    outputs = ("embedding", "attention_mask")

    def __init__(self, parameters: Parameters, device: str = "cpu") -> None:
        self.steps: tuple[Stage, ...] = (TokenizerStage(parameters, device),
                                         EncoderStage(parameters, device),
                                         PoolingStage(parameters, device))

    @classmethod
    def from_steps(cls, tokenizer: Stage, encoder: Stage, pooling: Stage) -> EmbedStage:
        """An embed stage over stages already built (for tests and benchmarks)."""
        stage = cls.__new__(cls)
        stage.steps = (tokenizer, encoder, pooling)
        return stage

    def run(self, batch: list[Inputs]) -> list[Result]:
        return run_chain(self.steps, batch, self.outputs)


@dataclass(frozen=True)
class _Query:
    embeddings: np.ndarray
    k: int
    rows: np.ndarray | None = None  # a filter's matching rows; None: every row


class SearchStage:
    """``embedding``, optional ``num_results`` and ``filter`` -> ``ids``, ``scores``,
    ``texts`` (``[rows, k]``).

    ``filter`` is a JSON filter over the corpus fields (:mod:`tritonop_backend.filters`),
    the same for every row of a request; the results are the exact top k among the rows
    it keeps, fewer than k (down to none) where fewer rows match.

    Loading fails, with a message that says how to fix it, when the index was built
    with another model, pooling or maximum length than the queries will be.
    """

    inputs = ("embedding", "num_results", "filter")

    def __init__(self, parameters: Parameters, device: str = "cpu") -> None:
        from threadpoolctl import threadpool_limits

        # The server starts stubs with one BLAS thread; a large corpus scans faster on more.
        threads = int(parameters.get("threads", "1"))
        threadpool_limits(limits=threads, user_api="blas")
        _, manifest, max_length, pooling = _model_settings(parameters)
        self.index, index_manifest = load_index(Path(parameters["index_dir"]), threads)
        self.description = describe_index(index_manifest)
        product = getattr(self.index, "product_name", "numpy")  # a graph has no scan
        if product != "numpy":
            self.description += f" (scan: {product})"
        expected = parameters.get("index", index_manifest.index_kind)
        if expected != index_manifest.index_kind:
            raise ArtifactError(f"{parameters['index_dir']} holds an {index_manifest.index_kind} "
                                f"index, but this model's config says {expected}: prepare "
                                "this spec's artifacts")
        document_prompt = None
        if "document_prompt" in parameters:
            document_prompt = resolve_prompt(parameters["document_prompt"],
                                             manifest.document_prompt)
        index_manifest.check_compatible(manifest, pooling, max_length, document_prompt)
        self.default_k = int(parameters.get("default_top_k", "10"))
        self.max_k = int(parameters.get("max_top_k", "100"))

    @classmethod
    def from_index(cls, index: CorpusIndex, default_k: int, max_k: int) -> SearchStage:
        """A search stage over an index already in memory (for tests and benchmarks)."""
        stage = cls.__new__(cls)
        stage.index, stage.default_k, stage.max_k = index, default_k, max_k
        stage.description = ""
        return stage

    def _check(self, inputs: Inputs) -> _Query:
        embeddings = _required(inputs, "embedding")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.index.dimension:
            raise RequestError("embedding", f"expected [rows, {self.index.dimension}], "
                               f"got {list(embeddings.shape)}")
        check_finite(embeddings)
        k = self._top_k(inputs.get("num_results"), len(embeddings))
        return _Query(embeddings, k, self._rows(inputs.get("filter"), len(embeddings)))

    def _rows(self, requested: np.ndarray | None, rows: int) -> np.ndarray | None:
        """The ids of the rows a request's filter keeps (None without a filter)."""
        if requested is None:
            return None
        values = set(requested.reshape(-1).tolist())
        if requested.size != rows or len(values) != 1:
            raise RequestError("filter", "give one filter, the same for every text in the "
                               "request")
        text = values.pop()
        node = self.index.fields.parse(text if isinstance(text, (bytes, str)) else str(text))
        return np.flatnonzero(self.index.fields.mask(node))

    def _top_k(self, requested: np.ndarray | None, rows: int) -> int:
        if requested is None:
            return self.default_k
        values = np.unique(requested.reshape(-1))
        if requested.size != rows or len(values) != 1:
            raise RequestError("num_results", "give one value, the same for every text "
                               "in the request")
        k = int(values[0])
        if k < 1:
            raise RequestError("num_results", f"must be at least 1, got {k}")
        if k > self.max_k:
            raise RequestError("num_results", f"{k} is above this service's maximum of "
                               f"{self.max_k}")
        return k

    def _search(self, queries: list[object]) -> list[Outputs]:
        """One scan for the unfiltered requests together, one per filtered request."""
        parts: list[_Query] = queries  # type: ignore[assignment]
        outputs: list[Outputs | None] = [None] * len(parts)
        plain = [i for i, q in enumerate(parts) if q.rows is None]
        if plain:
            found = self.index.search(np.concatenate([parts[i].embeddings for i in plain]),
                                      max(parts[i].k for i in plain))
            start = 0
            for i in plain:
                query = parts[i]
                rows = slice(start, start + len(query.embeddings))
                start += len(query.embeddings)
                outputs[i] = self._outputs(found.ids[rows, : query.k],
                                           found.scores[rows, : query.k])
        for i, query in enumerate(parts):
            if query.rows is not None:
                found = self.index.search(query.embeddings, query.k, query.rows)
                outputs[i] = self._outputs(found.ids, found.scores)
        return outputs  # type: ignore[return-value]

    def _outputs(self, ids: np.ndarray, scores: np.ndarray) -> Outputs:
        return {"ids": ids, "scores": scores, "texts": self.index.texts[ids]}

    def run(self, batch: list[Inputs]) -> list[Result]:
        return run_valid(batch, self._check, self._search)


def describe_index(manifest: IndexManifest) -> str:
    """One line for the server's log: which index a search model serves, and its recall."""
    index = manifest.index
    if manifest.index_kind != "hnsw":
        return f"exact index of {manifest.count} vectors"
    return (f"hnsw index of {manifest.count} vectors ({index.get('library', 'usearch')}, "
            f"quantization {index.get('quantization')}, connectivity "
            f"{index.get('connectivity')}, efSearch "
            f"{index.get('ef_search_served', index.get('ef_search'))}), recall@10 "
            f"{index.get('recall_at_10')} against exact on {index.get('recall_queries')} "
            "corpus texts at prepare")


def _vocab_size(tokenizer_file: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)


STAGES: dict[str, Callable[[Parameters, str], Stage]] = {
    "tokenizer": TokenizerStage,
    "encoder": EncoderStage,
    "pooling": PoolingStage,
    "search": SearchStage,
    "embed": EmbedStage,
}
