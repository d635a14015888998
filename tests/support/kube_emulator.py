"""A Kubernetes API emulator that a real kopf operator can run against, for tests.

kmock 0.8's ``KubernetesEmulator`` stores objects as plain dicts: it never sets
``uid``, ``resourceVersion``, ``generation`` or timestamps, answers a failed
JSON-patch ``test`` with 500, and its watches ignore ``?resourceVersion=`` and
replay every object as ADDED. kopf retries the first forever and runs handlers
twice on the second. :class:`KubeEmulator` keeps kmock's routing, discovery and
``objects`` store and replaces the state keeping with one that behaves like an
API server in the ways kopf and the ``kubernetes`` client depend on.

See ``/work/shared/notes/operator-testing.md`` for what it still does not do.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import datetime
import importlib
import importlib.metadata
import os
import secrets
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
import kubernetes.config.kube_config
import yaml
from kopf.testing import KopfRunner

PINNED_KMOCK_VERSION = "0.8"
if importlib.metadata.version("kmock") != PINNED_KMOCK_VERSION:
    raise ImportError(
        f"kmock {importlib.metadata.version('kmock')} is installed, but the emulator fix in "
        f"tests/support/kube_emulator.py was written against kmock {PINNED_KMOCK_VERSION}; "
        "re-check it (it overrides kmock's private _handle and _serve_* methods), "
        "then update PINNED_KMOCK_VERSION."
    )

T = TypeVar("T")
Body = dict[str, Any]
Event = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]  # resource, namespace, name: as kmock keys objects

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update",
                   "watch"})
_WRITE_METHODS = (kmock.method.POST, kmock.method.PATCH, kmock.method.PUT, kmock.method.DELETE)
# Set by the server only; a patch or a PUT cannot change them.
_SERVER_OWNED = ("name", "namespace", "uid", "creationTimestamp", "generation",
                 "resourceVersion", "deletionTimestamp")


@dataclass(frozen=True)
class ResourceSpec:
    """What the emulator must know about a resource kind to serve it.

    kopf discovers resources through ``/api`` and ``/apis`` and only serves kinds
    that are listed there with the ``list``, ``watch`` and ``patch`` verbs.
    """

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: frozenset[str] = frozenset()
    custom: bool = False

    @property
    def api_version(self) -> str:
        """``apiVersion`` of the objects, e.g. ``v1`` or ``apps/v1``."""
        return _api_version(self.group, self.version)

    @property
    def key(self) -> str:
        """kmock's resource notation, e.g. ``apps/v1/deployments`` or ``v1/configmaps``."""
        return f"{self.api_version}/{self.plural}"

    @property
    def resource(self) -> kmock.resource:
        """The parsed form kmock keys its object store and requests by."""
        return kmock.resource(self.group, self.version, self.plural)


_STATUS = frozenset({"status"})

# kopf waits for these two in discovery before it starts any watcher.
KOPF_BACKBONE_RESOURCES = (
    ResourceSpec("", "v1", "namespaces", "Namespace", namespaced=False, subresources=_STATUS),
    ResourceSpec("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                 "CustomResourceDefinition", namespaced=False, subresources=_STATUS),
)

CONFIG_MAP = ResourceSpec("", "v1", "configmaps", "ConfigMap")
SERVICE = ResourceSpec("", "v1", "services", "Service", subresources=_STATUS)
SERVICE_ACCOUNT = ResourceSpec("", "v1", "serviceaccounts", "ServiceAccount")
EVENT = ResourceSpec("", "v1", "events", "Event")
DEPLOYMENT = ResourceSpec("apps", "v1", "deployments", "Deployment",
                          subresources=_STATUS | {"scale"})
POD_DISRUPTION_BUDGET = ResourceSpec("policy", "v1", "poddisruptionbudgets",
                                     "PodDisruptionBudget", subresources=_STATUS)
HORIZONTAL_POD_AUTOSCALER = ResourceSpec("autoscaling", "v2", "horizontalpodautoscalers",
                                         "HorizontalPodAutoscaler", subresources=_STATUS)
NETWORK_POLICY = ResourceSpec("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
POD = ResourceSpec("", "v1", "pods", "Pod", subresources=_STATUS)
CHILD_RESOURCES = (CONFIG_MAP, SERVICE, SERVICE_ACCOUNT, EVENT, DEPLOYMENT,
                   POD_DISRUPTION_BUDGET, HORIZONTAL_POD_AUTOSCALER, NETWORK_POLICY, POD)

EMBEDDING_SEARCH = ResourceSpec("serving.tritonop.dev", "v1alpha1", "embeddingsearches",
                                "EmbeddingSearch", subresources=_STATUS, custom=True)
LLM_SERVICE = ResourceSpec("serving.tritonop.dev", "v1alpha1", "llmservices", "LLMService",
                           subresources=_STATUS, custom=True)
TRITONOP_CUSTOM_RESOURCES = (EMBEDDING_SEARCH, LLM_SERVICE)

TRITONOP_RESOURCES = KOPF_BACKBONE_RESOURCES + CHILD_RESOURCES + TRITONOP_CUSTOM_RESOURCES


def resource_specs_from_crd(crd: Mapping[str, Any]) -> list[ResourceSpec]:
    """One spec per served version of a CustomResourceDefinition manifest.

    Lets tests register the kinds straight from ``crds/*.yaml``, so the emulator
    and the real cluster agree on plural, kind, scope and subresources.
    """
    spec = crd["spec"]
    return [
        ResourceSpec(
            group=spec["group"],
            version=version["name"],
            plural=spec["names"]["plural"],
            kind=spec["names"]["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            subresources=frozenset((version.get("subresources") or {}).keys()),
            custom=True,
        )
        for version in spec["versions"]
        if version.get("served", True)
    ]


def _api_version(group: str | None, version: str | None) -> str:
    """``apiVersion`` from group and version: the core group has no prefix."""
    return f"{group}/{version}" if group else str(version)


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    """A Kubernetes ``Status`` failure that kopf and the client map to their API errors."""
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


def _now() -> str:
    """Timestamps in the API server's own format (RFC 3339, seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _header(request: kmock.Request, name: str) -> str:
    """A header's value without parameters; kmock keeps headers case-sensitively."""
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value.split(";")[0].strip().lower()
    return ""


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, ``None`` deletes, everything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _json_patch(body: Body, ops: list[Any]) -> Body:
    """Apply a JSON patch; a failed ``test`` or a bad path is 422, as kopf expects."""
    try:
        return jsonpatch.apply_patch(copy.deepcopy(body), ops)  # type: ignore[no-any-return]
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _error(422, "Invalid", f"the JSON patch could not be applied: {exc}") from exc


def _parsed_data(request: kmock.Request) -> Any:
    """The request body; apply bodies may be YAML, which kmock leaves unparsed."""
    if request.data is None and request.text:
        return yaml.safe_load(request.text)
    return copy.deepcopy(request.data)


def _object_body(request: kmock.Request) -> Body:
    """A request body that must be a whole object (create, replace, apply)."""
    data = _parsed_data(request)
    if not isinstance(data, dict):
        raise _error(400, "BadRequest", "the body must be a JSON object")
    return data


def _generated_name(meta: Mapping[str, Any]) -> str:
    """``metadata.generateName`` plus a random suffix (kopf names its Events so)."""
    prefix = meta.get("generateName")
    if not prefix:
        raise _error(422, "Invalid", "metadata.name or metadata.generateName is required")
    return f"{prefix}{secrets.token_hex(3)[:5]}"


def _check_version(old: Body, data: Mapping[str, Any]) -> None:
    """Optimistic concurrency: a resourceVersion in a body must be the current one."""
    wanted = (data.get("metadata") or {}).get("resourceVersion")
    current = old["metadata"]["resourceVersion"]
    if wanted is not None and str(wanted) != current:
        raise _error(409, "Conflict", f"the object has been modified: resourceVersion {wanted} "
                                      f"is not the current {current}")


def _expired(since: str | None) -> Event:
    """The watch error that makes kopf (and client-go) re-list and start over."""
    return {"type": "ERROR", "object": {
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
        "reason": "Expired", "message": f"unusable resourceVersion {since!r}"}}


def _initial_events_end(revision: int) -> Event:
    """The bookmark that ends the initial events of a ``sendInitialEvents`` watch."""
    return {"type": "BOOKMARK", "object": {"kind": "Bookmark", "metadata": {
        "resourceVersion": str(revision), "annotations": {"k8s.io/initial-events-end": "true"}}}}


def _field(body: Mapping[str, Any], path: str) -> str | None:
    """A dotted field of an object as a string, for field selectors."""
    value: Any = body
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return None if value is None else str(value)


def _requirement_holds(requirement: str, lookup: Callable[[str], str | None]) -> bool:
    """One selector requirement: ``k=v``, ``k==v``, ``k!=v``, ``k`` or ``!k``."""
    if "!=" in requirement:
        key, value = requirement.split("!=", 1)
        return lookup(key.strip()) != value.strip()
    if "=" in requirement:
        key, value = requirement.replace("==", "=").split("=", 1)
        return lookup(key.strip()) == value.strip()
    if requirement.startswith("!"):
        return lookup(requirement[1:].strip()) is None
    return lookup(requirement.strip()) is not None


def _requirements(request: kmock.Request, selector: str) -> list[str]:
    """The requirements of ``?labelSelector=`` or ``?fieldSelector=``."""
    return [req for req in request.params.get(selector, "").split(",") if req.strip()]


def _check_selectors(request: kmock.Request) -> None:
    """Refuse set-based label selectors (``in``, ``notin``) rather than ignore them."""
    if any("(" in req for req in _requirements(request, "labelSelector")):
        raise _error(400, "BadRequest", "set-based label selectors are not emulated")


def _selected(request: kmock.Request, body: Mapping[str, Any]) -> bool:
    """Whether a list or watch request selects an object (namespace, labels, fields)."""
    meta = body.get("metadata", {})
    if request.namespace is not None and meta.get("namespace") != request.namespace:
        return False
    if request.name is not None and meta.get("name") != request.name:
        return False
    labels = meta.get("labels") or {}
    return all(
        _requirement_holds(req, labels.get) for req in _requirements(request, "labelSelector")
    ) and all(
        _requirement_holds(req, lambda path: _field(body, path))
        for req in _requirements(request, "fieldSelector")
    )


def _without(body: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """The object without some top-level keys, to compare what a change touched."""
    return {key: value for key, value in body.items() if key not in keys}


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API-server semantics that a kopf operator relies on.

    Every write goes through :meth:`_write` under kmock's lock and gets a strictly
    increasing ``resourceVersion``; every change is appended to a per-resource
    event log, so a watch started at any version replays exactly the events after
    it: none lost, none repeated. Reads and discovery stay kmock's.
    """

    _revision: int = attrs.field(default=0, init=False)
    _log: dict[kmock.resource, list[tuple[int, Event]]] = attrs.field(
        factory=lambda: defaultdict(list), init=False)
    _changed: asyncio.Condition = attrs.field(init=False)
    _custom: set[kmock.resource] = attrs.field(factory=set, init=False)
    _last_request_at: float = attrs.field(default=0.0, init=False)
    # Containers' logs, as the kubelet would serve them: (namespace, pod, container) -> text.
    pod_logs: dict[tuple[str, str, str], str] = attrs.field(factory=dict, init=False)
    # The status every pods/log read is refused with (403: RBAC grants no pods/log), or None.
    refuse_logs: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._changed = asyncio.Condition(self._lock)
        self.fallback[kmock.method.PUT] << self._serve_update

    def register(self, spec: ResourceSpec) -> None:
        """Make a kind discoverable, so that kopf finds it and lists/watches/patches it."""
        self.resources[spec.key] = kmock.ResourceInfo(
            kind=spec.kind, namespaced=spec.namespaced, verbs=VERBS,
            subresources=spec.subresources, singular=spec.kind.lower())
        if spec.custom:
            self._custom.add(spec.resource)

    def live(self, spec: ResourceSpec, namespace: str | None, name: str) -> Body | None:
        """The current body of an object, or ``None`` if it does not exist (now)."""
        obj = self._alive((spec.resource, namespace, name))
        return None if obj is None else obj.raw

    def versions(self, spec: ResourceSpec, namespace: str | None, name: str) -> list[Body]:
        """Every stored version of an object, oldest first, across deletions."""
        obj = self._stored((spec.resource, namespace, name))
        history = obj.history if obj is not None else []
        return [version.raw for version in history if version is not None]

    def write_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """Append to a container's log, as its process would print."""
        key = (namespace, pod, container)
        self.pod_logs[key] = self.pod_logs.get(key, "") + text

    @property
    def last_request_at(self) -> float:
        """Event-loop time of the latest request, to tell when a client has gone quiet."""
        return self._last_request_at

    def _stored(self, key: Key) -> kmock.Object | None:
        """An object with its history, even if deleted."""
        return self.objects[key] if key in self.objects else None

    def _alive(self, key: Key) -> kmock.Object | None:
        """An object that exists now (not deleted), or ``None``."""
        obj = self._stored(key)
        return None if obj is None or obj.deleted else obj

    def _existing(self, key: Key) -> kmock.Object:
        """An object that exists now, or the API server's 404."""
        obj = self._alive(key)
        if obj is None:
            raise _error(404, "NotFound", f"{key[0].plural} {key[2]!r} not found")
        return obj

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        """Registered discovery info, or ``None``."""
        # Not resources.get(): kmock's ResourcesArray creates entries on lookup.
        return self.resources[resource] if resource in self.resources else None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Apply writes to the store first, then render as kmock does (skipping its writes)."""
        self._last_request_at = asyncio.get_running_loop().time()
        if request.resource is not None and request.method in _WRITE_METHODS:
            async with self._lock:
                self._write(request, request.resource)
                self._changed.notify_all()
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    def _write(self, request: kmock.Request, resource: kmock.resource) -> None:
        """Dispatch one write: create, patch (incl. server-side apply), replace, delete."""
        if request.method == kmock.method.POST and request.name is None:
            self._create(request, resource, _object_body(request))
            return
        if request.name is None or request.method == kmock.method.POST:
            raise _error(405, "MethodNotAllowed", "collection writes are not emulated")
        key = (resource, request.namespace, request.name)
        if request.method == kmock.method.DELETE:
            self._delete(key)
        elif request.method == kmock.method.PUT:
            self._replace(request, key)
        elif _header(request, "Content-Type") == APPLY_PATCH and self._alive(key) is None:
            self._create(request, resource, _object_body(request))
        else:
            self._patch(request, key)

    def _next_version(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _emit(self, resource: kmock.resource, kind: str, body: Body) -> None:
        """Record a change for watchers; stored bodies are never mutated afterwards."""
        version = int(body["metadata"]["resourceVersion"])
        self._log[resource].append((version, {"type": kind, "object": body}))

    def _create(self, request: kmock.Request, resource: kmock.resource, body: Body) -> None:
        """POST (or apply of a missing object): refuse duplicates, fill metadata, emit ADDED."""
        meta, info = body.setdefault("metadata", {}), self._info(resource)
        namespaced = info is None or bool(info.namespaced)
        namespace = (request.namespace or meta.get("namespace")) if namespaced else None
        name = request.name or meta.get("name") or _generated_name(meta)  # URL name: apply
        existing = self._stored((resource, namespace, name))
        if existing is not None and not existing.deleted:
            raise _error(409, "AlreadyExists", f"{resource.plural} {name!r} already exists")
        if info is not None and "status" in info.subresources:
            body.pop("status", None)
        body.setdefault("apiVersion", _api_version(resource.group, resource.version))
        if info is not None and info.kind:
            body.setdefault("kind", info.kind)
        meta.pop("deletionTimestamp", None)
        meta.update(name=name, uid=str(uuid.uuid4()), generation=1,
                    creationTimestamp=_now(), resourceVersion=self._next_version())
        meta.update({"namespace": namespace} if namespace else {})
        if existing is not None:
            existing.create(body)
        else:
            self.objects[resource, namespace, name] = body
        if isinstance(request.data, dict):  # kmock's _serve_create looks the object up by it
            request.data.setdefault("metadata", {})["name"] = name
        self._emit(resource, "ADDED", body)

    def _patch(self, request: kmock.Request, key: Key) -> None:
        """PATCH: JSON patch (422 on a failed test), merge or apply (409 on a stale version)."""
        obj = self._existing(key)
        old, data = copy.deepcopy(obj.raw), _parsed_data(request)
        content_type = _header(request, "Content-Type")
        if content_type == STRATEGIC_MERGE_PATCH and key[0] in self._custom:
            raise _error(415, "UnsupportedMediaType",
                         "strategic merge patch is not supported for custom resources")
        if isinstance(data, list):
            new = _json_patch(old, data)
        elif isinstance(data, Mapping):
            _check_version(old, data)
            new = _merge(old, data)
        else:
            raise _error(400, "BadRequest", "a patch must be a JSON list or object")
        self._commit(key, request.subresource, obj, old, new)

    def _replace(self, request: kmock.Request, key: Key) -> None:
        """PUT: replace the whole object, 409 if the body's resourceVersion is stale."""
        obj = self._existing(key)
        old, data = copy.deepcopy(obj.raw), _object_body(request)
        _check_version(old, data)
        self._commit(key, request.subresource, obj, old, data)

    def _commit(
        self, key: Key, subresource: str | None, obj: kmock.Object, old: Body, new: Body
    ) -> None:
        """Store a new version unless nothing changed; bump generation on spec changes."""
        new = copy.deepcopy(self._isolate_status(key[0], subresource, old, new))
        meta = new.setdefault("metadata", {})
        for field in _SERVER_OWNED:
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        if new == old:
            return  # a no-op write keeps the version and emits nothing, like the API server
        if _without(new, "metadata", "status") != _without(old, "metadata", "status"):
            meta["generation"] = old["metadata"]["generation"] + 1
        meta["resourceVersion"] = self._next_version()
        obj.history.append(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(key, obj, new)
        else:
            self._emit(key[0], "MODIFIED", new)

    def _isolate_status(
        self, resource: kmock.resource, subresource: str | None, old: Body, new: Body
    ) -> Body:
        """With a status subresource, ``/status`` writes only status and the object never does."""
        info = self._info(resource)
        if subresource == "status":
            return _without(old, "status") | ({"status": new["status"]} if "status" in new else {})
        if info is not None and "status" in info.subresources:
            return _without(new, "status") | ({"status": old["status"]} if "status" in old else {})
        return new

    def _delete(self, key: Key) -> None:
        """DELETE: mark an object with finalizers, remove any other (and what it owns)."""
        obj = self._existing(key)
        new = copy.deepcopy(obj.raw)
        meta = new["metadata"]
        if meta.get("deletionTimestamp"):
            return  # already being deleted: nothing changes
        meta["resourceVersion"] = self._next_version()
        if meta.get("finalizers"):
            meta.update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
            obj.history.append(new)
            self._emit(key[0], "MODIFIED", new)
        else:
            obj.history.append(new)
            self._remove(key, obj, new)

    def _remove(self, key: Key, obj: kmock.Object, last: Body) -> None:
        """Drop an object for good, then delete its dependents (background cascade)."""
        obj.delete()
        self._emit(key[0], "DELETED", last)
        uid = last["metadata"]["uid"]
        for dependent_key, dependent in list(self.objects.items()):
            owners = [] if dependent.deleted else dependent.raw["metadata"].get("ownerReferences")
            if any(owner.get("uid") == uid for owner in owners or []):
                self._delete(dependent_key)

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        """GET of an object, and of a pod's ``log`` (text: ``tailLines``, then
        ``limitBytes``, as the kubelet applies them; 400 for a container with no log yet)."""
        if request.subresource != "log" or request.resource != POD.resource:
            return await super()._serve_fetch(request)
        if self.refuse_logs is not None:
            raise _error(self.refuse_logs, "Forbidden", f"pods \"{request.name}\" is forbidden: "
                         f"cannot get resource \"pods/log\"")
        async with self._lock:
            self._existing((POD.resource, request.namespace, str(request.name)))
        container = request.params.get("container", "")
        text = self.pod_logs.get((str(request.namespace), str(request.name), container))
        if text is None:
            raise _error(400, "BadRequest", f"container \"{container}\" in pod "
                                            f"\"{request.name}\" is waiting to start")
        data = text.encode()
        if tail := request.params.get("tailLines"):
            data = b"".join(data.splitlines(keepends=True)[-int(tail):])
        if limit := request.params.get("limitBytes"):
            data = data[:int(limit)]
        return data

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        """The created object with 201 Created, as the API server answers a POST (kmock: 200)."""
        return kmock.Response(status=201, payload=await super()._serve_create(request))

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        """LIST with the collection's real resourceVersion, for a watch to resume from."""
        resource = self._collection(request)
        async with self._lock:
            items, version = self._snapshot(request, resource), str(self._revision)
        info = self._info(resource)
        return {"apiVersion": _api_version(resource.group, resource.version),
                "kind": f"{info.kind if info and info.kind else 'Unknown'}List",
                "metadata": {"resourceVersion": version}, "items": items}

    def _collection(self, request: kmock.Request) -> kmock.resource:
        """The resource a list or watch is for; 404 if it is not served, 400 if unselectable."""
        if request.resource is None or request.resource not in self._get_resources():
            raise _error(404, "NotFound", f"the server could not find {request.resource}")
        _check_selectors(request)
        return request.resource

    def _snapshot(self, request: kmock.Request, resource: kmock.resource) -> list[Body]:
        """Live objects the request selects (call with the lock held)."""
        return [
            obj.raw for (stored, _, _), obj in self.objects.items()
            if stored == resource and not obj.deleted and _selected(request, obj.raw)
        ]

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        """WATCH from ``?resourceVersion=`` (or from a snapshot), then live, until timeout."""
        resource = self._collection(request)  # before the first yield: a plain error response
        yield b""  # send the headers now: clients wait for them before anything else
        log = self._log[resource]
        async with self._lock:  # the snapshot and the log position must be taken together
            start = self._watch_start(request, resource, log)
        if start is None:
            yield _expired(request.params.get("resourceVersion"))
            return
        events, position = start
        for event in events:
            yield event
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        async for event in self._follow(request, log, position, deadline):
            yield event

    def _watch_start(
        self, request: kmock.Request, resource: kmock.resource, log: list[tuple[int, Event]]
    ) -> tuple[list[Event], int] | None:
        """Initial events and log position of a watch; ``None`` for an unusable version.

        No version (or "0"): the current objects as ADDED, then what comes next.
        A version: nothing initially, then every logged change after it.
        """
        since = request.params.get("resourceVersion")
        initial = request.params.get("sendInitialEvents") == "true"
        if since is None or since in ("", "0") or initial:
            events = [{"type": "ADDED", "object": body}
                      for body in self._snapshot(request, resource)]
            return events + ([_initial_events_end(self._revision)] if initial else []), len(log)
        if not since.isdigit():
            return None
        return [], bisect.bisect_right(log, int(since), key=lambda entry: entry[0])

    async def _follow(
        self, request: kmock.Request, log: list[tuple[int, Event]], position: int,
        deadline: float | None,
    ) -> AsyncIterator[Event]:
        """Selected events appended to the log from ``position`` on, until ``deadline``."""
        while True:
            async with self._lock:
                if not await self._grown(log, position, deadline):
                    return
                batch, position = log[position:], len(log)
            for _, event in batch:
                if _selected(request, event["object"]):
                    yield event

    async def _grown(self, log: list[tuple[int, Event]], size: int, deadline: float | None) -> bool:
        """Wait (lock held) until the log is longer than ``size``; ``False`` at the deadline."""
        loop = asyncio.get_running_loop()
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            await asyncio.wait_for(self._changed.wait_for(lambda: len(log) > size), timeout)
        except TimeoutError:
            return False
        return True


def register_resources(
    emulator: KubeEmulator, specs: Iterable[ResourceSpec] = TRITONOP_RESOURCES
) -> None:
    """Register kinds for discovery; kmock 404s lists of kinds it was not told about."""
    for spec in specs:
        emulator.register(spec)


@contextlib.asynccontextmanager
async def running_emulator(
    specs: Iterable[ResourceSpec] = TRITONOP_RESOURCES,
) -> AsyncIterator[KubeEmulator]:
    """An emulator serving HTTP on a free localhost port for the duration of the block."""
    async with KubeEmulator() as emulator, kmock.Server(emulator):
        register_resources(emulator, specs)
        yield emulator


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig for the emulator: kopf and the ``kubernetes`` client both read one."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server.rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {
            "cluster": "kmock", "user": "kmock", "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def use_kubeconfig(path: Path) -> Iterator[Path]:
    """Point ``$KUBECONFIG`` and the ``kubernetes`` client's default at ``path``, then restore.

    The ``kubernetes`` package copies ``$KUBECONFIG`` into a module constant at
    import, so setting the variable alone is not seen by code imported earlier.
    """
    module = kubernetes.config.kube_config
    saved_env, saved_default = os.environ.get("KUBECONFIG"), module.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = module.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    try:
        yield path
    finally:
        module.KUBE_CONFIG_DEFAULT_LOCATION = saved_default
        if saved_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved_env


def operator_settings() -> kopf.OperatorSettings:
    """Settings for an operator under test; its startup handlers may still change them.

    Scanning is off: with ``-n``, kopf would list namespaces, and kmock answers
    ``GET /api/v1/namespaces`` with 500 (its URL parser fails on it).
    """
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    return settings


def load_operator(target: str | Path) -> tuple[kopf.OperatorRegistry, list[str]]:
    """A fresh handler registry for one operator run, and the paths kopf should load.

    A file is handed to kopf, which executes it anew each run. An importable
    module is imported once per process, so it is (re)loaded here with the fresh
    registry as the default; otherwise a second run would have no handlers.
    """
    registry = kopf.OperatorRegistry()  # unlike kopf's default one, it has no login handler
    kopf.on.login(registry=registry)(kopf.login_via_client)
    if isinstance(target, Path) or str(target).endswith(".py"):
        return registry, [str(target)]
    previous = kopf.get_default_registry()
    kopf.set_default_registry(registry)
    try:
        module = sys.modules.get(str(target))
        if module is None:
            importlib.import_module(str(target))
        else:
            importlib.reload(module)
    finally:
        kopf.set_default_registry(previous)
    return registry, []


@contextlib.asynccontextmanager
async def running_operator(
    target: str | Path,
    *,
    kubeconfig: Path,
    namespace: str | None = None,
    settings: kopf.OperatorSettings | None = None,
    stop_timeout: float = 30.0,
) -> AsyncIterator[KopfRunner]:
    """Run a kopf operator (file path or module name) against ``kubeconfig``'s server.

    kopf runs in its own thread and loop: it cancels tasks it did not create, so
    it cannot share the test's loop. Stopping it is a blocking join, done in a
    worker thread so that the emulator in the test's loop keeps answering while
    kopf shuts down. If the block fails, the operator's log is attached to the
    error. Note that ``KopfRunner`` swaps ``sys.stdout`` for the whole process.
    """
    registry, paths = load_operator(target)
    scope = ["-n", namespace] if namespace else ["-A"]
    runner = KopfRunner(["run", "--standalone", "--verbose", *scope, *paths],
                        registry=registry, settings=settings or operator_settings(),
                        timeout=stop_timeout)
    with use_kubeconfig(kubeconfig):
        runner.__enter__()
        try:
            yield runner
        except Exception as exc:
            await asyncio.to_thread(runner.__exit__, type(exc), exc, exc.__traceback__)
            exc.add_note(f"operator log:\n{operator_log(runner)}")
            raise
        else:
            await asyncio.to_thread(runner.__exit__, None, None, None)


def operator_log(runner: KopfRunner) -> str:
    """What kopf logged (its stdout and stderr), once the runner has stopped."""
    if not runner.future.done() or runner.future.exception() is not None:
        return "<no log: the operator thread did not finish normally>"
    return runner.output


async def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds.

    Operator effects arrive asynchronously: tests wait for them with a deadline
    instead of sleeping a fixed time. The default deadline is generous because a
    passing test never waits for it, and the first handler run in a process pays
    for importing the ``kubernetes`` client (1 s idle, 5 s seen on a loaded machine).
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := probe()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


async def wait_until_idle(
    emulator: KubeEmulator, *, quiet_for: float = 0.5, timeout: float = 30.0
) -> None:
    """Wait until no request has arrived for ``quiet_for`` seconds.

    Lets a test assert that something did NOT happen (a duplicate handler run,
    a retry) without a fixed sleep: an idle kopf operator sends no requests.
    """
    loop = asyncio.get_running_loop()
    await wait_for(lambda: loop.time() - emulator.last_request_at >= quiet_for,
                   timeout=timeout, what=f"{quiet_for}s without API requests")


def resource_path(
    spec: ResourceSpec, namespace: str | None = None, name: str | None = None,
    subresource: str | None = None,
) -> str:
    """The API path of a collection, an object or its subresource."""
    base = f"/apis/{spec.api_version}" if spec.group else f"/api/{spec.version}"
    parts = [base] + (["namespaces", namespace] if namespace else []) + [spec.plural]
    parts += [name] if name else []
    parts += [subresource] if subresource else []
    return "/".join(parts)


async def create_in(kube: KubeEmulator, kind: ResourceSpec, namespace: str,
                    body: dict[str, Any]) -> None:
    """POST ``body`` into ``namespace``; the emulator must answer 201."""
    response = await kube.post(resource_path(kind, namespace), json=body)
    assert response.status == 201, await response.text()


async def merge_patch(kube: KubeEmulator, path: str, patch: dict[str, Any]) -> None:
    """A JSON merge patch of the object at ``path``; the emulator must answer 200."""
    response = await kube.patch(path, json=patch, headers={"Content-Type": MERGE_PATCH})
    assert response.status == 200, await response.text()


async def events_in(kube: KubeEmulator, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Events in ``namespace`` about the object named ``name``."""
    response = await kube.get(resource_path(EVENT, namespace))
    items = (await response.json()).get("items", [])
    return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]

