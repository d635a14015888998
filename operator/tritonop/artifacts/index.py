"""Building a corpus index: embed every text once, with the very code that embeds queries.

The texts go through the same tokenizer, exported encoder and pooling as queries do
in Triton, so a corpus text searched for itself scores 1.0, whatever the format (for
a model without prompts; with them, a text is a document here and a query there, as
sentence-transformers' ``encode_document`` and ``encode_query`` make them).
Rows are always L2-normalized, whatever the model's Normalize module: the search is by
cosine.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonop.artifacts.approximate import build_approximate, check_recall, same_index
from tritonop.artifacts.corpus import read_corpus, read_fields
from tritonop.artifacts.embedding_cache import cache_key, cached_embeddings
from tritonop_backend.ann import HnswSettings
from tritonop_backend.artifacts import (
    MANIFEST_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    IndexManifest,
    ModelManifest,
)
from tritonop_backend.encoder import Encoder, load_encoder
from tritonop_backend.pooling import l2_normalize, pool
from tritonop_backend.search import write_index
from tritonop_backend.tokenizer import TextTokenizer


@dataclass(frozen=True)
class IndexResult:
    manifest: IndexManifest
    directory: Path
    skipped: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_index(
    corpus: Path,
    model_dir: Path,
    directory: Path,
    *,
    text_field: str = "text",
    fields: Mapping[str, str] | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    document_prompt: str | None = None,
    batch_size: int = 64,
    threads: int = 2,
    progress: bool = True,
    force: bool = False,
    embedding_cache: Path | None = None,
    hnsw: HnswSettings | None = None,
    min_recall: float = 0.0,
) -> IndexResult:
    """Embed ``corpus`` with the model exported in ``model_dir`` into ``directory``.

    Skips the work when ``directory`` already holds an index of the same corpus
    content built with the same model, pooling, maximum length, document prompt and
    fields. Settings left None are the model's own (its manifest's).

    Args:
        fields: record fields kept beside the vectors for filters (name -> type); their
            values are read and checked before any text is embedded.
        embedding_cache: where vectors are kept between builds
            (:mod:`tritonop.artifacts.embedding_cache`); texts found there are not embedded.
        hnsw: also build this approximate index (:mod:`tritonop.artifacts.approximate`),
            and fail when its measured recall@10 is below ``min_recall``.
    """
    fields = dict(fields or {})
    model = ModelManifest.read(model_dir)
    pooling = pooling or model.pooling
    max_length = max_length or model.max_sequence_length
    if document_prompt is None:
        document_prompt = model.document_prompt
    if not Path(corpus).is_file():
        raise ArtifactError(f"corpus {corpus} does not exist")
    corpus_hash = file_sha256(corpus)
    if not force:
        try:
            existing = IndexManifest.read(directory)
            existing.check_compatible(model, pooling, max_length, document_prompt)
            if existing.corpus_sha256 == corpus_hash and existing.fields == fields and \
                    same_index(existing, hnsw):
                check_recall(existing.index, min_recall)
                return IndexResult(existing, Path(directory), skipped=True)
        except ArtifactError:
            pass
    texts = read_corpus(corpus, text_field)
    values = read_fields(corpus, fields) if fields else {}
    embeddings = cached_embeddings(
        texts, lambda missing: embed_texts(missing, model_dir, pooling, max_length, batch_size,
                                           threads, progress, prompt=document_prompt),
        embedding_cache, cache_key(model, pooling, max_length, document_prompt)).vectors
    manifest = IndexManifest(
        model_source=model.source, model_fingerprint=model.fingerprint, pooling=pooling,
        max_sequence_length=max_length, dimension=model.dimension, count=len(texts),
        corpus_sha256=corpus_hash, document_prompt=document_prompt, fields=fields,
    )
    if hnsw is not None:
        (Path(directory) / MANIFEST_FILE).unlink(missing_ok=True)
        report = build_approximate(directory, embeddings, hnsw, threads, min_recall)
        check_recall(report, min_recall)  # before the manifest: no complete index
        manifest = dataclasses.replace(manifest, index=report)
    write_index(directory, embeddings, texts, manifest, values)
    return IndexResult(manifest, Path(directory), skipped=False)


def embed_texts(
    texts: list[str],
    model_dir: Path,
    pooling: str,
    max_length: int,
    batch_size: int = 64,
    threads: int = 2,
    progress: bool = False,
    prompt: str = "",
) -> np.ndarray:
    """Unit-length embeddings of ``texts`` (each after ``prompt``), ``float32 [len, dim]``,
    by the encoder exported in ``model_dir`` (:func:`encode_texts`)."""
    tokenizer = TextTokenizer(Path(model_dir) / TOKENIZER_FILE, max_length, prompt)
    return encode_texts(texts, tokenizer, load_encoder(Path(model_dir), threads), pooling,
                        batch_size, progress)


def encode_texts(texts: Sequence[str], tokenizer: TextTokenizer, encoder: Encoder,
                 pooling: str, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Unit-length embeddings of ``texts`` by ``encoder``, ``float32 [len, dim]``.

    Texts are sorted by length before batching, so that a batch pads to a similar
    length rather than to the longest text of the corpus, then put back in order.
    """
    from tqdm import tqdm

    order = np.argsort([len(text) for text in texts], kind="stable")
    out: np.ndarray | None = None
    with tqdm(total=len(texts), unit="text", desc="embedding corpus", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = tokenizer.encode([texts[i] for i in rows])
            vectors = l2_normalize(pool(encoder(ids, mask), mask, pooling))
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            bar.update(len(rows))
    assert out is not None
    return out
