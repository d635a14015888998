"""The status that tritonop reports on its resources: our API, declared in the CRDs."""

from __future__ import annotations

from typing import Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"]
ConditionStatus = Literal["True", "False", "Unknown"]
CONDITION_TYPES = ("ConfigRendered", "ArtifactsReady", "Available")


class _StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)


class Condition(_StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    status: ConditionStatus
    reason: str = Field(..., pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    observed_generation: Optional[int] = None
    last_transition_time: str = Field(..., description="RFC 3339 time of the last change.",
                                      json_schema_extra={"format": "date-time"})


class Endpoints(_StatusModel):
    """In-cluster addresses of the Service, only those that answer from other pods."""

    openai: Optional[str] = Field(None, description="Base URL of the OpenAI-compatible API.")
    http: Optional[str] = Field(None, description="Triton's HTTP (api.triton.expose only).")
    grpc: Optional[str] = Field(None, description="Triton's gRPC (api.triton.expose only).")
    metrics: str


class ModelStatus(_StatusModel):
    """The model source and the exact revision its artifacts are built from."""

    source: str = Field(..., description="spec.model.source, as resolved.")
    resolved_revision: str = Field(
        ..., description="The exact revision (a commit sha, the hash of an S3 listing, a "
        "file's sha256) pinned by the serving.tritonop.dev/model-revision annotation or named "
        "by the source itself; remove the annotation to resolve a moving source again.")


class IndexStatus(_StatusModel):
    """The search index of an artifacts version, as its prepare Job reported it."""

    version: str = Field(..., description="The artifacts version (fingerprint) it belongs to.")
    kind: Literal["exact", "hnsw"]
    quantization: Optional[str] = Field(None, description="hnsw only: none, int8 or binary.")
    recall_at_10: Optional[float] = Field(
        None, description="hnsw only: recall@10 against the exact index, measured by prepare "
        "with recallQueries of the corpus's own texts as queries.")
    recall_queries: Optional[int] = None
    ef_search: Optional[int] = Field(
        None, description="hnsw only: candidates considered per query as served: the spec's "
        "efSearch, or higher where prepare raised it to reach minRecall.")


class EncoderStatus(_StatusModel):
    """The encoder of an artifacts version at int8: what quantizing it cost, as measured."""

    version: str = Field(..., description="The artifacts version (fingerprint) it belongs to.")
    precision: Literal["float32", "int8"]
    cosine_min: Optional[float] = Field(
        None, description="int8 only: the lowest cosine between int8 and float32 embeddings "
        "of the same text, measured by prepare on cosineTexts of the corpus's own texts.")
    cosine_mean: Optional[float] = Field(None, description="int8 only: their mean cosine.")
    cosine_texts: Optional[int] = None


VersionReport = TypeVar("VersionReport", IndexStatus, EncoderStatus)
"""What a prepare Job reported of one artifacts version."""


class ResourceStatus(_StatusModel):
    """What tritonop observed, for people (kubectl get/describe) and for the scale API."""

    phase: Phase = "Pending"
    message: str = ""
    observed_generation: Optional[int] = None
    replicas: int = 0
    ready_replicas: int = 0
    ready: str = Field("0/0", description="Ready/desired Triton pods, for kubectl get.")
    selector: str = Field("", description="Label selector of the pods (scale subresource).")
    endpoints: Optional[Endpoints] = None
    config_hash: str = ""
    artifacts_version: Optional[str] = Field(
        None, description="The complete artifacts version (fingerprint) the pods load; "
        "prepare: job switches the pods to a new one only once its Job has finished.")
    artifacts_cleaned: Optional[str] = Field(
        None, description="The version whose clean-up Job removed the older ones.")
    index: Optional[IndexStatus] = Field(
        None, description="The search index of the version prepared last (prepare: job), "
        "with the recall measured for an approximate one.")
    encoder: Optional[EncoderStatus] = Field(
        None, description="spec.model.precision: int8 only: the encoder of the version "
        "prepared last (prepare: job), with its cosine to the float32 model as measured.")
    model: Optional[ModelStatus] = Field(
        None, description="Only while the resource has an exact model revision (a remote "
        "source, pinned or named exactly).")
    # A map keyed by type, as metav1.Condition lists are: server-side apply and strategic
    # merges then treat each condition as one entry instead of replacing the whole list.
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
