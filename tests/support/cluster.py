"""A real Kubernetes control plane for tests: etcd, kube-apiserver, controllers, kwok nodes.

The binaries come from ``tests/cluster/build.sh`` (Go modules pinned in tests/cluster/), built
once into a cache outside the repository. :class:`ControlPlane` starts them on loopback ports
with freshly generated certificates, much as kubeadm lays a cluster out, but with kwok in
place of kubelets: pods are scheduled by the real scheduler onto simulated nodes and reported
Running and Ready by kwok's stages (tests/cluster/kwok-stages.yaml), so the Deployment and
ReplicaSet controllers, the garbage collector and Pod Security admission all behave as in a
cluster. Only containers never run.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = ROOT / "tests" / "cluster"
BUILD_SCRIPT = CLUSTER_DIR / "build.sh"
KWOK_STAGES = CLUSTER_DIR / "kwok-stages.yaml"
NODE_COUNT = 2
# Simulated nodes are large: the scale test puts hundreds of Triton pods on them.
NODE_CAPACITY = {"cpu": "1000", "memory": "4Ti", "pods": "1000", "nvidia.com/gpu": "64"}
SERVICE_CIDR = "10.0.0.0/24"


class ClusterError(RuntimeError):
    """The control plane could not be built or started (the message says which part)."""


def build_binaries(timeout: float = 3600) -> Path:
    """Build (or find in the cache) the control plane's binaries; their folder.

    A failure raises: the cluster tier must fail, not skip, where it cannot be built.
    """
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise ClusterError(f"tests/cluster/build.sh failed ({result.returncode}):\n"
                           f"{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- certificates -----------------------------------------------------------------------


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(parts)


def _write_key(path: Path, key: Any) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


@dataclass
class Pki:
    """A cluster CA, the API server's serving certificate, client certificates, SA keys."""

    folder: Path
    ca_key: Any = None
    ca_cert: x509.Certificate | None = None

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    def create(self) -> Pki:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_cert = self._sign(_name("tritonop-test-ca"), self.ca_key.public_key(), ca=True)
        self.ca.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(self.folder / "ca.key", self.ca_key)
        self.issue("apiserver", _name("kube-apiserver"), server=True)
        # Service-account tokens are signed with an RSA key, as kubeadm does.
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(self.folder / "sa.key", sa_key)
        (self.folder / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        return self

    def _sign(self, subject: x509.Name, public_key: Any, *, ca: bool = False,
              server: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(subject if ca else self.ca_cert.subject)  # type: ignore[union-attr]
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else \
                x509.ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            dns = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                   "kubernetes.default.svc.cluster.local"]
            ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.1")]
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]),
                critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def issue(self, stem: str, subject: x509.Name, *, server: bool = False) -> tuple[Path, Path]:
        """A key and a certificate signed by the CA: ``<stem>.crt``, ``<stem>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(subject, key.public_key(), server=server)
        cert_path, key_path = self.folder / f"{stem}.crt", self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        return cert_path, key_path


def write_kubeconfig(path: Path, server: str, ca: Path, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None,
                     namespace: str = "default") -> Path:
    user: dict[str, Any] = {"token": token} if token else {
        "client-certificate": str(cert), "client-key": str(key)}
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server,
                                                   "certificate-authority": str(ca)}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                   "namespace": namespace}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# --- processes --------------------------------------------------------------------------


@dataclass
class Process:
    """One child process, its output in a log file."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self.env,
                                          start_new_session=True)
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL (to the process group, which only this process leads)."""
        if not self.running():
            return
        assert self.popen is not None
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25,
             processes: Sequence[Process] = ()) -> Any:
    """Poll ``check`` until it returns something truthy; raise naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for process in processes:
            if not process.running():
                raise ClusterError(f"{process.name} exited while waiting for {what}:\n"
                                   f"{process.tail()}")
        try:
            last = check()
        except Exception as err:  # anything short of success means "not yet"
            last = err
        else:
            if last:
                return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --- the control plane ------------------------------------------------------------------


@dataclass
class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok on loopback."""

    bin_dir: Path
    workdir: Path
    processes: dict[str, Process] = field(default_factory=dict)
    api_port: int = 0
    pki: Pki | None = None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _start(self, name: str, argv: list[str]) -> Process:
        process = Process(name, argv, self.workdir / "logs" / f"{name}.log").start()
        self.processes[name] = process
        return process

    def start(self) -> ControlPlane:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.pki = Pki(self.workdir / "pki").create()
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controllers()
            self._start_kwok()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        etcd = self._start("etcd", [
            self.binary("etcd"), "--name=default", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
            # A test cluster's data need not survive a power cut: fsync only slows it down.
            "--unsafe-no-fsync=true", "--log-level=warn",
        ])
        self.etcd_url = f"http://127.0.0.1:{client}"
        wait_for(lambda: json.load(urllib.request.urlopen(f"{self.etcd_url}/health",
                                                          timeout=2))["health"] == "true",
                 60, "etcd /health", processes=[etcd])

    def _start_apiserver(self) -> None:
        assert self.pki is not None
        pki = self.pki.folder
        self.api_port = free_port()
        admin_cert, admin_key = self.pki.issue("admin", _name("tritonop-test-admin",
                                                              "system:masters"))
        write_kubeconfig(self.admin_kubeconfig, self.server, self.pki.ca, cert=admin_cert,
                         key=admin_key)
        apiserver = self._start("kube-apiserver", [
            self.binary("kube-apiserver"), f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}", f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={self.pki.ca}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # On top of the default plugins (PodSecurity, ServiceAccount, NamespaceLifecycle,
            # ...): setting blockOwnerDeletion needs update on the owner's finalizers, as on
            # hardened clusters and OpenShift; deploy/rbac.yaml grants it.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            # No `kubernetes` Endpoints for a loopback address (the reconciler refuses one).
            "--endpoint-reconciler-type=none",
            "--profiling=false", "--event-ttl=1h", "--v=1",
        ])
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(str(admin_cert), str(admin_key))

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server}/readyz", context=context,
                                        timeout=5) as response:
                return response.status == 200

        wait_for(ready, 120, "kube-apiserver /readyz", interval=0.5, processes=[apiserver])
        self.ssl_context = context

    def _start_controllers(self) -> None:
        assert self.pki is not None
        pki = self.pki.folder
        kcm = self._client("kcm", "system:kube-controller-manager")
        scheduler = self._client("scheduler", "system:kube-scheduler")
        self._start("kube-controller-manager", [
            self.binary("kube-controller-manager"), f"--kubeconfig={kcm}",
            # No health/metrics endpoint: nothing here reads it, and serving it would need
            # the API server's request-header CA for delegated authentication.
            "--leader-elect=false", "--secure-port=0",
            # Each controller acts as its own ServiceAccount with its own bootstrap RBAC.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={self.pki.ca}",
            f"--cluster-signing-cert-file={self.pki.ca}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Hundreds of resources in the scale test: the default 20 requests/s would make
            # the controllers, not the operator, the bottleneck.
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10", "--concurrent-gc-syncs=20",
            "--horizontal-pod-autoscaler-sync-period=5s", "--v=1",
        ])
        self._start("kube-scheduler", [
            self.binary("kube-scheduler"), f"--kubeconfig={scheduler}",
            "--leader-elect=false", "--secure-port=0", "--v=1",
        ])

    def _client(self, stem: str, user: str) -> Path:
        """A kubeconfig for ``user``, authenticated by a client certificate."""
        assert self.pki is not None
        cert, key = self.pki.issue(stem, _name(user))
        return write_kubeconfig(self.workdir / f"{stem}.kubeconfig", self.server, self.pki.ca,
                                cert=cert, key=key)

    def _start_kwok(self) -> None:
        kwok = self._start("kwok", [
            self.binary("kwok"), f"--kubeconfig={self.admin_kubeconfig}",
            f"--config={KWOK_STAGES}", "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--node-ip=10.0.1.1", "--cidr=10.1.0.0/16", "--node-lease-duration-seconds=40",
        ])
        for index in range(NODE_COUNT):
            self.apply({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": f"kwok-node-{index}",
                             "annotations": {"kwok.x-k8s.io/node": "fake"},
                             "labels": {"kubernetes.io/hostname": f"kwok-node-{index}",
                                        "kubernetes.io/os": "linux",
                                        "kubernetes.io/arch": "amd64", "type": "kwok"}},
                "status": {"allocatable": NODE_CAPACITY, "capacity": NODE_CAPACITY},
            })
        for index in range(NODE_COUNT):
            wait_for(lambda i=index: self.kubectl(
                "get", "node", f"kwok-node-{i}", "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
                check=False).stdout == "True", 60, f"node kwok-node-{index} Ready",
                processes=[kwok])
        # Pods need their namespace's "default" ServiceAccount (the serviceaccount controller).
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default",
                                      check=False).returncode == 0, 60,
                 "the default ServiceAccount", processes=list(self.processes.values()))

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()

    # --- clients ------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None, timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as the cluster admin (or with ``kubeconfig``)."""
        argv = [self.binary("kubectl"), f"--kubeconfig={kubeconfig or self.admin_kubeconfig}",
                *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def apply(self, *objects: dict[str, Any], server_side: bool = False,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        args = ["apply", "-f", "-"] + (["--server-side"] if server_side else [])
        return self.kubectl(*args, input=yaml.safe_dump_all(objects), check=check)

    def get_json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def raw(self, path: str) -> str:
        """GET ``path`` from the API server as the admin (e.g. /metrics)."""
        with urllib.request.urlopen(f"{self.server}{path}", context=self.ssl_context,
                                    timeout=30) as response:
            return response.read().decode()

    def create_namespace(self, name: str, enforce: str = "restricted") -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": name, "labels": {"pod-security.kubernetes.io/enforce": enforce,
                                     "pod-security.kubernetes.io/enforce-version": "latest"}}})
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", name,
                                      check=False).returncode == 0, 60,
                 f"the default ServiceAccount in {name}")

    def token(self, account: str, namespace: str, hours: int = 6) -> str:
        """A token for ``account`` from the TokenRequest API, as a pod's projected volume has."""
        return self.kubectl("create", "token", account, "-n", namespace,
                            f"--duration={hours}h").stdout.strip()

    def logs(self, lines: int = 40) -> str:
        return "\n".join(f"----- {p.name} ({p.log}) -----\n{p.tail(lines)}"
                         for p in self.processes.values())


def request_count(metrics: str, match: Callable[[str], bool] = lambda labels: True) -> float:
    """Sum of ``apiserver_request_total`` over the series whose labels ``match``."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels, value = line[len("apiserver_request_total"):].rsplit(" ", 1)
            if match(labels):
                total += float(value)
    return total


# --- the operator -----------------------------------------------------------------------


def operator_container(kustomization: Path = ROOT / "deploy",
                       kubectl: str = "kubectl") -> dict[str, Any]:
    """The operator's container as an install renders it (``kubectl kustomize``)."""
    rendered = subprocess.run([kubectl, "kustomize", str(kustomization)], capture_output=True,
                              text=True, check=True).stdout
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] == "Deployment" and doc["metadata"]["name"] == "tritonop":
            return doc["spec"]["template"]["spec"]["containers"][0]
    raise ClusterError(f"no tritonop Deployment in {kustomization}")


@dataclass
class Operator:
    """The real tritonop operator, run as its pod runs it, outside the cluster.

    The command and environment are the operator Deployment's (``kopf run --standalone -m
    tritonop.controller.handlers``); it authenticates with a TokenRequest token of its
    ServiceAccount, so it holds exactly the RBAC that deploy/ grants and a missing verb fails.
    """

    cluster: ControlPlane
    account_namespace: str = "tritonop-system"
    kustomization: Path = ROOT / "deploy"  # the install whose Deployment it runs as
    resync_seconds: float = 5
    process: Process | None = None

    def start(self) -> Operator:
        container = operator_container(self.kustomization, self.cluster.binary("kubectl"))
        command = list(container["command"])
        assert command[:2] == ["kopf", "run"], command
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
        env.update({"POD_NAMESPACE": self.account_namespace,
                    "TRITONOP_RESYNC_SECONDS": str(self.resync_seconds)})
        port = free_port()
        # Kubernetes expands $(VAR) in args from the container's environment.
        args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
                for arg in container.get("args") or []]
        args = [a for a in args if not a.startswith("--liveness=")]
        args.append(f"--liveness=http://127.0.0.1:{port}/healthz")
        workdir = self.cluster.workdir
        env["KUBECONFIG"] = str(write_kubeconfig(
            workdir / f"operator-{self.account_namespace}.kubeconfig", self.cluster.server,
            self.cluster.pki.ca,  # type: ignore[union-attr]
            token=self.cluster.token("tritonop", self.account_namespace),
            namespace=self.account_namespace))
        kopf = str(Path(sys.executable).with_name("kopf"))
        name = f"operator-{self.account_namespace}"
        self.process = Process(name, [kopf, *command[1:], *args],
                               workdir / "logs" / f"{name}.log", env=env).start()
        self.cluster.processes[name] = self.process

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                        timeout=2) as response:
                return response.status == 200

        wait_for(healthy, 60, "the operator's /healthz", processes=[self.process])
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def log(self) -> str:
        return self.process.log.read_text(errors="replace") if self.process else ""
