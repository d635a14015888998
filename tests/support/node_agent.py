"""A node of the test cluster whose pods really run: a small kubelet around the pod runner.

kwok's nodes report pods Ready without running them. :class:`NodeAgent` registers a Node
that kwok leaves alone (no ``kwok.x-k8s.io/node`` annotation, which kwok selects its nodes
by), keeps its Lease renewed as a kubelet does, and runs every pod the scheduler binds to it
with :class:`~tests.support.podrunner.PodRunner` (volumes, mount namespaces, uid, probes,
restarts, its own network namespace and IP). It writes back what a kubelet writes through the
status subresource: phase, the conditions PodScheduled, Initialized, ContainersReady and
Ready from the real probes, ``containerStatuses`` and ``initContainerStatuses`` (state,
ready, started, restartCount, lastState), ``podIP``, ``hostIP`` and ``startTime``. A deleted
pod's containers are stopped at once, each as the kubelet does: its ``preStop`` hook, then
SIGTERM when that hook returns, SIGKILL after the deletion's grace period; the pod is then
removed, as a kubelet's final delete does.

It authenticates as ``system:node:<name>`` (group ``system:nodes``), so the API server's
Node authorizer gives it what it gives a kubelet: the Secrets, ConfigMaps and service-account
tokens of the pods bound to it, nothing else. What the pods need from the API server:

* ConfigMaps and Secrets (volumes, ``configMapKeyRef``, ``secretKeyRef``) are read for the
  runner's mappings when the pod starts, and ConfigMap volumes are synced while it runs.
* The projected ``kube-api-access-*`` volume that the ServiceAccount admission plugin adds
  (``serviceAccountToken`` through the TokenRequest API, bound to the pod, ``ca.crt`` from the
  ``kube-root-ca.crt`` ConfigMap, ``namespace`` from the downward API) is written as the
  kubelet writes it: on a tmpfs, by the atomic writer, with the volume's mode; the token is
  renewed at 80 % of its lifetime.
* ``KUBERNETES_SERVICE_HOST``/``PORT`` name the ``kubernetes`` Service's ClusterIP and port,
  as a kubelet sets them. This node holds that address on an interface of its own and relays it to
  the API server's loopback port (the part kube-proxy plays); every pod gets a route to it.
  The API server's certificate names that IP, so in-cluster clients verify it.
* Resource limits go through cgroup v1, one cgroup per container: ``limits.memory`` as
  ``memory.limit_in_bytes``, ``limits.cpu`` as a CFS quota, ``requests.cpu`` as shares.
* Claims: while the agent runs, its StorageClass ``tritonop-local`` is the cluster's default,
  and a local provisioner makes a folder and a hostPath PersistentVolume (with a ``claimRef``
  that the PV controller binds) for each of its claims, deleted when released. A pod's claim
  is mounted once bound, as a kubelet waits for it.
* ``restartPolicy`` ``Never`` and ``OnFailure`` (Job pods) end in ``Succeeded`` or
  ``Failed`` with their containers' terminated states; the finished pod's network and
  mounts are removed.

What it does not do: pull or build images (the runner's stand-ins run this machine's
programs), a CNI (no Service IPs other than the API server's: tests dial pods by the IPs that
EndpointSlices list), DNS, NetworkPolicies, GPUs, ephemeral-storage limits, init containers
retried after a failure (the pod stays Pending with the container's exit and message), and
volumes other than hostPath PersistentVolumes for claims. A pod asking for any field this
agent or the runner does not implement fails with a message naming it, never silently.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.cluster import ControlPlane, _name
from tests.support.podrunner import (
    Container,
    Manifest,
    PodFailed,
    PodRunner,
    SecretData,
    _splice,
)

NODE_CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110"}
"""What the Node declares. The scheduler places pods by their requests against it; the
rendered Triton pods request more CPU than this 2-core machine has, so it is declared
larger than the machine (limits are enforced per container, requests are not reserved)."""
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
SYNC_SECONDS = 0.5
CGROUP_ROOT = Path("/sys/fs/cgroup")
STORAGE_CLASS = "tritonop-local"
PROVISIONER = "tritonop.dev/node-agent-local"
# Fields of a pod's spec and of a container that this agent honours (the runner checks its
# own: volumes, mounts, env, security context). Scheduling fields are the scheduler's.
POD_FIELDS = {
    "containers", "initContainers", "volumes", "securityContext", "serviceAccountName",
    "serviceAccount", "automountServiceAccountToken", "restartPolicy",
    "terminationGracePeriodSeconds", "dnsPolicy", "schedulerName", "nodeName", "priority",
    "priorityClassName", "enableServiceLinks", "preemptionPolicy", "tolerations",
    "nodeSelector", "affinity", "topologySpreadConstraints", "hostname",
}
CONTAINER_FIELDS = {
    "name", "image", "imagePullPolicy", "command", "args", "env", "ports", "startupProbe",
    "readinessProbe", "livenessProbe", "resources", "securityContext", "volumeMounts",
    "workingDir", "terminationMessagePath", "terminationMessagePolicy", "lifecycle",
}
RESOURCE_NAMES = {"cpu", "memory"}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number (``500m`` -> 0.5, ``512Mi`` -> 536870912)."""
    text = str(value)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "P": 1e15, "E": 1e18}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)


def unsupported_fields(pod: Manifest) -> str | None:
    """What of a pod spec this agent cannot honour, as the pod's failure message; or None."""
    spec = pod["spec"]
    extra = set(spec) - POD_FIELDS
    if extra:
        return f"pod spec field(s) {sorted(extra)} not supported by the node agent"
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        where = f"container {container['name']}"
        extra = set(container) - CONTAINER_FIELDS
        if extra:
            return f"{where}: field(s) {sorted(extra)} not supported by the node agent"
        lifecycle = container.get("lifecycle") or {}
        if set(lifecycle) - {"preStop"}:
            return f"{where}: lifecycle {sorted(lifecycle)} not supported (preStop is)"
        pre_stop = lifecycle.get("preStop") or {}
        if pre_stop and (len(pre_stop) != 1 or next(iter(pre_stop)) not in
                         ("exec", "httpGet", "sleep")):
            return f"{where}: preStop {sorted(pre_stop)} not supported (exec, httpGet, sleep)"
        resources = container.get("resources") or {}
        if set(resources) - {"requests", "limits"}:
            return f"{where}: resources field(s) {sorted(resources)} not supported"
        for kind in ("requests", "limits"):
            names = set(resources.get(kind) or {}) - RESOURCE_NAMES
            if names:
                return (f"{where}: resources.{kind} {sorted(names)} not supported by the node "
                        "agent (cpu and memory are; this node has no GPU)")
    return None


# --- the API server, as the node --------------------------------------------------------


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass
class Api:
    """A small JSON client for the API server with the node's client certificate."""

    server: str
    context: ssl.SSLContext

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json", timeout: float = 30) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.server}{path}", data=data, method=method,
                                         headers={"Content-Type": content_type,
                                                  "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, context=self.context,
                                        timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ApiError(error.code, error.read().decode(errors="replace")[:500]) from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def get_or_none(self, path: str) -> Any:
        try:
            return self.get(path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def patch(self, path: str, body: Any) -> Any:
        return self.call("PATCH", path, body, "application/merge-patch+json")


# --- one pod ------------------------------------------------------------------------------


class NodePodRunner(PodRunner):
    """The pod runner with what a node adds: routes to the node and cgroups for limits."""

    def __init__(self, *args: Any, node_routes: tuple[str, ...] = (),
                 cgroup: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.node_routes = node_routes
        self.cgroup = cgroup
        self.launched_at: dict[str, str] = {}
        self.finished_at: dict[str, str] = {}

    def _make_network(self) -> None:
        super()._make_network()
        for address in self.node_routes:
            subprocess.run(["ip", "-n", self.netns, "route", "add", f"{address}/32", "via",
                            self._host_ip], capture_output=True, check=True)

    def _launch(self, container: Container) -> None:
        super()._launch(container)
        self.launched_at[container.name] = now()
        assert container.process is not None
        # nsenter and unshare exec without forking, so this pid becomes the container's
        # command; it is placed before the script's mounts are done (microseconds).
        for controller, settings in self._cgroup_settings(container).items():
            folder = CGROUP_ROOT / controller / self.cgroup / container.name
            folder.mkdir(parents=True, exist_ok=True)
            for name, value in settings.items():
                (folder / name).write_text(value)
            with contextlib.suppress(ProcessLookupError, OSError):
                (folder / "cgroup.procs").write_text(str(container.process.pid))

    def _cgroup_settings(self, container: Container) -> dict[str, dict[str, str]]:
        resources = container.spec.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        memory, cpu = {}, {}
        if "memory" in limits:
            memory["memory.limit_in_bytes"] = str(int(quantity(limits["memory"])))
        if "cpu" in limits:
            cpu["cpu.cfs_period_us"] = "100000"
            cpu["cpu.cfs_quota_us"] = str(max(1000, int(quantity(limits["cpu"]) * 100000)))
        cpu_request = requests.get("cpu", limits.get("cpu"))
        if cpu_request is not None:  # the kubelet's shares: 1024 per CPU, at least 2
            cpu["cpu.shares"] = str(max(2, int(quantity(cpu_request) * 1024)))
        return {k: v for k, v in (("memory", memory), ("cpu", cpu)) if v}

    def remove_cgroups(self) -> None:
        for controller in ("memory", "cpu"):
            base = CGROUP_ROOT / controller / self.cgroup
            if not base.is_dir():
                continue
            for folder in sorted(base.iterdir(), reverse=True):
                if folder.is_dir():
                    with contextlib.suppress(OSError):
                        folder.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()


@dataclass
class PodWorker:
    """One pod bound to the node: set up, run, report, stop."""

    agent: NodeAgent
    pod: Manifest
    runner: NodePodRunner | None = None
    failure: str | None = None  # the pod failed for good (phase Failed) with this message
    init_failure: tuple[str, int, str] | None = None  # container, exit code, message
    started_at: str = field(default_factory=now)
    tokens: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    thread: threading.Thread | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    last_status: Any = None
    final: dict[str, Any] | None = None
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            problem = unsupported_fields(self.pod)
            if problem:
                raise PodFailed(problem)
            manifest, config_maps, secrets, claims = self._resolve()
            self.config_maps = config_maps
            self.runner = NodePodRunner(
                manifest, config_maps, self.agent.workdir / f"{self.namespace}-{self.name}",
                secrets=secrets, claims=claims, name=self.name, namespace=self.namespace,
                node_routes=(self.agent.service_ip, self.agent.node_ip),
                cgroup=f"tritonop-{self.agent.name}/{self.uid}")
            self.runner.uid = self.uid
            if self.stopped.is_set():
                return
            self.runner.start()
        except PodFailed as error:
            if self.stopped.is_set():
                return
            init = self._failed_init()
            if init is not None:
                self.init_failure = init
            else:
                self.failure = str(error)[:4000]
        except Exception as error:  # anything else is a bug here: reported, never lost
            self.failure = f"node agent: {type(error).__name__}: {error}"[:4000]

    def _failed_init(self) -> tuple[str, int, str] | None:
        if self.runner is None:
            return None
        for container in self.runner.containers:
            if container.init and container.exit_codes and container.exit_codes[-1] != 0:
                message = self.runner.termination_message(container.name) or \
                    self.runner.log_tail(container.name, 20)
                return container.name, container.exit_codes[-1], message[-4000:]
        return None

    # -- what the pod needs from the API server ---------------------------------------

    def _resolve(self) -> tuple[Manifest, dict[str, dict[str, str]], dict[str, SecretData],
                                dict[str, Path]]:
        """The pod spec for the runner, with the ConfigMaps and Secrets it names."""
        spec = copy.deepcopy(self.pod["spec"])
        config_maps: dict[str, dict[str, str]] = {}
        secrets: dict[str, SecretData] = {}
        names_cm, names_secret = set(), set()
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                names_cm.add(volume["configMap"]["name"])
            if "secret" in volume:
                names_secret.add(volume["secret"]["secretName"])
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for item in container.get("env", []):
                source = item.get("valueFrom") or {}
                if "configMapKeyRef" in source:
                    names_cm.add(source["configMapKeyRef"]["name"])
                if "secretKeyRef" in source:
                    names_secret.add(source["secretKeyRef"]["name"])
        for name in names_cm:
            data = self._config_map(name)
            if data is not None:
                config_maps[name] = data
        for name in names_secret:
            secret = self._read(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
            if secret is not None:
                secrets[name] = {k: base64.b64decode(v)
                                 for k, v in (secret.get("data") or {}).items()}
        claims = {}
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                name = volume["persistentVolumeClaim"]["claimName"]
                claims[name] = self._claim_folder(name)
        for index, volume in enumerate(spec.get("volumes", [])):
            if "projected" in volume:
                key = f"projected.{volume['name']}"
                secrets[key] = self._projected(volume)
                spec["volumes"][index] = {"name": volume["name"], "secret": {
                    "secretName": key,
                    "defaultMode": volume["projected"].get("defaultMode", 0o644)}}
        service_env = [{"name": k, "value": v} for k, v in self.agent.service_env().items()]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            container["env"] = service_env + list(container.get("env", []))
            container.pop("lifecycle", None)  # preStop: run by the agent (stop_pod)
        return {"spec": spec}, config_maps, secrets, claims

    def _claim_folder(self, claim: str) -> Path:
        """The folder of the PersistentVolume bound to ``claim``, once it is bound (a kubelet
        waits for the binding too); only hostPath volumes are mounted here."""
        deadline = time.monotonic() + 120
        while not self.stopped.is_set():
            found = self._read(f"/api/v1/namespaces/{self.namespace}/"
                               f"persistentvolumeclaims/{claim}")
            if found is None:
                raise PodFailed(f'FailedMount: persistentvolumeclaim "{claim}" not found')
            volume = (found.get("spec") or {}).get("volumeName")
            if volume and (found.get("status") or {}).get("phase") == "Bound":
                pv = self._read(f"/api/v1/persistentvolumes/{volume}") or {}
                path = ((pv.get("spec") or {}).get("hostPath") or {}).get("path")
                if not path:
                    raise PodFailed(f"volume of claim {claim}: only hostPath "
                                    "PersistentVolumes are supported by the node agent")
                return Path(path)
            if time.monotonic() > deadline:
                raise PodFailed(f"FailedMount: persistentvolumeclaim {claim} not bound "
                                "after 120 s")
            time.sleep(0.5)
        raise PodFailed("stopped while waiting for a claim")

    def _read(self, path: str) -> Any:
        """GET as the node; the Node authorizer learns of a new pod's references shortly
        after it is bound, so a 403 is retried for a while."""
        deadline = time.monotonic() + 20
        while True:
            try:
                return self.agent.api.get_or_none(path)
            except ApiError as error:
                if error.status != 403 or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _config_map(self, name: str) -> dict[str, str] | None:
        found = self._read(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
        return None if found is None else dict(found.get("data") or {})

    def _projected(self, volume: Manifest) -> dict[str, bytes]:
        """The files of a projected volume: tokens, ConfigMap and Secret keys, downward API."""
        files: dict[str, bytes] = {}
        where = f"volume {volume['name']}: projected"
        extra = set(volume["projected"]) - {"sources", "defaultMode"}
        if extra:
            raise PodFailed(f"{where} field(s) {sorted(extra)} not supported by the node agent")
        for source in volume["projected"].get("sources", []):
            (kind, spec), *more = source.items()
            if more:
                raise PodFailed(f"{where}: a source with several kinds {sorted(source)}")
            if kind == "serviceAccountToken":
                extra = set(spec) - {"path", "expirationSeconds", "audience"}
                if extra:
                    raise PodFailed(f"{where}: serviceAccountToken {sorted(extra)} not supported")
                files[spec["path"]] = self._token(spec).encode()
            elif kind in ("configMap", "secret"):
                extra = set(spec) - {"name", "items", "optional"}
                if extra:
                    raise PodFailed(f"{where}: {kind} {sorted(extra)} not supported")
                if any(set(item) - {"key", "path"} for item in spec.get("items", [])):
                    raise PodFailed(f"{where}: {kind} items support key and path only")
                data: Mapping[str, Any] | None
                if kind == "configMap":
                    data = self._config_map(spec["name"])
                else:
                    secret = self._read(
                        f"/api/v1/namespaces/{self.namespace}/secrets/{spec['name']}")
                    data = None if secret is None else {
                        k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
                if data is None:
                    if spec.get("optional"):
                        continue
                    raise PodFailed(f'FailedMount: {where}: {kind} "{spec["name"]}" not found')
                items = spec.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    if item["key"] not in data:
                        raise PodFailed(f"FailedMount: {where}: {kind} {spec['name']} has no "
                                        f"key {item['key']!r}")
                    value = data[item["key"]]
                    files[item["path"]] = value if isinstance(value, bytes) else value.encode()
            elif kind == "downwardAPI":
                for item in spec.get("items", []):
                    path = (item.get("fieldRef") or {}).get("fieldPath")
                    values = {"metadata.namespace": self.namespace,
                              "metadata.name": self.name, "metadata.uid": self.uid}
                    if set(item) - {"path", "fieldRef"} or path not in values:
                        raise PodFailed(f"{where}: downwardAPI item {item} not supported "
                                        f"(fieldRef {sorted(values)} are)")
                    files[item["path"]] = values[path].encode()
            else:
                raise PodFailed(f"{where}: source {kind!r} not supported by the node agent")
        return files

    def _token(self, spec: Manifest) -> str:
        """A TokenRequest for the pod's ServiceAccount, bound to the pod, as a kubelet asks."""
        account = self.pod["spec"].get("serviceAccountName", "default")
        request: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": int(spec.get("expirationSeconds", 3600)),
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name,
                                        "uid": self.uid}}}
        if spec.get("audience"):
            request["spec"]["audiences"] = [spec["audience"]]
        answer = self.agent.api.call(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            request)
        issued = time.time()
        expires = datetime.datetime.fromisoformat(
            answer["status"]["expirationTimestamp"].replace("Z", "+00:00")).timestamp()
        self.tokens[spec["path"]] = (answer["status"]["token"], issued, expires)
        return str(answer["status"]["token"])

    def refresh(self) -> None:
        """What a kubelet syncs into a running pod: ConfigMap volumes, tokens at 80 %."""
        runner = self.runner
        if runner is None or self.stopped.is_set() or runner.started_at is None:
            return
        for name, data in list(self.config_maps.items()):
            current = self._config_map(name)
            if current is not None and current != data:
                self.config_maps[name] = current
                runner.update_config_map(name, current)
        due = any(issued + 0.8 * (expires - issued) < time.time()
                  for _, issued, expires in self.tokens.values())
        if due:
            for volume in self.pod["spec"].get("volumes", []):
                if "projected" in volume:
                    runner.update_secret(f"projected.{volume['name']}", self._projected(volume))

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The pod's status as a kubelet reports it."""
        runner, agent = self.runner, self.agent
        status: dict[str, Any] = {"hostIP": agent.node_ip, "hostIPs": [{"ip": agent.node_ip}],
                                  "startTime": self.started_at}
        spec = self.pod["spec"]
        if self.failure is not None:
            status.update(phase="Failed", reason="NodeAgentUnsupported", message=self.failure,
                          conditions=self._conditions(False, False))
            status["containerStatuses"] = [self._waiting(c, "Unsupported", self.failure)
                                           for c in spec["containers"]]
            return status
        if runner is None or runner.started_at is None:
            status["phase"] = "Pending"
            status["conditions"] = self._conditions(False, False)
            return status
        if Path(f"/run/netns/{runner.netns}").exists():
            status.update(podIP=runner.ip, podIPs=[{"ip": runner.ip}])
        init_done = all(c.exit_codes and c.exit_codes[-1] == 0
                        for c in runner.containers if c.init)
        main = [c for c in runner.containers if not c.init]
        status["initContainerStatuses"] = [self._init_status(c) for c in runner.containers
                                           if c.init]
        status["containerStatuses"] = [self._container_status(c, init_done) for c in main]
        ready = init_done and all(c.ready for c in main)
        status["conditions"] = self._conditions(init_done, ready)
        running = any(c.process is not None and c.process.poll() is None for c in main)
        status["phase"] = "Running" if init_done and running else "Pending"
        policy = spec.get("restartPolicy", "Always")
        codes = [c.exit_codes[-1] if c.exit_codes and c.process is not None
                 and c.process.poll() is not None else None for c in main]
        if policy != "Always" and init_done and None not in codes:
            if all(code == 0 for code in codes):
                status["phase"] = "Succeeded"
            elif policy == "Never":
                status["phase"] = "Failed"
        if not status["initContainerStatuses"]:
            del status["initContainerStatuses"]
        return status

    def _conditions(self, initialized: bool, ready: bool) -> list[dict[str, Any]]:
        stamp = self.started_at
        previous = {c["type"]: c for c in self.pod.get("status", {}).get("conditions", [])}

        def condition(kind: str, value: bool, reason: str | None = None) -> dict[str, Any]:
            text = "True" if value else "False"
            old = previous.get(kind)
            since = old["lastTransitionTime"] if old and old.get("status") == text and \
                old.get("lastTransitionTime") else now()
            found: dict[str, Any] = {"type": kind, "status": text, "lastProbeTime": None,
                                     "lastTransitionTime": since or stamp}
            if reason and not value:
                found["reason"] = reason
            return found

        return [condition("PodReadyToStartContainers", self.runner is not None
                          and self.runner.started_at is not None),
                condition("Initialized", initialized, "ContainersNotInitialized"),
                condition("Ready", ready, "ContainersNotReady"),
                condition("ContainersReady", ready, "ContainersNotReady"),
                previous.get("PodScheduled") or condition("PodScheduled", True)]

    @staticmethod
    def _waiting(spec: Manifest, reason: str, message: str | None = None) -> dict[str, Any]:
        waiting: dict[str, Any] = {"reason": reason}
        if message:
            waiting["message"] = message
        return {"name": spec["name"], "image": spec["image"], "imageID": "", "ready": False,
                "started": False, "restartCount": 0, "state": {"waiting": waiting}}

    def _init_status(self, container: Container) -> dict[str, Any]:
        runner = self.runner
        assert runner is not None
        base = {"name": container.name, "image": container.spec["image"], "imageID": "",
                "restartCount": container.restarts, "ready": False, "started": False}
        if container.exit_codes:
            terminated = self._terminated(container)
            if terminated["exitCode"] == 0:
                return {**base, "ready": True, "state": {"terminated": terminated}}
            return {**base, "lastState": {"terminated": terminated}, "state": {"waiting": {
                "reason": "CrashLoopBackOff",
                "message": "the node agent does not retry a failed init container"}}}
        if container.process is not None and container.process.poll() is None:
            return {**base, "started": True, "state": {"running": {
                "startedAt": runner.launched_at.get(container.name)}}}
        return {**base, "state": {"waiting": {"reason": "PodInitializing"}}}

    def _terminated(self, container: Container) -> dict[str, Any]:
        """A container's ``state.terminated``, from its last exit and termination message."""
        runner = self.runner
        assert runner is not None
        code = container.exit_codes[-1]
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": runner.launched_at.get(container.name),
                      "finishedAt": runner.finished_at.setdefault(container.name, now())}
        message = runner.termination_message(container.name)
        if message:
            terminated["message"] = message[-4000:]
        return terminated

    def _container_status(self, container: Container, init_done: bool) -> dict[str, Any]:
        runner = self.runner
        assert runner is not None
        base: dict[str, Any] = {
            "name": container.name, "image": container.spec["image"], "imageID": "",
            "restartCount": container.restarts, "ready": container.ready,
            "started": container.started and container.set_up}
        process = container.process
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if process is not None and process.poll() is not None and container.exit_codes and (
                policy == "Never" or (policy == "OnFailure" and container.exit_codes[-1] == 0)):
            return {**base, "ready": False,
                    "state": {"terminated": self._terminated(container)}}
        if container.exit_codes:
            base["lastState"] = {"terminated": {"exitCode": container.exit_codes[-1],
                                                "reason": "Error"}}
        if process is None:
            reason = "PodInitializing" if not init_done else "ContainerCreating"
            return {**base, "state": {"waiting": {"reason": reason}}}
        if process.poll() is None:
            base["containerID"] = f"podrunner://{process.pid}"
            return {**base, "state": {"running": {
                "startedAt": runner.launched_at.get(container.name)}}}
        return {**base, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}

    def report(self) -> None:
        status = self.final or self.status()
        if status.get("phase") in ("Succeeded", "Failed") and self.final is None:
            # A finished pod keeps its status; its network and mounts go (as a kubelet
            # removes a finished pod's sandbox).
            self.final = status
            threading.Thread(target=self.stop, args=(0.0,), daemon=True).start()
        if status == self.last_status:
            return
        try:
            self.agent.api.patch(f"{self.path}/status", {
                "metadata": {"uid": self.uid}, "status": status})
        except ApiError as error:
            if error.status in (404, 409):
                return
            raise
        self.last_status = status

    # -- stopping ----------------------------------------------------------------------

    def stop(self, grace: float) -> None:
        """Every container at once, each as the kubelet stops it: its preStop hook, then
        SIGTERM when its own hook returns (a container with no hook at once), SIGKILL when
        the grace period is over (at least 2 s after its hook). So a hook that waits for
        another container to stop (Triton's, for the gateway's) sees it stop."""
        self.stopped.set()
        runner = self.runner
        if runner is None:
            return
        original = {c["name"]: c for c in self.pod["spec"]["containers"]}

        def pre_stop(container: Container, left: float) -> None:
            spec = original.get(container.name, {})
            if not container.init and (spec.get("lifecycle") or {}).get("preStop") \
                    and container.process is not None and container.process.poll() is None:
                self._pre_stop(spec, container, left)

        runner.stop(grace, before_kill=pre_stop)
        if self.thread is not None:
            self.thread.join(timeout=30)
        runner.remove_cgroups()

    def _pre_stop(self, spec: Manifest, container: Container, grace: float) -> None:
        hook = spec["lifecycle"]["preStop"]
        runner = self.runner
        assert runner is not None
        try:
            if "exec" in hook:
                runner.exec(container.name, hook["exec"]["command"], timeout=grace)
            elif "sleep" in hook:
                time.sleep(min(float(hook["sleep"]["seconds"]), grace))
            else:
                get = hook["httpGet"]
                url = (f"http://{get.get('host', runner.ip)}:"
                       f"{runner.port(get['port'], container)}{get.get('path', '/')}")
                urllib.request.urlopen(url, timeout=grace).close()
        except (OSError, subprocess.TimeoutExpired, PodFailed) as error:
            runner._log(container, f"[node agent] preStop failed: {error}")


# --- the node -----------------------------------------------------------------------------


class NodeAgent:
    """A Node of the cluster whose pods run here (see the module docstring).

    Args:
        cluster: the control plane; its CA signs the node's client certificate.
        workdir: where the pods' volumes and logs are kept.
        name: the Node's name.
    """

    def __init__(self, cluster: ControlPlane, workdir: Path, name: str = "tritonop-node-0"
                 ) -> None:
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.name = name
        suffix = os.getpid() % 100000
        self.interface = f"tkn{suffix}"
        self.node_ip = f"10.252.{suffix % 250}.1"
        self.service_ip = ""
        self.service_port = 443
        self.workers: dict[str, PodWorker] = {}  # by pod uid
        self.done: set[str] = set()  # uids of pods removed or failed for good
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._relay: socket.socket | None = None
        self.errors: list[str] = []  # what went wrong in the agent's own loops
        self.api: Api
        self.admin = Api(cluster.server, cluster.ssl_context)  # the provisioner's identity

    # -- set-up ------------------------------------------------------------------------

    def start(self) -> NodeAgent:
        assert self.cluster.pki is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self.cluster.pki.issue(f"node-{self.name}",
                                           _name(f"system:node:{self.name}", "system:nodes"))
        context = ssl.create_default_context(cafile=str(self.cluster.pki.ca))
        context.load_cert_chain(str(cert), str(key))
        self.api = Api(self.cluster.server, context)
        service = self.cluster.get_json("service", "kubernetes", "-n", "default")
        self.service_ip = service["spec"]["clusterIP"]
        self.service_port = int(service["spec"]["ports"][0]["port"])
        try:
            self._start_relay()
            self._register()
            self.admin.call("POST", "/apis/storage.k8s.io/v1/storageclasses", {
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS, "annotations": {
                    "storageclass.kubernetes.io/is-default-class": "true"}},
                "provisioner": PROVISIONER, "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate"})
            for target in (self._heartbeat, self._sync, self._provision):
                thread = threading.Thread(target=self._loop, args=(target,), daemon=True,
                                          name=f"{self.name}-{target.__name__}")
                thread.start()
                self._threads.append(thread)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_relay(self) -> None:
        """The ``kubernetes`` Service's ClusterIP on this node, relayed to the API server."""
        # A veth pair left on the host (this kernel has no dummy interfaces): one end holds
        # the addresses; deleting it removes both ends and the addresses.
        _ip("link", "add", self.interface, "type", "veth", "peer", "name",
            f"{self.interface}p")
        _ip("link", "set", f"{self.interface}p", "up")
        _ip("addr", "add", f"{self.service_ip}/32", "dev", self.interface)
        _ip("addr", "add", f"{self.node_ip}/32", "dev", self.interface)
        _ip("link", "set", self.interface, "up")
        self._relay = socket.create_server((self.service_ip, self.service_port))
        threading.Thread(target=self._accept, daemon=True, name="api-relay").start()

    def _accept(self) -> None:
        assert self._relay is not None
        while not self._stop.is_set():
            try:
                client, _ = self._relay.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.cluster.api_port), 10)
            except OSError:
                client.close()
                continue
            _splice(client, upstream)

    def service_env(self) -> dict[str, str]:
        """The variables a kubelet sets for the ``kubernetes`` Service in every container."""
        host, port = self.service_ip, str(self.service_port)
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": port,
                f"KUBERNETES_PORT_{port}_TCP_ADDR": host}

    def _register(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.name,
            "labels": {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "type": "tritonop-node-agent"}}}
        try:
            self.api.call("POST", "/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
        self._node_status()
        self._renew_lease()

    def _node_status(self) -> None:
        stamp = now()
        conditions = [{"type": kind, "status": "False", "reason": reason,
                       "message": message, "lastHeartbeatTime": stamp,
                       "lastTransitionTime": stamp}
                      for kind, reason, message in (
                          ("MemoryPressure", "KubeletHasSufficientMemory", "no pressure"),
                          ("DiskPressure", "KubeletHasNoDiskPressure", "no pressure"),
                          ("PIDPressure", "KubeletHasSufficientPID", "no pressure"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady",
                           "message": "tritonop node agent is posting ready status",
                           "lastHeartbeatTime": stamp, "lastTransitionTime": stamp})
        self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": {
            "capacity": NODE_CAPACITY, "allocatable": NODE_CAPACITY,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": self.node_ip},
                          {"type": "Hostname", "address": self.name}],
            "nodeInfo": {"kubeletVersion": "tritonop-node-agent", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "podrunner://0",
                         "kernelVersion": os.uname().release, "osImage": "", "machineID": "",
                         "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}}})

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        lease = self.api.get_or_none(path)
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": micro_now()}
        if lease is None:
            node = self.api.get(f"/api/v1/nodes/{self.name}")
            self.api.call("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/"
                          "leases", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                                     "metadata": {"name": self.name, "ownerReferences": [{
                                         "apiVersion": "v1", "kind": "Node",
                                         "name": self.name, "uid": node["metadata"]["uid"]}]},
                                     "spec": spec})
        else:
            self.api.patch(path, {"spec": spec})

    # -- loops -------------------------------------------------------------------------

    def _loop(self, step: Any) -> None:
        while not self._stop.is_set():
            try:
                step()
            except Exception as error:  # kept for the test to see; the loop goes on
                self.errors.append(f"{step.__name__}: {type(error).__name__}: {error}")
                del self.errors[:-20]
            self._stop.wait(HEARTBEAT_SECONDS if step == self._heartbeat else SYNC_SECONDS)

    def _heartbeat(self) -> None:
        self._renew_lease()
        self._node_status()
        for worker in list(self.workers.values()):
            worker.refresh()

    def _sync(self) -> None:
        """Start new pods, report status, stop deleted ones: one pass over the node's pods."""
        selector = urllib.parse.quote(f"spec.nodeName={self.name}")
        pods = self.api.get(f"/api/v1/pods?fieldSelector={selector}")["items"]
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                if uid not in self.done:
                    self.done.add(uid)
                    threading.Thread(target=self._delete, args=(pod, worker), daemon=True,
                                     name=f"delete-{pod['metadata']['name']}").start()
                continue
            if uid in self.done:
                continue
            if worker is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue
                worker = self.workers[uid] = PodWorker(self, pod)
                worker.start()
            worker.pod = pod
            worker.report()
        for uid in set(self.workers) - seen:  # removed without a graceful deletion
            worker = self.workers.pop(uid)
            self.done.add(uid)
            threading.Thread(target=worker.stop, args=(0.0,), daemon=True).start()

    def _provision(self) -> None:
        """The local provisioner: a folder and a hostPath PersistentVolume for each claim of
        this node's StorageClass, bound by the PV controller through its ``claimRef``; a
        released volume and its folder are deleted (``reclaimPolicy: Delete``)."""
        claims = self.admin.get("/api/v1/persistentvolumeclaims")["items"]
        for claim in claims:
            meta, spec = claim["metadata"], claim["spec"]
            if spec.get("storageClassName") != STORAGE_CLASS or spec.get("volumeName") \
                    or meta.get("deletionTimestamp"):
                continue
            folder = self.workdir / "volumes" / f"{meta['namespace']}-{meta['name']}"
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o777)  # as local-path provisioners make it; fsGroup comes on top
            volume = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"pvc-{meta['uid']}",
                             "annotations": {"pv.kubernetes.io/provisioned-by": PROVISIONER}},
                "spec": {"capacity": {"storage": spec["resources"]["requests"]["storage"]},
                         "accessModes": spec["accessModes"],
                         "persistentVolumeReclaimPolicy": "Delete",
                         "storageClassName": STORAGE_CLASS,
                         "hostPath": {"path": str(folder), "type": "Directory"},
                         "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                      "namespace": meta["namespace"], "name": meta["name"],
                                      "uid": meta["uid"]},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{
                             "matchExpressions": [{"key": "kubernetes.io/hostname",
                                                   "operator": "In",
                                                   "values": [self.name]}]}]}}}}
            try:
                self.admin.call("POST", "/api/v1/persistentvolumes", volume)
            except ApiError as error:
                if error.status != 409:
                    raise
        for volume in self.admin.get("/api/v1/persistentvolumes")["items"]:
            if volume["spec"].get("storageClassName") == STORAGE_CLASS and \
                    (volume.get("status") or {}).get("phase") in ("Released", "Failed"):
                self._remove_volume(volume)

    def _remove_volume(self, volume: Manifest) -> None:
        path = ((volume["spec"].get("hostPath") or {}).get("path")) or ""
        if path and Path(path).is_relative_to(self.workdir):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(ApiError):
            self.admin.call("DELETE", f"/api/v1/persistentvolumes/{volume['metadata']['name']}")

    def _delete(self, pod: Manifest, worker: PodWorker | None) -> None:
        grace = float(pod["metadata"].get("deletionGracePeriodSeconds")
                      or pod["spec"].get("terminationGracePeriodSeconds", 30))
        if worker is not None:
            worker.pod = pod
            worker.stop(grace)
            self.workers.pop(pod["metadata"]["uid"], None)
        meta = pod["metadata"]
        try:
            self.api.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                          f"{meta['name']}", {"apiVersion": "v1", "kind": "DeleteOptions",
                                              "gracePeriodSeconds": 0,
                                              "preconditions": {"uid": meta["uid"]}})
        except ApiError as error:
            if error.status not in (404, 409):
                self.errors.append(f"delete {meta['name']}: {error}")

    # -- teardown ------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> PodWorker:
        """The worker running a pod (for logs and exec in tests)."""
        for worker in self.workers.values():
            if worker.namespace == namespace and worker.name == name:
                return worker
        raise KeyError(f"no pod {namespace}/{name} on {self.name}")

    def stop(self) -> None:
        """Stop every pod (SIGTERM, then SIGKILL), the loops and the relay; remove the Node."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        stoppers = [threading.Thread(target=w.stop, args=(5.0,), daemon=True)
                    for w in self.workers.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(timeout=60)
        self.workers.clear()
        for controller in ("memory", "cpu"):
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / controller / f"tritonop-{self.name}").rmdir()
        if self._relay is not None:
            with contextlib.suppress(OSError):
                self._relay.shutdown(socket.SHUT_RDWR)
            self._relay.close()
        subprocess.run(["ip", "link", "delete", self.interface], capture_output=True,
                       check=False)
        # The projected token's mount point, made (empty) on the shared root by the runner:
        # removed when empty, so that nothing here looks like a pod's service account.
        for folder in ("/run/secrets/kubernetes.io/serviceaccount", "/run/secrets/kubernetes.io"):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        with contextlib.suppress(ApiError, OSError):
            self.admin.call("DELETE", f"/apis/storage.k8s.io/v1/storageclasses/{STORAGE_CLASS}")
            for volume in self.admin.get("/api/v1/persistentvolumes")["items"]:
                if volume["spec"].get("storageClassName") == STORAGE_CLASS:
                    self._remove_volume(volume)
        with contextlib.suppress(ApiError, AttributeError, OSError):
            self.cluster.kubectl("delete", "node", self.name, "--ignore-not-found",
                                 "--wait=false", check=False)

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ip {shlex.join(args)}: {result.stderr.strip()}")
