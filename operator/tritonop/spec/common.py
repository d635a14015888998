"""Spec pieces that both custom resources share: batching, and how pods run in a cluster."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, field_validator, model_validator

from tritonop.spec.base import (
    MemoryQuantity,
    ResourceQuantity,
    SpecModel,
    cel_rules,
    resource_amount,
)


class StageSettings(SpecModel):
    """Dynamic batching and instances of one Triton model.

    Rendered into the model's ``config.pbtxt``: ``max_batch_size``,
    ``dynamic_batching.max_queue_delay_microseconds``,
    ``dynamic_batching.default_queue_policy.max_queue_size`` (a full queue answers
    HTTP 503 / gRPC UNAVAILABLE at once instead of letting latency grow without bound)
    and ``instance_group.count``.
    """

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most rows in one batch.")
    max_queue_delay_microseconds: int = Field(
        0, ge=0, le=10_000_000,
        description="How long a batch may wait for more requests when it cannot fill up.",
    )
    max_queue_size: int = Field(
        512, ge=1, le=1_000_000, description="Requests queued before new ones get 503."
    )
    instances: int = Field(1, ge=1, le=64, description="Model instances (processes).")


_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")
_GPU_RESOURCE = "nvidia.com/gpu"


def _resource_names_rule(name: str) -> str:
    return (f"!has(self.{name}) || self.{name}.all(k, k in {list(_CONTAINER_RESOURCES)} || "
            "k.startsWith('hugepages-') || k.contains('/'))")


_RESOURCE_NAMES_MESSAGE = ("a resource name is cpu, memory, ephemeral-storage, "
                           "hugepages-<size> or an extended resource such as example.com/fpga")
_NO_GPU_RULE = " && ".join(f"(!has(self.{name}) || !('{_GPU_RESOURCE}' in self.{name}))"
                           for name in ("requests", "limits"))
_NO_GPU_MESSAGE = (f"{_GPU_RESOURCE} is set by the operator: give gpus (LLMService) or "
                   "model.device: gpu (EmbeddingSearch) instead")


class ResourceRequirements(SpecModel):
    """Kubernetes container resources of the Triton container.

    Requests default to ``cpu: 1`` and ``memory: 2Gi`` (an LLMService ``4Gi``): a pod
    without requests is BestEffort, evicted first, and invisible to a CPU autoscaler.
    A key given here replaces that default; the others stay. Names and amounts are checked
    here and by the CRD, as the API server would check the Deployment's (a name such as
    ``cpus`` or an amount such as ``fast`` would otherwise be refused on the Deployment, to
    the operator rather than to the user); ``nvidia.com/gpu`` is the operator's, from
    ``gpus`` or ``model.device: gpu``, so that a GPU model never gets zero GPUs.
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        (_resource_names_rule("requests"), f"requests: {_RESOURCE_NAMES_MESSAGE}"),
        (_resource_names_rule("limits"), f"limits: {_RESOURCE_NAMES_MESSAGE}"),
        (_NO_GPU_RULE, _NO_GPU_MESSAGE),
    ))

    requests: dict[str, ResourceQuantity] = Field(
        default_factory=dict, max_length=16,
        description="Requests; cpu and memory default to 1 and 2Gi (LLMService: 4Gi).",
    )
    limits: dict[str, ResourceQuantity] = Field(
        default_factory=dict, max_length=16,
        description="Limits; nvidia.com/gpu is added for GPU models. threads: auto and "
        "prepare size their thread pools by the CPU limit.",
    )

    @model_validator(mode="after")
    def _known_names(self) -> ResourceRequirements:
        for field, amounts in (("requests", self.requests), ("limits", self.limits)):
            for name in amounts:
                if not (name in _CONTAINER_RESOURCES or name.startswith("hugepages-")
                        or "/" in name):
                    raise ValueError(f"{field}: {_RESOURCE_NAMES_MESSAGE}")
        if _GPU_RESOURCE in self.requests or _GPU_RESOURCE in self.limits:
            raise ValueError(_NO_GPU_MESSAGE)
        for name, request in self.requests.items():  # as the API server checks the pod
            if name in self.limits and resource_amount(request) > resource_amount(
                    self.limits[name]):
                raise ValueError(f"requests.{name}: {request} is more than limits.{name} "
                                 f"{self.limits[name]}")
        return self


class PersistentVolumeClaimVolume(SpecModel):
    claim_name: str = Field(..., min_length=1)


class HostPathVolume(SpecModel):
    path: str = Field(..., pattern=r"^/", description="Absolute path on the node (kind).")


class EmptyDirVolume(SpecModel):
    size_limit: MemoryQuantity = "8Gi"


_ONE_VOLUME = ("[has(self.persistentVolumeClaim), has(self.hostPath), has(self.emptyDir)]"
               ".filter(x, x).size() <= 1")
_EMPTY_DIR_NEEDS_PER_POD = "!has(self.emptyDir) || !has(self.prepare) || self.prepare == 'perPod'"
_NONE_NEEDS_A_VOLUME = ("!has(self.prepare) || self.prepare != 'none' || "
                        "has(self.persistentVolumeClaim) || has(self.hostPath)")
PrepareMode = Literal["job", "perPod", "none"]


class ArtifactsClaimSpec(SpecModel):
    """The PersistentVolumeClaim the operator creates for ``prepare: job`` when none is named.

    ``ReadWriteOnce`` is the default because every storage class offers it; the pods that
    mount it (the prepare Job and all Triton replicas) are then kept on one node by a
    required pod affinity, since a ReadWriteOnce volume attaches to one node at a time.
    Set ``ReadWriteMany`` (NFS, CephFS, EFS, Filestore...) to spread replicas over nodes.
    """

    storage_class_name: Optional[str] = Field(
        None, min_length=1, description="Storage class. Default: the cluster's default class."
    )
    size: MemoryQuantity = Field("8Gi", description="Room for a few versions of the artifacts.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="ReadWriteOnce keeps the resource's pods on one node; ReadWriteMany "
        "lets them spread.",
    )


class ArtifactsSpec(SpecModel):
    """Where the exported model, the index or the LLM weights live, and who prepares them.

    The volume is mounted at ``/artifacts``. ``prepare`` says who builds what the pods
    read: ``job`` (an EmbeddingSearch's default) runs one Kubernetes Job per resource and
    artifacts fingerprint into a shared volume (the claim named here, or one the operator
    creates from ``claim``), and Triton pods mount the result read-only, with no prepare
    step; ``perPod`` (an LLMService's default, and the choice for clusters without shared
    storage) runs a prepare init container in every pod, into an emptyDir unless a volume
    is named; ``none`` mounts a volume that something else filled
    (``tritonop prepare --artifacts-root`` on a machine that mounts it).
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        (_ONE_VOLUME, "set at most one of persistentVolumeClaim, hostPath, emptyDir"),
        (_EMPTY_DIR_NEEDS_PER_POD, "an emptyDir is per pod: it needs prepare: perPod"),
        (_NONE_NEEDS_A_VOLUME,
         "prepare: none needs a prepared persistentVolumeClaim or hostPath"),
    ))

    persistent_volume_claim: Optional[PersistentVolumeClaimVolume] = None
    host_path: Optional[HostPathVolume] = None
    empty_dir: Optional[EmptyDirVolume] = Field(
        None, description="Per-pod storage: artifacts are prepared in every pod."
    )
    sub_path: str = Field("", pattern=r"^[^/].*$|^$", description="Folder inside the volume.")
    prepare: Optional[PrepareMode] = Field(
        None,
        description="job, perPod or none. Default: job for an EmbeddingSearch (perPod with "
        "an emptyDir), perPod for an LLMService.",
    )
    claim: ArtifactsClaimSpec = Field(
        ArtifactsClaimSpec(),
        description="The claim the operator creates for prepare: job when no volume is named.",
    )
    prepare_image: Optional[str] = Field(
        None, min_length=1, description="Image with the tritonop CLI. Default: the operator's."
    )

    @field_validator("prepare", mode="before")
    @classmethod
    def _from_bool(cls, value: object) -> object:
        """``prepare: true|false`` from before the modes existed: per pod, or nothing."""
        if isinstance(value, bool):
            return "perPod" if value else "none"
        return value

    @model_validator(mode="after")
    def _one_volume(self) -> ArtifactsSpec:
        named = [self.persistent_volume_claim, self.host_path, self.empty_dir]
        if sum(volume is not None for volume in named) > 1:
            raise ValueError("set at most one of persistentVolumeClaim, hostPath, emptyDir")
        if self.empty_dir is not None and self.prepare not in (None, "perPod"):
            raise ValueError("an emptyDir is per pod: it needs prepare: perPod")
        if self.prepare == "none" and self.persistent_volume_claim is None \
                and self.host_path is None:
            raise ValueError("prepare: none needs a prepared persistentVolumeClaim or hostPath")
        return self

    def mode(self, default: PrepareMode) -> PrepareMode:
        """The prepare mode in effect, given the kind's ``default``."""
        if self.prepare is not None:
            return self.prepare
        return "perPod" if self.empty_dir is not None else default

    def operator_claim(self, default: PrepareMode) -> bool:
        """Whether the operator creates the artifacts claim (job mode, no volume named)."""
        return self.mode(default) == "job" and self.persistent_volume_claim is None \
            and self.host_path is None


_MIN_LE_MAX = "self.minReplicas <= self.maxReplicas"


class AutoscalingSpec(SpecModel):
    """A HorizontalPodAutoscaler (autoscaling/v2) for the Triton deployment.

    CPU utilisation by default. ``targetQueueTimeMicroseconds`` adds a per-pod metric,
    ``tritonop_queue_time_microseconds``, which a Prometheus adapter derives from Triton's
    ``nv_inference_queue_duration_us`` (see docs/autoscaling.md).
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        (_MIN_LE_MAX, "minReplicas must be <= maxReplicas"),
    ))

    min_replicas: int = Field(1, ge=1, le=1000)
    max_replicas: int = Field(..., ge=1, le=1000)
    target_cpu_utilization_percentage: int = Field(70, ge=1, le=100)
    target_queue_time_microseconds: Optional[int] = Field(None, ge=1)
    target_requests_in_flight: Optional[int] = Field(
        None, ge=1,
        description="Average gateway requests in flight per pod "
        "(tritonop_gateway_requests_in_flight, through a Prometheus adapter).",
    )
    external: bool = Field(
        False,
        description="Another controller scales the Deployment (a KEDA ScaledObject): no HPA "
        "is rendered and the replica count is left to it.",
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be <= maxReplicas")
        return self


MONITORING_LABEL = "serving.tritonop.dev/monitoring"


class NetworkPolicySpec(SpecModel):
    """Who may open a connection to the pods: on by default.

    The gateway port admits ``from`` (default: pods of the resource's own namespace), and
    Triton's HTTP and gRPC ports too when ``api.triton.expose`` is set; the metrics port
    admits ``metricsFrom`` (default: namespaces labelled
    ``serving.tritonop.dev/monitoring: "true"``, where Prometheus runs). A NetworkPolicy
    is enforced only where the cluster's network plugin implements them.
    """

    enabled: bool = Field(True, description="Render the NetworkPolicy.")
    from_: list[dict[str, Any]] = Field(
        default_factory=list, alias="from",
        description="NetworkPolicyPeer objects admitted to the gateway port (and Triton's "
        "ports when api.triton.expose). Default: the resource's own namespace.",
    )
    metrics_from: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"namespaceSelector": {"matchLabels": {
            MONITORING_LABEL: "true"}}}],
        description="NetworkPolicyPeer objects admitted to the metrics port (8002). Default: "
        "namespaces labelled serving.tritonop.dev/monitoring=true.",
    )


class OpenAISpec(SpecModel):
    """The OpenAI-compatible gateway, a second container in each Triton pod."""

    enabled: bool = Field(True, description="Serve /v1 (port 8080, named openai).")


class KeyLimits(SpecModel):
    """What one API key may use of one model, per gateway (pod); unset means no limit."""

    requests_per_minute: Optional[int] = Field(
        None, ge=1, le=10_000_000, description="Requests per minute; more get 429."
    )
    tokens_per_minute: Optional[int] = Field(
        None, ge=1, le=1_000_000_000,
        description="Prompt and generated tokens per minute; beyond it new requests get 429.",
    )
    max_in_flight_share: Optional[float] = Field(
        None, gt=0, le=1,
        description="Share of the model's in-flight admission places one key may hold.",
    )


class ApiAuthSpec(SpecModel):
    """API keys for the gateway, from a Secret the gateway container mounts.

    Each data entry of the Secret is one client: the entry's name is the client's name (in
    metrics and the access log), its value the key. Clients send ``Authorization: Bearer
    <key>`` or ``x-api-key: <key>``; ``/health/*`` stays open. A changed Secret is picked
    up without a restart.
    """

    secret_name: str = Field(..., min_length=1, max_length=253,
                             description="Secret of keys: <client name>: <key>.")
    protect_metrics: bool = Field(False, description="/metrics needs a key too.")
    limits: KeyLimits = Field(KeyLimits(), description="Limits of every key.")
    keys: dict[str, KeyLimits] = Field(
        default_factory=dict, description="Limits of named clients, replacing `limits`."
    )


class ApiTLSSpec(SpecModel):
    """HTTPS on the gateway port."""

    secret_name: str = Field(..., min_length=1, max_length=253,
                             description="A kubernetes.io/tls Secret (tls.crt, tls.key).")


_EXPOSE_NEEDS_ADMIN = "!self.expose || has(self.adminSecretName)"


class TritonAccessSpec(SpecModel):
    """Whether Triton's own HTTP and gRPC protocols are reachable from outside the pod.

    By default they listen on the pod's loopback only: clients use the gateway. Exposed,
    they are on the Service too, and Triton's control APIs (model repository, model
    config, statistics, trace, logging, shared memory) need the header
    ``triton-admin-key`` with the key of ``adminSecretName`` over HTTP (gRPC clients send it
    as metadata ``triton-grpc-protocol-triton-admin-key``, as Triton names it).
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        (_EXPOSE_NEEDS_ADMIN, "expose needs adminSecretName: Triton's control APIs are "
         "restricted with its key"),
    ))

    expose: bool = Field(False, description="Publish Triton's HTTP and gRPC on the Service.")
    admin_secret_name: Optional[str] = Field(
        None, min_length=1, max_length=253,
        description="Secret whose `admin-key` entry opens Triton's control APIs "
        "(HTTP header triton-admin-key; gRPC metadata triton-grpc-protocol-triton-admin-key). "
        "Required with expose.",
    )

    @model_validator(mode="after")
    def _expose_needs_admin(self) -> TritonAccessSpec:
        if self.expose and self.admin_secret_name is None:
            raise ValueError("expose needs adminSecretName: Triton's control APIs are "
                             "restricted with its key")
        return self


class GatewayLimits(SpecModel):
    """Bounds the gateway checks before it spends work on a request."""

    max_embedding_inputs: int = Field(
        512, ge=1, le=2048, description="Texts in one /v1/embeddings request."
    )
    max_input_characters: int = Field(
        32768, ge=1, le=1_000_000,
        description="Characters of one text (embeddings, search) or one prompt (all "
        "message contents together), checked before tokenizing.",
    )
    stream_stall_seconds: float = Field(
        30, ge=1, le=600,
        description="A stream whose client takes no data for this long is ended.",
    )
    triton_timeout_seconds: float = Field(
        120, ge=1, le=3600,
        description="The most one call to Triton may take (a stream: the longest gap "
        "between two responses).",
    )


_OPENAI_OR_EXPOSED = "self.openai.enabled || (has(self.triton) && self.triton.expose)"


class ApiSpec(SpecModel):
    """The gateway's API and its admission bound in front of the whole Triton pipeline.

    Unset bounds are derived from batching: an LLM takes ``engine.maxSequences`` in flight
    and ``engine.maxWaiting`` waiting; a search takes one encoder batch per encoder
    instance in flight and as many waiting. Beyond them the gateway answers 429 at once.
    """

    model_config = ConfigDict(json_schema_extra=cel_rules(
        (_OPENAI_OR_EXPOSED, "with openai.enabled false, set triton.expose: nothing else "
         "can reach the models"),
    ))

    openai: OpenAISpec = OpenAISpec()
    max_in_flight: Optional[int] = Field(
        None, ge=1, le=100_000, description="Requests forwarded to Triton at once, per pod."
    )
    max_waiting: Optional[int] = Field(
        None, ge=0, le=100_000,
        description="Requests waiting in the gateway beyond those; more get 429.",
    )
    auth: Optional[ApiAuthSpec] = Field(None, description="API keys (none: no key needed).")
    tls: Optional[ApiTLSSpec] = Field(None, description="HTTPS on the gateway port.")
    triton: TritonAccessSpec = TritonAccessSpec()
    limits: GatewayLimits = GatewayLimits()

    @model_validator(mode="after")
    def _reachable(self) -> ApiSpec:
        if not self.openai.enabled and not self.triton.expose:
            raise ValueError("with openai.enabled false, set triton.expose: nothing else "
                             "can reach the models")
        return self


class DeploymentSpec(SpecModel):
    """How the Triton deployment that serves a resource runs in a cluster."""

    api: ApiSpec = ApiSpec()

    replicas: int = Field(1, ge=0, le=1000, description="Triton pods (ignored with autoscaling).")
    image: Optional[str] = Field(
        None, min_length=1, description="Triton image. Default: the project's image."
    )
    resources: ResourceRequirements = ResourceRequirements()
    artifacts: ArtifactsSpec = ArtifactsSpec()
    autoscaling: Optional[AutoscalingSpec] = None
    network_policy: NetworkPolicySpec = NetworkPolicySpec()
    shm_size: MemoryQuantity = Field(
        "1Gi", description="Memory-backed /dev/shm: the Python backend passes tensors there."
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: Optional[dict[str, Any]] = None


# --- where a model comes from (both kinds' spec.model) ----------------------------------------

SOURCE_SCHEMES = (
    "'hf://<org>/<name>[@<revision>]' (or '<org>/<name>[@<revision>]') from the Hugging Face "
    "Hub (HF_ENDPOINT, HF_TOKEN), 's3://<bucket>/<prefix>' from S3 or an S3-compatible store "
    "(see s3), 'https://.../<file>' with its sha256, 'pvc://<claim>/<path>' from a "
    "PersistentVolumeClaim, 'package:<pip distribution>' for a model shipped inside an "
    "installed Python package, or a path."
)
"""The ``source`` forms both kinds take, for their fields' descriptions."""
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# http:// too: the sha256 makes the transport's integrity irrelevant (artifacts/fetch.py).
HTTPS_NEEDS_SHA256 = (
    "!has(self.source) || !(self.source.startsWith('https://') || "
    "self.source.startsWith('http://')) || has(self.sha256)",
    "sha256 is required with an https:// source: the hex sha256 of the file, which is "
    "checked before the file is served",
)


def check_https_sha256(source: str, sha256: str | None) -> None:
    """The pydantic half of :data:`HTTPS_NEEDS_SHA256` (the CRD's CEL rule is the other)."""
    if source.startswith(("https://", "http://")) and sha256 is None:
        raise ValueError(HTTPS_NEEDS_SHA256[1])


class ModelCredentials(SpecModel):
    """The Secret that holds the model store's credentials."""

    secret_name: str = Field(
        ..., min_length=1, max_length=253,
        description="A Secret in the resource's namespace with HF_TOKEN (Hugging Face Hub) "
        "or AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (S3). Only the "
        "step that downloads the model reads it; Triton's containers never see it.",
    )


class S3Settings(SpecModel):
    """Where an ``s3://`` source's store is, when it is not AWS's default for the region."""

    endpoint: Optional[str] = Field(
        None, min_length=1, max_length=2048, pattern=r"^https?://",
        description="The store's URL, e.g. https://storage.googleapis.com or a MinIO or "
        "SeaweedFS address. Default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL of the step "
        "that downloads, else AWS.",
    )
    region: Optional[str] = Field(
        None, min_length=1, max_length=64,
        description="The bucket's region. Default: AWS_REGION or AWS_DEFAULT_REGION, else "
        "us-east-1.",
    )


SHA256_DESCRIPTION = (
    "The hex sha256 of an https:// source's file; required with one. The download is "
    "checked against it, and it names the file's revision (a changed file needs a new sha256)."
)
ALLOW_PICKLE_DESCRIPTION = (
    "Take pickled weights (pytorch_model.bin, *.pt) from a source that has no safetensors. "
    "Loading a pickle runs code from the file: set it only for a source you trust."
)
S3_DESCRIPTION = "The store of an s3:// source, when it is not AWS."
CREDENTIALS_DESCRIPTION = "Credentials for a private or gated model source."
