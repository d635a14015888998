"""Kubernetes objects that serve one resource, as plain manifest dicts.

``render_children(resource)`` returns, in apply order: ServiceAccount, ConfigMap,
Service, Deployment, when asked for, PodDisruptionBudget and HorizontalPodAutoscaler,
and the NetworkPolicy unless ``networkPolicy.enabled`` is false. Owner references are
added by the reconciler, which knows the owner's uid; everything else is decided here,
from the spec alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from tritonop import API_GROUP, __version__
from tritonop.artifacts.resolve import UNRESOLVED, model_revision, source_scheme
from tritonop.artifacts.versions import corpus_sha256, resource_fingerprint
from tritonop.gateway.config import API_KEYS_PATH, gateway_config, openai_enabled
from tritonop.render.repository import render_repository
from tritonop.render.server_args import ADMIN_KEY_ENV, restricted_api_args
from tritonop.resources import CORPUS_SHA256_ANNOTATION, MODEL_REVISION_ANNOTATION, Resource
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec, quantity_bytes
from tritonop.spec.base import resource_amount
from tritonop.spec.common import DeploymentSpec, PrepareMode

Manifest = dict[str, Any]

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
OPENAI_PORT = 8080
# Where Triton's HTTP and gRPC listen unless spec.api.triton.expose: the pod's own
# loopback, so only the gateway beside it (same network namespace) reaches them. An IPv4
# literal, not "localhost", which may resolve to ::1 first.
LOOPBACK = "127.0.0.1"
ALL_ADDRESSES = "0.0.0.0"
# With expose, Triton's control APIs need the admin Secret's key (server_args.ADMIN_HEADER).
ADMIN_SECRET_KEY = "admin-key"
GATEWAY_FILE = "gateway.json"
TLS_PATH = "/etc/tritonop/tls"  # tls.crt and tls.key of spec.api.tls's Secret
# Secret files readable by their group only: the kubelet gives them the pod's fsGroup,
# which the gateway's user (UID) is in; no one else in the container reads a key.
SECRET_MODE = 0o440
GATEWAY_REQUESTS = {"cpu": "250m", "memory": "256Mi"}
REPOSITORY_PATH = "/models"
ARTIFACTS_PATH = "/artifacts"
CONFIG_HASH_ANNOTATION = f"{API_GROUP}/config-hash"
RESOURCE_LABEL = f"{API_GROUP}/resource"
RESOURCE_FILE = "resource.yaml"
UID = 1000  # the non-root user both images run as
TMP_PATH = "/tmp"
# Requests a pod gets unless spec.resources.requests names them: a pod with no request is
# BestEffort (evicted first), and a CPU HorizontalPodAutoscaler needs a CPU request to
# compute utilisation. Sized for the examples (all-MiniLM-L6-v2 with 20,000 texts peaks
# below 1.5 GiB; SmolLM2-135M in float32 below 2 GiB).
DEFAULT_REQUESTS = {"EmbeddingSearch": {"cpu": "1", "memory": "2Gi"},
                    "LLMService": {"cpu": "1", "memory": "4Gi"}}
PREPARE_REQUESTS = {"cpu": "1", "memory": "2Gi"}
# How long the prepare init container may take on a cold volume (an encoder export plus a
# large corpus, or a large GGUF conversion): Kubernetes has no init-container timeout, but
# the Deployment's progress deadline has to leave room for it.
PREPARE_BUDGET_SECONDS = 1800
# Who prepares artifacts when the spec does not say (ArtifactsSpec.mode).
DEFAULT_PREPARE: dict[str, PrepareMode] = {"EmbeddingSearch": "perPod", "LLMService": "perPod"}
# Pods that mount one ReadWriteOnce artifacts claim (the Job's and Triton's) carry this
# label and a required affinity to it, so they land on the node the volume is attached to.
ARTIFACTS_LABEL = f"{API_GROUP}/artifacts"
FINGERPRINT_LABEL = f"{API_GROUP}/artifacts-fingerprint"
JOB_BACKOFF_LIMIT = 2
JOB_TTL_SECONDS = 3600  # the operator records a finished version in status; the Job may go
PURPOSE_LABEL = f"{API_GROUP}/purpose"
# The resolve Job makes one metadata call: a failure is a wrong name or credentials, which a
# retry storm would not fix, and a hub that does not answer within minutes will not later.
RESOLVE_BACKOFF_LIMIT = 1
RESOLVE_DEADLINE_SECONDS = 300
RESOLVE_REQUESTS = {"cpu": "100m", "memory": "256Mi"}
# The keys of spec.model.credentials' Secret that the downloading step reads, each optional:
# a Hub token (and a private hub's address), or S3 credentials.
CREDENTIAL_KEYS = ("HF_TOKEN", "HF_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                   "AWS_SESSION_TOKEN")
REMOTE_SCHEMES = ("hf", "s3", "https")
# Probes poll every second while Triton starts (a cheap GET), so a pod with prepared
# artifacts is Ready within a second of Triton, instead of at the next 10 s tick.
STARTUP_PERIOD_SECONDS = 1
# Readiness every 2 s: the kubelet reports a container Ready at its first readiness probe
# after the startup probe passes, so this period is added to a new pod's start; 15
# failures keep the 30 s a pod may stay unresponsive before it leaves the Service.
READINESS = {"periodSeconds": 2, "failureThreshold": 15}
# A pod's stop: the gateway drains (readiness 503 at once, new requests served for its
# --drain-seconds, 10 by default), then finishes those in flight (30 s at most); Triton's
# preStop hook holds Triton's SIGTERM until then, and Triton keeps the rest of the grace
# period for its own stop.
TERMINATION_GRACE_SECONDS = 60
TRITON_STOP_SECONDS = 15
# Triton's preStop hook (python3 is in the Triton image; no other tool is assumed): wait
# while anything listens on or holds a connection to the gateway's port, at most argv[2]
# seconds. /proc/net/tcp lists the sockets of the pod's network namespace, which both
# containers share; LISTEN, ESTABLISHED, SYN_RECV and CLOSE_WAIT are the gateway's own
# (a connection it closed lingers in other states after the process is gone).
GATEWAY_GONE_SCRIPT = """\
import sys, time
port, end = ':%04X' % int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
def busy():
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            rows = [row.split() for row in open(table).read().splitlines()[1:]]
        except OSError:
            continue
        if any(r[1].endswith(port) and r[3] in ('01', '03', '08', '0A') for r in rows):
            return True
    return False
while busy() and time.monotonic() < end:
    time.sleep(0.2)
"""


@dataclass(frozen=True)
class Images:
    """Container images; the operator reads overrides from its environment."""

    triton: str = f"ghcr.io/tritonop/triton:{__version__}"
    operator: str = f"ghcr.io/tritonop/operator:{__version__}"


def names(resource: Resource) -> dict[str, str]:
    """Deterministic child names (no generateName: a repeated apply is harmless)."""
    return child_names(resource.name)


def child_names(base: str) -> dict[str, str]:
    """The child names of a resource called ``base``."""
    return {"deployment": f"{base}-triton", "service": base, "config": f"{base}-triton",
            "account": f"{base}-triton", "budget": f"{base}-triton",
            "autoscaler": f"{base}-triton", "policy": f"{base}-triton",
            "claim": f"{base}-artifacts"}


def prepare_mode(resource: Resource) -> PrepareMode:
    """``job``, ``perPod`` or ``none``: the spec's choice, else the kind's default."""
    return resource.spec.artifacts.mode(DEFAULT_PREPARE[resource.kind])


def operator_claim(resource: Resource) -> bool:
    """Whether the operator creates the artifacts claim (job mode with no volume named)."""
    return resource.spec.artifacts.operator_claim(DEFAULT_PREPARE[resource.kind])


def artifacts_fingerprint(resource: Resource) -> str | None:
    """The artifacts version an EmbeddingSearch's pods load (None for an LLMService)."""
    if isinstance(resource.spec, EmbeddingSearchSpec):
        return resource_fingerprint(resource)
    return None


def job_name(resource: Resource, fingerprint: str, purpose: str = "prepare") -> str:
    """``<name>-prepare-<fingerprint>`` cut to 63 characters (a Job's name is its pods'
    label): one Job per version. A name too long to leave 6 digits of the fingerprint is
    cut, with 5 digits of its own hash so that two long names stay apart."""
    name = resource.name
    room = 63 - len(f"-{purpose}-") - 6
    if len(name) > room:
        name = f"{name[: room - 6]}-{hashlib.sha256(name.encode()).hexdigest()[:5]}"
    prefix = f"{name}-{purpose}-"
    return prefix + fingerprint[: 63 - len(prefix)]


def selector_labels(resource: Resource) -> dict[str, str]:
    return {"app.kubernetes.io/name": "triton", "app.kubernetes.io/instance": resource.name,
            RESOURCE_LABEL: f"{resource.kind.lower()}.{resource.name}"}


def selector_string(resource: Resource) -> str:
    """The pod selector as ``status.selector`` publishes it for the scale subresource."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(resource).items()))


def _labels(resource: Resource) -> dict[str, str]:
    component = "embedding-search" if resource.kind == "EmbeddingSearch" else "llm"
    return {**selector_labels(resource), "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "tritonop", "app.kubernetes.io/part-of": "tritonop"}


def _metadata(resource: Resource, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": resource.namespace, "labels": _labels(resource), **extra}


def config_key(path: str) -> str:
    """ConfigMap keys cannot hold '/': ``m/1/model.py`` is stored as ``m__1__model.py``."""
    return path.replace("/", "__")


def resource_document(resource: Resource) -> str:
    """The resource as the prepare init container reads it back.

    Only what decides the artifacts is kept: how pods are deployed (replicas, resources,
    scheduling) is left out, so that scaling does not change the config hash and roll
    every pod.
    """
    spec = resource.spec.model_dump(by_alias=True, exclude_none=True,
                                     exclude=set(DeploymentSpec.model_fields))
    metadata: Manifest = {"name": resource.name, "namespace": resource.namespace}
    annotations = {}
    if isinstance(resource.spec, EmbeddingSearchSpec):
        # The corpus hash this render used: prepare builds the version the pods expect
        # even where the operator could not read the corpus (a file on the volume).
        annotations[CORPUS_SHA256_ANNOTATION] = corpus_sha256(resource)
    if resource.model_revision:
        # The model revision this render used: prepare downloads that one, not whatever a
        # branch or an S3 prefix holds by the time it runs.
        annotations[MODEL_REVISION_ANNOTATION] = resource.model_revision
    if annotations:
        metadata["annotations"] = annotations
    body = {"apiVersion": f"{API_GROUP}/v1alpha1", "kind": resource.kind,
            "metadata": metadata, "spec": spec}
    return yaml.safe_dump(body, sort_keys=True)


def config_map(resource: Resource) -> Manifest:
    """The model repository (every config.pbtxt and model.py) plus the resource itself."""
    files = render_repository([resource], ARTIFACTS_PATH)
    data = {config_key(path): content.decode() for path, content in sorted(files.items())}
    data[RESOURCE_FILE] = resource_document(resource)
    if openai_enabled(resource):
        data[GATEWAY_FILE] = gateway_config([resource]).to_json()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(resource, names(resource)["config"]), "data": data}


def config_hash(config: Manifest) -> str:
    """Hash of the rendered configuration: a pod annotation, so any change rolls the pods."""
    digest = hashlib.sha256(yaml.safe_dump(config["data"], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def service_account(resource: Resource) -> Manifest:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _metadata(resource, names(resource)["account"]),
            "automountServiceAccountToken": False}


def triton_exposed(resource: Resource) -> bool:
    """Whether Triton's own HTTP and gRPC are reachable from outside the pod."""
    return resource.spec.api.triton.expose


def _triton_ports(resource: Resource) -> list[tuple[str, int]]:
    """Triton's ports that listen beyond the pod's loopback: metrics, and http/grpc if exposed."""
    exposed = [("http", HTTP_PORT), ("grpc", GRPC_PORT)] if triton_exposed(resource) else []
    return [*exposed, ("metrics", METRICS_PORT)]


def _ports(resource: Resource) -> list[tuple[str, int]]:
    """Named ports a Triton pod serves beyond its loopback (the Service publishes them)."""
    ports = _triton_ports(resource)
    return [*ports, ("openai", OPENAI_PORT)] if openai_enabled(resource) else ports


def service(resource: Resource) -> Manifest:
    ports = [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
             for name, port in _ports(resource)]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(resource, names(resource)["service"]),
            "spec": {"type": "ClusterIP", "selector": selector_labels(resource), "ports": ports}}


def endpoints(resource: Resource) -> dict[str, str]:
    """The Service's addresses that answer (status.endpoints): no port that is closed.

    ``openai`` is the base URL an OpenAI client takes; Triton's ``http`` and ``grpc`` are
    listed only with ``api.triton.expose``.
    """
    host = f"{names(resource)['service']}.{resource.namespace}.svc"
    found: dict[str, str] = {}
    if openai_enabled(resource):
        scheme = "https" if resource.spec.api.tls is not None else "http"
        found["openai"] = f"{scheme}://{host}:{OPENAI_PORT}/v1"
    if triton_exposed(resource):
        found.update(http=f"http://{host}:{HTTP_PORT}", grpc=f"{host}:{GRPC_PORT}")
    found["metrics"] = f"http://{host}:{METRICS_PORT}/metrics"
    return found


_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def _cache_bytes(resource: Resource) -> int:
    spec = resource.spec
    if isinstance(spec, EmbeddingSearchSpec) and spec.cache.enabled:
        return quantity_bytes(spec.cache.size)
    return 0


def gpus(resource: Resource) -> int:
    """``nvidia.com/gpu`` per pod: an LLMService's ``gpus``, one for a GPU encoder."""
    spec = resource.spec
    if isinstance(spec, LLMServiceSpec):
        return spec.gpus
    return 1 if spec.model.device == "gpu" else 0  # type: ignore[union-attr]


def model_names(config: Manifest) -> list[str]:
    """The Triton models in the rendered repository (ConfigMap keys ``<model>__config.pbtxt``)."""
    return sorted(key.removesuffix("__config.pbtxt") for key in config["data"]
                  if key.endswith("__config.pbtxt"))


def _environment(resource: Resource) -> list[Manifest]:
    """Variables both containers need on a read-only root filesystem.

    Everything that caches (Hugging Face, torch's compilers, XDG users) is pointed at
    the /tmp emptyDir: with ``readOnlyRootFilesystem`` a default under the image's home
    would fail at the first write. Without a GPU request, ``NVIDIA_VISIBLE_DEVICES=void``
    keeps the NVIDIA container runtime from exposing a node's GPUs that the scheduler
    did not give this pod (the NGC images set it to ``all``).
    """
    env = {"HOME": TMP_PATH, "XDG_CACHE_HOME": f"{TMP_PATH}/.cache",
           "HF_HOME": f"{TMP_PATH}/.cache/huggingface", "HF_HUB_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": f"{TMP_PATH}/.cache/torchinductor",
           "TRITONOP_ARTIFACTS": ARTIFACTS_PATH}
    if not gpus(resource):
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    return [{"name": name, "value": value} for name, value in env.items()]


def model_source_env(resource: Resource) -> list[Manifest]:
    """What a container that downloads the model adds to its environment: nothing for a
    local source; for a remote one, ``HF_HUB_OFFLINE=0`` and, with
    ``spec.model.credentials``, each credential key of that Secret by ``secretKeyRef``
    (optional: a Hub Secret has no AWS keys). Only the resolve and prepare steps get it:
    the keys never reach Triton's or the gateway's containers, nor the pod spec as values.
    """
    if source_scheme(resource) not in REMOTE_SCHEMES:
        return []
    env: list[Manifest] = [{"name": "HF_HUB_OFFLINE", "value": "0"}]
    credentials = resource.spec.model.credentials
    if credentials is not None:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {
            "name": credentials.secret_name, "key": key, "optional": True}}}
            for key in CREDENTIAL_KEYS]
    return env


def _downloading(env: list[Manifest], resource: Resource) -> list[Manifest]:
    """``env`` with :func:`model_source_env`'s entries in place of those of the same name."""
    override = {entry["name"]: entry for entry in model_source_env(resource)}
    merged = [override.pop(entry["name"], entry) for entry in env]
    return [*merged, *override.values()]


def _triton_resources(resource: Resource) -> Manifest:
    """The spec's resources over the default requests (a default above the spec's limit
    becomes the limit: the API server refuses a request above its limit), plus the GPUs
    the model needs."""
    spec = resource.spec
    limits = dict(spec.resources.limits)
    defaults = {name: (limits[name] if name in limits and
                       resource_amount(limits[name]) < resource_amount(amount) else amount)
                for name, amount in DEFAULT_REQUESTS[resource.kind].items()}
    requests = {**defaults, **spec.resources.requests}
    if gpus(resource):
        limits.setdefault("nvidia.com/gpu", gpus(resource))
    return {"requests": requests, **({"limits": limits} if limits else {})}


def startup_seconds(resource: Resource) -> int:
    """How long the startup probe lets Triton load (an LLM can take minutes)."""
    return 1800 if isinstance(resource.spec, LLMServiceSpec) else 600


def _triton_container(resource: Resource, config: Manifest, images: Images) -> Manifest:
    spec = resource.spec
    # Explicit model control, each rendered model named: the kubelet's ConfigMap volume
    # holds "..data" and "..<timestamp>" folders beside the models, and Triton's default
    # mode loads every folder of the repository (and, with --exit-on-error, exits on
    # them). Naming the models keeps the repository read-only and the pod start free of a
    # copy step; it also means Triton never polls, so a ConfigMap update reaches a pod
    # only through the rollout that the config-hash annotation triggers.
    args = [f"--model-repository={REPOSITORY_PATH}", "--model-control-mode=explicit",
            *(f"--load-model={model}" for model in model_names(config)),
            *_listen_args(resource),
            "--disable-auto-complete-config", "--exit-on-error=true", "--log-verbose=0"]
    if _cache_bytes(resource):
        args.append(f"--cache-config=local,size={_cache_bytes(resource)}")
    env = _environment(resource)
    if triton_exposed(resource):
        # The kubelet expands $(VAR) in args from the container's env: the key stays in
        # the Secret, never in the pod spec. A missing Secret or key keeps the container
        # from starting (CreateContainerConfigError) rather than opening the APIs.
        secret = resource.spec.api.triton.admin_secret_name
        env.append({"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": secret, "key": ADMIN_SECRET_KEY}}})
    return {
        "name": "triton",
        "image": spec.image or images.triton,
        "command": ["tritonserver"],
        "args": args,
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"}
                  for n, p in _triton_ports(resource)],
        "env": env,
        **_triton_probes(resource),
        "resources": _triton_resources(resource),
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "model-repository", "mountPath": REPOSITORY_PATH, "readOnly": True},
            {"name": "artifacts", "mountPath": ARTIFACTS_PATH, "readOnly": True,
             **({"subPath": spec.artifacts.sub_path} if spec.artifacts.sub_path else {})},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": TMP_PATH},
        ],
    }


def _listen_args(resource: Resource) -> list[str]:
    """Ports and addresses: HTTP and gRPC on loopback unless exposed, metrics on all.

    Exposed, the control APIs need the admin key (Triton answers 403 over HTTP and
    UNAVAILABLE over gRPC without it); inference, metadata and health stay open.
    """
    address = ALL_ADDRESSES if triton_exposed(resource) else LOOPBACK
    args = [f"--http-address={address}", f"--http-port={HTTP_PORT}",
            f"--grpc-address={address}", f"--grpc-port={GRPC_PORT}",
            # Its default is --http-address: named, so that metrics stay scrapeable.
            f"--metrics-address={ALL_ADDRESSES}", f"--metrics-port={METRICS_PORT}"]
    if triton_exposed(resource):
        args += restricted_api_args(f"$({ADMIN_KEY_ENV})")
    return args


def _triton_probes(resource: Resource) -> Manifest:
    """Startup, readiness and liveness probes of the Triton container.

    The kubelet probes the pod IP, where Triton's HTTP port does not listen unless
    exposed; the probes then use the metrics port. Triton starts its endpoints, metrics
    included, only once every ``--load-model`` model has loaded, and with
    ``--exit-on-error`` exits instead when one fails. Seen with the Triton 2.51 binary:
    with a model whose ``initialize`` sleeps 8 s, ``/metrics`` refused connections until
    8.3 s, when ``/v2/health/ready`` turned 200 in the same poll; with one that raises,
    ``/metrics`` never answered and the process exited 1. So metrics answering means
    Triton started with its models, and the gateway's readiness, which asks Triton's
    ``/v2/health/ready`` over loopback, keeps the pod out of the Service while a model
    is not ready later on. Loading is slow, so the startup probe holds off liveness.
    """
    if triton_exposed(resource):
        ready = {"path": "/v2/health/ready", "port": "http"}
        live = {"path": "/v2/health/live", "port": "http"}
    else:
        ready, live = {"path": "/metrics", "port": "metrics"}, {"path": "/metrics",
                                                                 "port": "metrics"}
    probe = {"httpGet": ready, "periodSeconds": 10, "timeoutSeconds": 5}
    return {
        "readinessProbe": {**probe, **READINESS},
        "livenessProbe": {"httpGet": live, "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": 6},
        "startupProbe": {**probe, "periodSeconds": STARTUP_PERIOD_SECONDS,
                         "failureThreshold": startup_seconds(resource) // STARTUP_PERIOD_SECONDS},
    }


def _triton_pre_stop() -> Manifest:
    """Triton stops after the gateway: the kubelet runs each container's preStop hook at
    once and sends a container SIGTERM when its own hook returns, so the gateway (no hook)
    drains and finishes its requests while this hook waits for it to be gone; then Triton
    gets SIGTERM with nothing left in flight."""
    wait = TERMINATION_GRACE_SECONDS - TRITON_STOP_SECONDS
    return {"preStop": {"exec": {"command": ["python3", "-c", GATEWAY_GONE_SCRIPT,
                                             str(OPENAI_PORT), str(wait)]}}}


def _gateway_container(resource: Resource, images: Images) -> Manifest:
    """The OpenAI-compatible gateway beside Triton, reaching it on loopback (gRPC and HTTP).

    Its readiness follows Triton's (``/health/ready`` asks Triton), so a pod whose models
    are loading gets no OpenAI traffic; liveness checks only the gateway's own loop. Its
    startup probe polls every second like Triton's: a pod is Ready only when both
    containers are, and a 10 s readiness tick would otherwise decide when a new pod
    serves.
    """
    scheme = {"scheme": "HTTPS"} if resource.spec.api.tls is not None else {}
    ready = {"httpGet": {"path": "/health/ready", "port": "openai", **scheme},
             "timeoutSeconds": 5}
    return {
        "name": "gateway",
        "image": images.operator,
        "command": ["tritonop"],
        "args": ["gateway", "--config", f"/config/{GATEWAY_FILE}",
                 "--triton", f"{LOOPBACK}:{GRPC_PORT}", "--triton-http", f"{LOOPBACK}:{HTTP_PORT}",
                 "--port", str(OPENAI_PORT), *_gateway_secret_args(resource)],
        "ports": [{"name": "openai", "containerPort": OPENAI_PORT, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": TMP_PATH}],
        "readinessProbe": {**ready, **READINESS},
        "startupProbe": {**ready, "periodSeconds": STARTUP_PERIOD_SECONDS,
                         "failureThreshold": startup_seconds(resource) // STARTUP_PERIOD_SECONDS},
        "livenessProbe": {"httpGet": {"path": "/health/live", "port": "openai", **scheme},
                          "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "resources": {"requests": dict(GATEWAY_REQUESTS)},
        "securityContext": _RESTRICTED,
        "volumeMounts": [{"name": "model-repository", "mountPath": "/config", "readOnly": True},
                         {"name": "tmp", "mountPath": TMP_PATH},
                         *({"name": name, "mountPath": path, "readOnly": True}
                           for name, _, path in _gateway_secrets(resource))],
    }


def _gateway_secrets(resource: Resource) -> list[tuple[str, str, str]]:
    """The Secrets the gateway mounts: (volume, Secret name, mount path).

    Mounted as volumes, not read by the operator: the keys never pass through the
    operator, a ConfigMap or an environment, and a changed Secret reaches the running
    gateway (the kubelet swaps the volume's files), which re-reads its keys.
    """
    api = resource.spec.api
    secrets = []
    if api.auth is not None:
        secrets.append(("api-keys", api.auth.secret_name, API_KEYS_PATH))
    if api.tls is not None:
        secrets.append(("tls", api.tls.secret_name, TLS_PATH))
    return secrets


def _gateway_secret_args(resource: Resource) -> list[str]:
    args = []
    if resource.spec.api.auth is not None:
        args += ["--api-keys", API_KEYS_PATH]
    if resource.spec.api.tls is not None:
        args += ["--tls-cert", f"{TLS_PATH}/tls.crt", "--tls-key", f"{TLS_PATH}/tls.key"]
    return args


def _prepare_args(resource: Resource, source: list[str]) -> list[str]:
    args = ["prepare", *source, "--artifacts-root", ARTIFACTS_PATH,
            "--base-dir", "/opt/tritonop/examples"]
    fingerprint = artifacts_fingerprint(resource)
    return [*args, "--expect-fingerprint", fingerprint] if fingerprint else args


def _prepare_container(resource: Resource, images: Images) -> Manifest:
    artifacts = resource.spec.artifacts
    return {
        "name": "prepare",
        "image": artifacts.prepare_image or images.operator,
        "command": ["tritonop"],
        "args": _prepare_args(resource, ["-f", f"/config/{RESOURCE_FILE}"]),
        "env": _downloading(_environment(resource), resource),
        "resources": {"requests": dict(PREPARE_REQUESTS)},
        # The CLI's last lines ("error: ...") become the status's reason for a failure.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "model-repository", "mountPath": "/config", "readOnly": True},
            {"name": "artifacts", "mountPath": ARTIFACTS_PATH,
             **({"subPath": artifacts.sub_path} if artifacts.sub_path else {})},
            {"name": "tmp", "mountPath": TMP_PATH},
        ],
    }


def _artifacts_owner(resource: Resource, images: Images) -> list[Manifest]:
    """For a hostPath the prepare step writes to: a first init container that gives the
    folder to the pods' user.

    The kubelet makes a ``DirectoryOrCreate`` folder as root with mode 0755 and applies no
    fsGroup to a hostPath, so the prepare step, as uid 1000, could not write there. This
    container runs as root with CHOWN as its only capability and changes the owner of that
    one folder. A hostPath pod meets the privileged Pod Security level only, which the
    operator allows only where its configuration says so (TRITONOP_ALLOW_HOST_PATH).
    """
    artifacts = resource.spec.artifacts
    if artifacts.host_path is None:
        return []
    return [{
        "name": "artifacts-owner",
        "image": artifacts.prepare_image or images.operator,
        "command": ["chown", f"{UID}:{UID}", ARTIFACTS_PATH],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        "securityContext": {"runAsUser": 0, "runAsNonRoot": False,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}},
        "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_PATH,
                          **({"subPath": artifacts.sub_path} if artifacts.sub_path else {})}],
    }]


def _strategy(resource: Resource) -> Manifest:
    """No surge for GPU pods: a new pod could never schedule beside the old one on a node
    whose GPUs the old one holds, and the rollout would stall."""
    if gpus(resource):
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%",
                                                       "maxUnavailable": "25%"}}


def progress_deadline_seconds(resource: Resource) -> int:
    """Longer than a cold start (prepare, then the startup probe's budget) plus a margin,
    so that a normal cold start is not reported as a failed rollout (Degraded)."""
    prepare = PREPARE_BUDGET_SECONDS if prepare_mode(resource) == "perPod" else 0
    return prepare + startup_seconds(resource) + 300


def _artifacts_volume(resource: Resource) -> Manifest:
    artifacts = resource.spec.artifacts
    if artifacts.persistent_volume_claim is not None or operator_claim(resource):
        claim = (artifacts.persistent_volume_claim.claim_name
                 if artifacts.persistent_volume_claim else names(resource)["claim"])
        return {"name": "artifacts", "persistentVolumeClaim": {"claimName": claim}}
    if artifacts.host_path is not None:
        return {"name": "artifacts",
                "hostPath": {"path": artifacts.host_path.path, "type": "DirectoryOrCreate"}}
    size = artifacts.empty_dir.size_limit if artifacts.empty_dir else "8Gi"
    return {"name": "artifacts", "emptyDir": {"sizeLimit": size}}


def _volumes(resource: Resource, config: Manifest) -> list[Manifest]:
    items = [{"key": key, "path": key.replace("__", "/")} for key in sorted(config["data"])
             if key not in (RESOURCE_FILE, GATEWAY_FILE)]
    items.append({"key": RESOURCE_FILE, "path": RESOURCE_FILE})
    if GATEWAY_FILE in config["data"]:
        items.append({"key": GATEWAY_FILE, "path": GATEWAY_FILE})
    return [
        {"name": "model-repository",
         "configMap": {"name": config["metadata"]["name"], "items": items}},
        _artifacts_volume(resource),
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": resource.spec.shm_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},  # HOME and caches too
        *({"name": name, "secret": {"secretName": secret, "defaultMode": SECRET_MODE}}
          for name, secret, _ in (_gateway_secrets(resource) if openai_enabled(resource)
                                  else [])),
    ]


def deployment(resource: Resource, config: Manifest, images: Images) -> Manifest:
    """Triton pods: restricted security, probes, artifacts, and the config hash."""
    spec = resource.spec
    pod_spec: Manifest = {
        "serviceAccountName": names(resource)["account"],
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [_triton_container(resource, config, images)],
        "volumes": _volumes(resource, config),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
    }
    if openai_enabled(resource):
        pod_spec["containers"][0]["lifecycle"] = _triton_pre_stop()
        pod_spec["containers"].append(_gateway_container(resource, images))
    if prepare_mode(resource) == "perPod":
        pod_spec["initContainers"] = [*_artifacts_owner(resource, images),
                                      _prepare_container(resource, images)]
    pod_spec.update(_placement(resource))
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                   "prometheus.io/path": "/metrics",
                   CONFIG_HASH_ANNOTATION: config_hash(config)}
    if artifacts_fingerprint(resource):
        # The artifacts version these pods load (their models refuse any other).
        annotations[FINGERPRINT_LABEL] = str(artifacts_fingerprint(resource))
    body: Manifest = {
        "selector": {"matchLabels": selector_labels(resource)},
        "strategy": _strategy(resource),
        "progressDeadlineSeconds": progress_deadline_seconds(resource),
        "template": {"metadata": {"labels": {**_labels(resource), **_volume_label(resource)},
                                  "annotations": annotations},
                     "spec": pod_spec},
    }
    if spec.autoscaling is None:
        body["replicas"] = spec.replicas  # with an HPA, the HPA owns the replica count
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(resource, names(resource)["deployment"]), "spec": body}


def _volume_label(resource: Resource) -> dict[str, str]:
    """The label that pods sharing the operator's ReadWriteOnce claim meet by."""
    if not operator_claim(resource) or \
            resource.spec.artifacts.claim.access_mode != "ReadWriteOnce":
        return {}
    return {ARTIFACTS_LABEL: f"{resource.kind.lower()}.{resource.name}"}


def _placement(resource: Resource, *, volume: bool = True) -> Manifest:
    """nodeSelector, tolerations and affinity of the spec, for Triton's and the Jobs' pods.

    A ReadWriteOnce claim of the operator's attaches to one node at a time, so every pod
    that mounts it (``volume``) gets a required affinity to the others (hostname topology);
    the first one scheduled may go anywhere (a pod may match its own affinity term). An
    affinity of the user's replaces it: they have chosen.
    """
    spec = resource.spec
    placement: Manifest = {}
    if spec.node_selector:
        placement["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        placement["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        placement["affinity"] = dict(spec.affinity)
    elif volume and _volume_label(resource):
        together = {"labelSelector": {"matchLabels": _volume_label(resource)},
                    "topologyKey": "kubernetes.io/hostname"}
        placement["affinity"] = {
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [together]}}
    return placement


def artifacts_claim(resource: Resource) -> Manifest:
    """The PersistentVolumeClaim the artifacts versions live on (job mode, none named)."""
    claim = resource.spec.artifacts.claim
    spec: Manifest = {"accessModes": [claim.access_mode],
                      "resources": {"requests": {"storage": claim.size}}}
    if claim.storage_class_name:
        spec["storageClassName"] = claim.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(resource, names(resource)["claim"]), "spec": spec}


def _job_pod_spec(resource: Resource, container: Manifest, volumes: list[Manifest], *,
                  volume: bool = True) -> Manifest:
    """A Job's pod: one try, the resource's ServiceAccount without a token, non-root, and
    the spec's placement (``volume``: it mounts the artifacts claim)."""
    return {
        "restartPolicy": "Never",
        "serviceAccountName": names(resource)["account"],
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
        **_placement(resource, volume=volume),
    }


def prepare_job(resource: Resource, images: Images = Images(), *,
                cleanup: bool = False) -> Manifest:
    """The Job that builds this spec's artifacts version into the shared volume, once.

    Named after the fingerprint, so one Job exists per version however many replicas
    there are, and a spec change that keeps the fingerprint (replicas, batching) creates
    no Job. The resource document travels in the Job's own environment, not through the
    ConfigMap, which keeps describing the version the running pods serve until this one
    is complete. With ``cleanup``, the same command runs after a rollout and removes the
    resource's other versions (``--keep-only``): it finds its version complete at once.
    """
    fingerprint = artifacts_fingerprint(resource)
    assert fingerprint is not None, "LLMService artifacts are prepared per pod"
    artifacts = resource.spec.artifacts
    args = _prepare_args(resource, ["--resource-env", "TRITONOP_RESOURCE"])
    if cleanup:
        args.append("--keep-only")
    container = {
        "name": "cleanup" if cleanup else "prepare",
        "image": artifacts.prepare_image or images.operator,
        "command": ["tritonop"],
        "args": args,
        "env": [*(_environment(resource) if cleanup
                  else _downloading(_environment(resource), resource)),
                {"name": "TRITONOP_RESOURCE", "value": resource_document(resource)}],
        "resources": {"requests": dict(PREPARE_REQUESTS)},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "artifacts", "mountPath": ARTIFACTS_PATH,
             **({"subPath": artifacts.sub_path} if artifacts.sub_path else {})},
            {"name": "tmp", "mountPath": TMP_PATH},
        ],
    }
    labels = {**_labels(resource), FINGERPRINT_LABEL: fingerprint}
    pod_spec = _job_pod_spec(resource, container, [
        _artifacts_volume(resource), {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}}])
    if _artifacts_owner(resource, images):
        pod_spec["initContainers"] = _artifacts_owner(resource, images)
    # The Triton pods' selector labels stay off: a Job pod is no serving replica.
    pod_labels = {k: v for k, v in labels.items() if k not in selector_labels(resource)}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(resource, job_name(resource, fingerprint,
                                                 "cleanup" if cleanup else "prepare"),
                              labels=labels),
        "spec": {
            "backoffLimit": JOB_BACKOFF_LIMIT,
            "activeDeadlineSeconds": PREPARE_BUDGET_SECONDS,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": {**pod_labels, **_volume_label(resource)}},
                         "spec": pod_spec},
        },
    }


def needs_resolve(resource: Resource) -> bool:
    """Whether the model source moves (a hub branch or tag, an S3 prefix) and no revision is
    pinned yet: then :func:`resolve_job` asks the store which one it means, before a render
    names an artifacts version or a pod downloads anything."""
    return model_revision(resource) == UNRESOLVED


def model_source_digest(resource: Resource) -> str:
    """16 hex digits of the settings that decide what a model source means: its text, the S3
    endpoint and region, and the sha256 (not the credentials, nor any pinned revision)."""
    model = resource.spec.model
    settings = {"source": model.source, "sha256": model.sha256,
                "s3": model.s3.model_dump(exclude_none=True) if model.s3 else None}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def resolve_job(resource: Resource, images: Images = Images()) -> Manifest:
    """The Job that asks a remote model source which exact revision it means now.

    ``tritonop resolve`` makes one metadata call (no file is downloaded) and writes
    ``{"name", "source", "revision"}`` as JSON to its termination message, or ``error: ...``
    when the store refuses; the operator reads it back from the pod's status. Named after
    the source's settings (:func:`model_source_digest`), so a spec change that keeps the
    source creates no Job. The document it reads carries no pinned revision: the Job says
    what the source means now. Only this container (and prepare's) gets the credentials
    Secret's keys; the pod mounts no artifacts volume and has a small /tmp only.
    """
    unpinned = dataclasses.replace(resource, model_revision=None)
    artifacts = resource.spec.artifacts
    # The cache variables of the serving containers, pointed at /tmp; no GPU, no artifacts.
    env = [entry for entry in _environment(resource)
           if entry["name"] not in ("TRITONOP_ARTIFACTS", "NVIDIA_VISIBLE_DEVICES")]
    env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    container = {
        "name": "resolve",
        "image": artifacts.prepare_image or images.operator,
        "command": ["tritonop"],
        "args": ["resolve", "--resource-env", "TRITONOP_RESOURCE",
                 "--base-dir", "/opt/tritonop/examples"],
        "env": [*_downloading(env, resource),
                {"name": "TRITONOP_RESOURCE", "value": resource_document(unpinned)}],
        "resources": {"requests": dict(RESOLVE_REQUESTS)},
        # The JSON result, or the error, is the termination message; logs if it is empty.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _RESTRICTED,
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_PATH}],
    }
    labels = {**_labels(resource), PURPOSE_LABEL: "resolve"}
    pod_spec = _job_pod_spec(resource, container,
                             [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}], volume=False)
    # The Triton pods' selector labels stay off: a Job pod is no serving replica.
    pod_labels = {k: v for k, v in labels.items() if k not in selector_labels(resource)}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _metadata(resource, job_name(resource, model_source_digest(resource),
                                                 "resolve"), labels=labels),
        "spec": {
            "backoffLimit": RESOLVE_BACKOFF_LIMIT,
            "activeDeadlineSeconds": RESOLVE_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def artifacts_children(resource: Resource, images: Images = Images()) -> list[Manifest]:
    """What job mode needs before the Triton pods: the operator's claim and the Job.

    Kept out of :func:`render_children`: the reconciler applies them only while the
    resource's artifacts version is not known to be complete.
    """
    if prepare_mode(resource) != "job":
        return []
    claim = [artifacts_claim(resource)] if operator_claim(resource) else []
    return [*claim, prepare_job(resource, images)]


def pod_disruption_budget(resource: Resource) -> Manifest:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _metadata(resource, names(resource)["budget"]),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": selector_labels(resource)}}}


def horizontal_pod_autoscaler(resource: Resource) -> Manifest:
    scaling = resource.spec.autoscaling
    assert scaling is not None
    metrics: list[Manifest] = [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization",
                                  "averageUtilization": scaling.target_cpu_utilization_percentage},
    }}]
    if scaling.target_queue_time_microseconds:
        metrics.append({"type": "Pods", "pods": {
            "metric": {"name": "tritonop_queue_time_microseconds"},
            "target": {"type": "AverageValue",
                       "averageValue": str(scaling.target_queue_time_microseconds)},
        }})
    if scaling.target_requests_in_flight:
        metrics.append({"type": "Pods", "pods": {
            "metric": {"name": "tritonop_gateway_requests_in_flight"},
            "target": {"type": "AverageValue",
                       "averageValue": str(scaling.target_requests_in_flight)},
        }})
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(resource, names(resource)["autoscaler"]),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": names(resource)["deployment"]},
                     "minReplicas": scaling.min_replicas, "maxReplicas": scaling.max_replicas,
                     "metrics": metrics}}


def network_policy(resource: Resource) -> Manifest:
    """Ingress to the pods: the serving ports from ``from``, metrics from ``metricsFrom``.

    Serving ports are the gateway's, and Triton's HTTP and gRPC only when exposed (they
    listen on loopback otherwise). An empty ``metricsFrom`` renders no metrics rule: a
    rule without peers would admit every source, not none.
    """
    policy = resource.spec.network_policy
    peers = [dict(p) for p in policy.from_] or [{"podSelector": {}}]  # own namespace
    serving = [port for name, port in _ports(resource) if name != "metrics"]
    ingress = []
    if serving:
        ingress.append({"from": peers, "ports": [{"protocol": "TCP", "port": port}
                                                 for port in serving]})
    if policy.metrics_from:
        ingress.append({"from": [dict(p) for p in policy.metrics_from],
                        "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(resource, names(resource)["policy"]),
            "spec": {"podSelector": {"matchLabels": selector_labels(resource)},
                     "policyTypes": ["Ingress"], "ingress": ingress}}


def wants_budget(resource: Resource) -> bool:
    spec = resource.spec
    floor = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    return floor > 1


def render_children(resource: Resource, images: Images = Images()) -> list[Manifest]:
    """Every child object of ``resource``, in the order they are applied."""
    config = config_map(resource)
    children = [service_account(resource), config, service(resource),
                deployment(resource, config, images)]
    if wants_budget(resource):
        children.append(pod_disruption_budget(resource))
    if resource.spec.autoscaling is not None and not resource.spec.autoscaling.external:
        children.append(horizontal_pod_autoscaler(resource))
    if resource.spec.network_policy.enabled:
        children.append(network_policy(resource))
    return children
