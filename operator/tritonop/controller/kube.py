"""The few Kubernetes API calls the reconciler needs, over the official client.

Children are written with server-side apply (``fieldManager=tritonop``, ``force``), so a
repeated apply is harmless and a field edited by hand is put back by the next one.

Every request has a timeout: a connection the API server never answers must not hang a
handler thread (and with it every later event of that object) forever.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import urllib3.exceptions
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tritonop import API_GROUP, API_VERSION

FIELD_MANAGER = "tritonop"
# Seconds to connect, and to wait for the answer (TRITONOP_API_TIMEOUT_SECONDS).
REQUEST_TIMEOUT = (5.0, float(os.environ.get("TRITONOP_API_TIMEOUT_SECONDS", "30")))
# Answers worth retrying: conflicts, throttling, timeouts and the server's own errors.
# Every other 4xx says that the request itself is refused, and will be again.
RETRIED_STATUSES = frozenset({401, 408, 409, 425, 429})
# Refusals that say the API server is not ready yet, not that the request is wrong: with
# OwnerReferencesPermissionEnforcement on, kube-apiserver refuses blockOwnerDeletion (403)
# for up to 30 s after a CRD is installed, until its admission RESTMapper is refreshed.
TRANSIENT_REFUSALS = ("cannot find RESTMapping",)
MERGE_PATCH = "application/merge-patch+json"
Obj = dict[str, Any]

# apiVersion/kind -> plural; the path prefix follows from the apiVersion.
PLURALS = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Pod"): "pods",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("batch/v1", "Job"): "jobs",
    (f"{API_GROUP}/{API_VERSION}", "EmbeddingSearch"): "embeddingsearches",
    (f"{API_GROUP}/{API_VERSION}", "LLMService"): "llmservices",
}


# The tail of a pod's log that is read for a download's progress line: the newest lines
# within the byte limit (the server cuts the tail's end beyond it).
LOG_TAIL_LINES = 20
LOG_LIMIT_BYTES = 8192

STORAGE_CLASS_SECONDS = float(os.environ.get("TRITONOP_STORAGE_CLASS_SECONDS", "600"))
DEFAULT_CLASS_ANNOTATIONS = ("storageclass.kubernetes.io/is-default-class",
                             "storageclass.beta.kubernetes.io/is-default-class")


def load_configuration() -> None:
    """In-cluster credentials when running in a pod, else the local kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    base = f"{prefix}/namespaces/{namespace}/{PLURALS[(api_version, kind)]}"
    return f"{base}/{name}" if name else base


class Kube:
    """A thin, synchronous client: apply, get, delete, list, and patch an object or a status."""

    def __init__(self, api: client.ApiClient | None = None,
                 timeout: tuple[float, float] = REQUEST_TIMEOUT) -> None:
        self.api = api or client.ApiClient()
        self.timeout = timeout
        self._default_class: tuple[float, str | None] | None = None

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        data = self._send(method, url, body, query, content_type)
        return json.loads(data) if data else {}

    def _send(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json", accept: str = "application/json"
              ) -> bytes:
        """One request; the answer's bytes, or the ApiException of a status not 2xx."""
        serialized = self.api.param_serialize(
            method, url, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": accept},
        )
        response = self.api.call_api(*serialized, _request_timeout=self.timeout)
        data = response.read()
        if not 200 <= response.status < 300:
            error = ApiException(status=response.status, reason=response.reason, body=data)
            error.headers = response.getheaders()
            raise error
        return bytes(data or b"")

    def apply(self, manifest: Obj, field_manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply; the object as the server stored it."""
        meta = manifest["metadata"]
        url = path(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
        return self._call("PATCH", url, manifest,
                          [("fieldManager", field_manager), ("force", "true")],
                          "application/apply-patch+yaml")

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self._call("GET", path(api_version, kind, namespace, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str,
               propagation: str | None = None) -> bool:
        """Delete if present; True when something was deleted.

        Args:
            propagation: ``Background`` or ``Foreground`` for an object with dependents (a
                Job's pods); the API server's default for the kind otherwise.
        """
        query = [("propagationPolicy", propagation)] if propagation else None
        try:
            self._call("DELETE", path(api_version, kind, namespace, name), query=query)
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def default_storage_class(self) -> str | None:
        """The cluster's default StorageClass, or None (none, or not ours to read).

        Asked at most every ``TRITONOP_STORAGE_CLASS_SECONDS`` (600): it decides whether
        an EmbeddingSearch that names no volume is prepared by a Job into a claim of that
        class, and a resync must not cost a request per resource. A namespaced install
        may not read StorageClasses (cluster-scoped): 403 counts as none.
        """
        now = time.monotonic()
        cached = getattr(self, "_default_class", None)  # subclasses may skip __init__
        if cached is not None and now - cached[0] < STORAGE_CLASS_SECONDS:
            return cached[1]
        try:
            items = self._call("GET", "/apis/storage.k8s.io/v1/storageclasses").get("items")
        except ApiException as err:
            if err.status not in (403, 404):
                raise
            items = []
        found = None
        for item in items or []:
            annotations = (item.get("metadata") or {}).get("annotations") or {}
            if any(annotations.get(key) == "true" for key in DEFAULT_CLASS_ANNOTATIONS):
                found = item["metadata"]["name"]
                break
        self._default_class = (now, found)
        return found

    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]
             ) -> list[Obj]:
        """Objects whose labels include ``selector`` (also filtered here, to be exact)."""
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(selector.items())))]
        items = self._call("GET", path(api_version, kind, namespace), query=query).get("items")
        return [item for item in items or []
                if selector.items() <= ((item.get("metadata") or {}).get("labels") or {}).items()]

    def pod_log(self, namespace: str, name: str, container: str) -> str:
        """The last lines of a container's log (``kubectl logs --tail``): at most
        :data:`LOG_TAIL_LINES` lines and :data:`LOG_LIMIT_BYTES` bytes of them.

        "" when it cannot be read: a pod gone (404), a container not started yet (400), an
        install whose RBAC grants no ``pods/log`` (403), a server that does not answer. What
        is read from it only adds to a status message, so none of these stops a reconcile.
        """
        url = path("v1", "Pod", namespace, name) + "/log"
        query = [("container", container), ("tailLines", str(LOG_TAIL_LINES)),
                 ("limitBytes", str(LOG_LIMIT_BYTES))]
        try:
            data = self._send("GET", url, query=query, accept="text/plain")
        except (ApiException, urllib3.exceptions.HTTPError):
            return ""
        return data.decode("utf-8", errors="replace")

    def patch(self, body: Obj, patch: Obj) -> Obj:
        """Merge-patch ``body``'s object, only if ``body`` is still current (else 409).

        Returns:
            The object as the server stored it.
        """
        meta = body["metadata"]
        url = path(body["apiVersion"], body["kind"], meta["namespace"], meta["name"])
        merged = {**patch, "metadata": {**(patch.get("metadata") or {}),
                                        "resourceVersion": meta["resourceVersion"]}}
        return self._call("PATCH", url, merged, content_type=MERGE_PATCH)

    def patch_status(self, body: Obj, status: Obj) -> bool:
        """Merge-patch the ``status`` subresource, only if ``body`` is still current.

        The resourceVersion precondition makes one writer win when two handlers saw the
        same change (a timer and a Deployment event): only the winner announces it.

        Returns:
            False when the object changed since ``body`` was read (409), or is gone (404:
            a timer can fire once more while its resource is being deleted).
        """
        meta = body["metadata"]
        url = path(body["apiVersion"], body["kind"], meta["namespace"], meta["name"]) + "/status"
        patch = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": status}
        try:
            self._call("PATCH", url, patch, content_type=MERGE_PATCH)
        except ApiException as err:
            if err.status in (404, 409):
                return False
            raise
        return True


def is_permanent(err: ApiException) -> bool:
    """Whether the API server refused a request for good (422 invalid, 403, 400, a webhook).

    Sending the same request again gets the same answer, so it is reported, and tried
    again only after a long backoff (RBAC or a webhook may be fixed meanwhile). A refusal
    that says the server is not ready yet (:data:`TRANSIENT_REFUSALS`) is not permanent.
    """
    status = int(err.status or 0)
    if not 400 <= status < 500 or status in RETRIED_STATUSES:
        return False
    message = server_message(err)
    return not any(transient in message for transient in TRANSIENT_REFUSALS)


# The most of a server's message that goes into a status, a condition or an Event.
MAX_MESSAGE = 1024


def server_message(err: ApiException) -> str:
    """The API server's own message from a ``Status`` body, else the HTTP reason.

    Cut at :data:`MAX_MESSAGE` characters: a webhook's or a proxy's answer can be a whole
    page, and an Event or condition message is no place for it.
    """
    try:
        body = json.loads(err.body or b"{}")
    except (TypeError, ValueError):
        body = {}
    message = str((body.get("message") if isinstance(body, dict) else None)
                  or err.reason or f"HTTP {err.status}")
    return message if len(message) <= MAX_MESSAGE else f"{message[:MAX_MESSAGE]}..."


def describe_error(err: Exception) -> str:
    """A failed request in one line: the status and the server's message, not the response
    headers that ``str(ApiException)`` prints."""
    if isinstance(err, ApiException):
        return f"({err.status}) {server_message(err)}"
    text = " ".join(str(err).split())
    return text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE]}..."


def retry_after(err: ApiException) -> float | None:
    """The server's ``Retry-After`` (429, 503) in seconds, if it sent one."""
    value = (getattr(err, "headers", None) or {}).get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
