"""Running a rendered pod on this machine the way a kubelet would, without containers.

The operator's pods have to start on a kubelet, whose details the local runtime never
shows: a ConfigMap volume is a tree of timestamped folders and links, the root
filesystem is read-only, the process runs as uid 1000 with no capabilities, and the
probes decide when the pod is Ready. :class:`PodRunner` reproduces those parts as root:

* **Volumes** are laid out under the runner's work folder as the kubelet lays them out:
  a ConfigMap or a Secret by its atomic writer (``..<timestamp>/`` holding the files by
  ``items`` path with ``defaultMode`` or the item's ``mode``, ``..data`` linking to it,
  one link per top-level entry; a Secret on its own tmpfs), an emptyDir as a folder
  (``medium: Memory`` on its own tmpfs), a hostPath as the named folder, a
  PersistentVolumeClaim as the folder the test maps its claim name to. emptyDirs and
  claims get the pod's ``fsGroup`` (group-writable, setgid), ConfigMaps and Secrets its
  group read-only, as the kubelet's volume ownership step does; hostPaths keep their
  owner, as on a node. ConfigMaps and Secrets are mounted read-only, whatever the mount
  says. A missing ConfigMap, Secret or ``items`` key that is not ``optional`` fails the
  pod (the kubelet's FailedMount).
* **Containers** (init containers one at a time to completion, then the others) each
  run in a private mount namespace (``unshare -m``) in which every volume is bound at
  its ``mountPath`` (``readOnly`` ones read-only, ``subPath`` honoured), the image's
  files are bound where the image keeps them, the root is remounted read-only for
  ``readOnlyRootFilesystem``, and the process drops to ``runAsUser``/``runAsGroup``
  with the ``fsGroup`` as a supplementary group and no capabilities (``setpriv``).
  ``command``, ``args``, ``env`` and ``workingDir`` are the container's; the image's
  environment and working directory are read from ``deploy/Dockerfile.*``. ``env``
  takes ``value`` (with ``$(VAR)`` of earlier entries expanded), ``valueFrom``
  ``secretKeyRef`` and ``configMapKeyRef`` (from the mappings the test passes; a missing
  one that is not ``optional`` fails the pod, the kubelet's CreateContainerConfigError)
  and ``fieldRef`` (``metadata.name``, ``metadata.namespace``, ``metadata.uid``,
  ``status.podIP``); ``$(VAR)`` in ``command`` and ``args`` is expanded from the
  container's env as the kubelet does (``$$`` escapes). A field of ``env``, volumes or
  mounts the runner does not implement fails the pod with its name, never dropped.
  Each container gets its own empty, world-writable file at ``terminationMessagePath``
  (``/dev/termination-log`` by default), as the kubelet binds one in;
  :meth:`PodRunner.termination_message` is what the container's status reports from it
  (``FallbackToLogsOnError`` included).
* **Images** are stood in for by this machine, each with a Python environment that holds
  only what its Dockerfile installs (``tests/support/images.py``: links to those
  distributions of the development venv and their dependencies, so an import the image
  lacks fails here too): the operator image's venv at ``/opt/tritonop`` (``tritonop``
  and ``kopf`` in its ``bin``, the examples at ``/opt/tritonop/examples``, as
  ``Dockerfile.operator`` copies them); for the Triton image, the pinned
  ``nvidia-pytriton`` wheel's ``tritonserver``, backends and caches at
  ``/opt/tritonserver`` (where NGC images keep them) and its environment at
  ``/opt/tritonserver/python``, whose ``python3`` is first on PATH (the Python backend's
  stub takes its prefix from it, so the models import from it too).
* **Network**: each pod gets its own network namespace with a veth pair (pod IP
  ``10.x.y.2``, host side ``.1``), so the rendered fixed ports 8000-8002 never clash
  with another pod or with a server on the host, and probes reach the pod IP as a
  kubelet's do. Nothing outside the machine is reachable from it. :meth:`PodRunner.forward`
  is ``kubectl port-forward`` (a port on this machine's loopback to the pod's loopback),
  and :class:`OtherPod` is another pod's network namespace, routed to pods through the
  host as pod-to-pod traffic crosses a node (from the pod's start with ``peers``, as a
  pod network makes every pod reachable before its containers run).
* **Probes** are the rendered ``startupProbe``, ``readinessProbe`` and ``livenessProbe``
  (``httpGet``, ``tcpSocket`` or ``exec``), with their periods and thresholds; a failed
  liveness or startup probe, or an exit, restarts the container (``restartPolicy:
  Always``) with the kubelet's doubling back-off; ``Never`` leaves it down, ``OnFailure``
  leaves it down after an exit with 0.

What it cannot show: the rest of the images (it runs this machine's Python 3.11 and
Triton 2.51, the images Python 3.12 and Triton 2.53; what the bases carry besides pip),
scheduling, resource limits and cgroups, GPUs, Services and DNS, NetworkPolicies (no
traffic is filtered), and how fast a node pulls images. Mount points such as ``/models``
and ``/artifacts`` are created (empty) on the host's root, since the containers share it;
``/dev/termination-log``'s is a null device (``c 1 3``).
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import ipaddress
import itertools
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.support.images import image_environment, logical_lines
from tritonop.render.kubernetes import Images
from tritonop.runtime.local import make_backend_dir, server_environment, triton_home

ROOT = Path(__file__).resolve().parents[2]
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Manifest = dict[str, Any]
SecretData = Mapping[str, str | bytes]
T = TypeVar("T")
_POD_NUMBERS = itertools.count(1)
_CLONE_NEWNET = 0x40000000
# Fields of volumes, their items and mounts that the runner implements; any other fails
# the pod by name rather than being silently ignored.
_VOLUME_FIELDS = {
    "configMap": {"name", "items", "defaultMode", "optional"},
    "secret": {"secretName", "items", "defaultMode", "optional"},
    "emptyDir": {"medium", "sizeLimit"},
    "hostPath": {"path", "type"},
    "persistentVolumeClaim": {"claimName", "readOnly"},
}
_ITEM_FIELDS = {"key", "path", "mode"}
_MOUNT_FIELDS = {"name", "mountPath", "readOnly", "subPath"}
_ENV_FIELDS = {"name", "value", "valueFrom"}
FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "status.podIP")


class PodFailed(RuntimeError):
    """A container of the pod failed in a way a kubelet would report (with its log)."""


def can_run_pods() -> str | None:
    """Why pods cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "the pod runner needs root (mount namespaces, bind mounts, setpriv)"
    for tool in ("unshare", "nsenter", "setpriv", "ip", "mount", "bash"):
        if shutil.which(tool) is None:
            return f"the pod runner needs {tool}, which is not installed"
    return None


# --- volumes --------------------------------------------------------------------------------


def _timestamp() -> str:
    """The atomic writer's folder name: ``..2026_11_26_12_00_00.123456789``."""
    now = time.time_ns()
    stamp = datetime.datetime.fromtimestamp(now / 1e9, datetime.UTC)
    return f"..{stamp:%Y_%m_%d_%H_%M_%S}.{now % 1_000_000_000:09d}"


def volume_files(data: SecretData | None, source: Mapping[str, Any], what: str
                 ) -> dict[str, tuple[bytes, int]]:
    """The files of a ConfigMap or Secret volume: path -> (content, mode).

    ``items`` select keys and name their paths (all keys otherwise); a file's mode is its
    item's ``mode``, else the volume's ``defaultMode`` (0644). A missing object or key
    fails the pod unless the volume is ``optional``, as the kubelet's mount does.
    """
    mode = int(source.get("defaultMode", 0o644))
    optional = bool(source.get("optional"))
    if data is None:
        if optional:
            return {}
        raise PodFailed(f"FailedMount: {what} not found")
    items = source.get("items")
    if not items:
        return {key: (_as_bytes(value), mode) for key, value in data.items()}
    files = {}
    for item in items:
        unknown = set(item) - _ITEM_FIELDS
        if unknown:
            raise PodFailed(f"{what}: items field {sorted(unknown)} is not supported "
                            "by the pod runner")
        if item["key"] not in data:
            if optional:
                continue
            raise PodFailed(f"FailedMount: {what} has no key {item['key']!r} (items)")
        files[item["path"]] = (_as_bytes(data[item["key"]]), int(item.get("mode", mode)))
    return files


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def write_config_map(directory: Path, data: SecretData,
                     items: list[Mapping[str, Any]] | None = None, *,
                     default_mode: int = 0o644, fs_group: int | None = None) -> None:
    """Write (or update) a ConfigMap or Secret volume as the kubelet's atomic writer does.

    The payload goes into a new ``..<timestamp>`` folder; ``..data`` is swapped to it by
    renaming a fresh link over the old one (atomic), then the top-level links are added
    or removed, and the previous timestamped folder is deleted. Readers that follow
    ``..data`` see either the old files or the new ones, never a mix.
    """
    source = {"items": items, "defaultMode": default_mode} if items else \
        {"defaultMode": default_mode}
    write_atomic(directory, volume_files(data, source, "volume"), fs_group)


def write_atomic(directory: Path, files: Mapping[str, tuple[bytes, int]],
                 fs_group: int | None = None) -> None:
    """The atomic writer itself (see :func:`write_config_map`), files with their modes.

    With an ``fsGroup``, the new payload gets the group, read-only (files ``| 0440``,
    folders ``| 2550``), before ``..data`` points at it: the kubelet's volume ownership
    step for these read-only volumes, which is what lets a non-root user read a Secret
    whose ``defaultMode`` is 0400.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o777)  # the kubelet makes the volume folder world-traversable
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    payload = directory / _timestamp()
    payload.mkdir(mode=0o755)
    for relative, (content, mode) in files.items():
        target = payload / relative
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        target.write_bytes(content)
        os.chmod(target, mode)
    if fs_group is not None:
        for path in [directory, payload, *payload.rglob("*")]:
            os.chown(path, -1, fs_group)
            extra = stat.S_IRGRP | stat.S_IRUSR
            if path.is_dir():
                extra |= stat.S_IXGRP | stat.S_IXUSR | stat.S_ISGID
            os.chmod(path, path.stat().st_mode | extra)
    staging = directory / "..data_tmp"
    staging.unlink(missing_ok=True)
    staging.symlink_to(payload.name)
    os.replace(staging, directory / "..data")
    top = {relative.split("/", 1)[0] for relative in files}
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in top:
            entry.unlink()
    for name in top:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old:
        shutil.rmtree(directory / old)


def _own_for_fs_group(directory: Path, fs_group: int | None) -> None:
    """What the kubelet does to emptyDirs and claims for a pod's ``fsGroup``."""
    if fs_group is None:
        return
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files, "."]:
            path = Path(root) / name
            if path.is_symlink():
                continue
            try:  # another pod of a shared claim may be renaming files meanwhile
                os.chown(path, -1, fs_group)
                mode = path.stat().st_mode
                extra = stat.S_IRGRP | stat.S_IWGRP
                if path.is_dir():
                    extra |= stat.S_IXGRP | stat.S_ISGID
                os.chmod(path, mode | extra)
            except FileNotFoundError:
                pass


# --- environment --------------------------------------------------------------------------


def expand(text: str, variables: Mapping[str, str]) -> str:
    """``$(VAR)`` references expanded as the kubelet expands them.

    A defined variable is replaced; an undefined reference stays as written; ``$$`` is
    one ``$`` (so ``$$(VAR)`` stays literal); any other ``$`` is kept. (The kubelet's
    ``third_party/forked/golang/expansion``, for command, args and env values.)
    """
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char != "$" or index + 1 == len(text):
            out.append(char)
            index += 1
            continue
        following = text[index + 1]
        close = text.find(")", index + 2) if following == "(" else -1
        if following == "$":
            out.append("$")
            index += 2
        elif close != -1:
            name = text[index + 2:close]
            out.append(variables.get(name, f"$({name})"))
            index = close + 1
        else:  # "$(" with no ")", or "$x": kept as written
            out.append(char + following)
            index += 2
    return "".join(out)


# --- network -------------------------------------------------------------------------------


def in_network_namespace(netns: str, function: Callable[..., T], *args: Any) -> T:
    """Call ``function`` on a thread that joined the named network namespace first.

    A socket it opens belongs to that namespace and keeps working from any thread once it
    returns: how this process connects to a pod's loopback (:meth:`PodRunner.forward`) or
    acts as another pod (:class:`OtherPod`) without a child process.
    """
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns {netns}: {os.strerror(error)}")
            finally:
                os.close(fd)
            result["value"] = function(*args)
        except BaseException as error:  # raised again in the caller
            result["error"] = error

    thread = threading.Thread(target=run, name=f"in-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _splice(one: socket.socket, other: socket.socket) -> None:
    """Copy bytes both ways until both sides have closed, then close both."""
    remaining = [2]
    lock = threading.Lock()

    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                one.close()
                other.close()

    for source, target in ((one, other), (other, one)):
        threading.Thread(target=pump, args=(source, target), daemon=True).start()


class OtherPod:
    """A network namespace standing for another pod of the cluster, with no NetworkPolicy.

    Its address is in 10.251.0.0/16, a range these tests own; :meth:`reach` routes it to
    a pod through the host, as pod-to-pod traffic crosses a node: a route each way and
    forwarding on the two host-side interfaces only (the host's global ``ip_forward`` is
    left alone; the pod's interface gets its previous setting back at :meth:`close`).
    """

    def __init__(self) -> None:
        number = next(_POD_NUMBERS)
        self.netns = f"tpeer{os.getpid() % 100000}n{number}"
        self._host_if = f"tpp{os.getpid() % 100000}n{number}"[:15]
        block = 4 * (number % 64)
        self.ip = f"10.251.{os.getpid() % 250}.{block + 2}"
        self._host_ip = f"10.251.{os.getpid() % 250}.{block + 1}"
        self._reached: list[tuple[PodRunner, str]] = []
        _run(["ip", "netns", "add", self.netns])
        try:
            _run(["ip", "link", "add", self._host_if, "type", "veth", "peer", "name", "eth0",
                  "netns", self.netns])
            _run(["ip", "addr", "add", f"{self._host_ip}/30", "dev", self._host_if])
            _run(["ip", "link", "set", self._host_if, "up"])
            _run(["ip", "-n", self.netns, "addr", "add", f"{self.ip}/30", "dev", "eth0"])
            _run(["ip", "-n", self.netns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
            _set_forwarding(self._host_if, "1")
        except BaseException:
            self.close()
            raise

    def reach(self, pod: PodRunner) -> None:
        """Route this namespace and ``pod``'s to each other through the host."""
        pod_net = ipaddress.ip_interface(f"{pod.ip}/30").network
        own_net = ipaddress.ip_interface(f"{self.ip}/30").network
        _run(["ip", "-n", self.netns, "route", "add", str(pod_net), "via", self._host_ip])
        _run(["ip", "-n", pod.netns, "route", "add", str(own_net), "via", pod._host_ip])
        previous = _set_forwarding(pod._host_if, "1")
        self._reached.append((pod, previous))

    def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` with its sockets opened in this namespace."""
        return in_network_namespace(self.netns, function, *args)

    def run(self, command: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in this namespace (for clients whose sockets open on their own threads,
        such as gRPC's)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *command],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def close(self) -> None:
        for pod, previous in self._reached:
            own_net = ipaddress.ip_interface(f"{self.ip}/30").network
            subprocess.run(["ip", "-n", pod.netns, "route", "del", str(own_net)],
                           capture_output=True, check=False)
            if Path(f"/proc/sys/net/ipv4/conf/{pod._host_if}").exists():
                _set_forwarding(pod._host_if, previous)
        self._reached.clear()
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", self._host_if], capture_output=True, check=False)

    def __enter__(self) -> OtherPod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_forwarding(interface: str, value: str) -> str:
    """Set IPv4 forwarding on one interface of this machine; returns the previous value."""
    path = Path(f"/proc/sys/net/ipv4/conf/{interface}/forwarding")
    previous = path.read_text().strip()
    path.write_text(value)
    return previous


# --- images --------------------------------------------------------------------------------


def dockerfile_environment(path: Path) -> tuple[dict[str, str], str | None, str | None]:
    """``ENV``, ``WORKDIR`` and ``USER`` of a Dockerfile's last stage.

    The stand-in images take their environment from the Dockerfiles, so a variable the
    pods rely on has to be set where the real image sets it.
    """
    lines = logical_lines(path)
    last = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    env: dict[str, str] = {}
    workdir = user = None
    for line in lines[last + 1:]:
        word, _, rest = line.partition(" ")
        if word.upper() == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", env.get("PATH", BASE_PATH))
        elif word.upper() == "WORKDIR":
            workdir = rest.strip()
        elif word.upper() == "USER":
            user = rest.strip()
    return env, workdir, user


@dataclass(frozen=True)
class StandIn:
    """What an image contributes to a container: files bound in place, env, workdir."""

    binds: dict[str, Path]  # mount path in the container -> folder on this machine
    env: dict[str, str]
    workdir: str


def stand_in_images(workdir: Path, images: Images | None = None) -> dict[str, StandIn]:
    """This machine's stand-ins for the operator and Triton images, by image name.

    Each has its image's own Python environment (tests/support/images.py), holding only
    what its Dockerfile installs. The operator's is the virtual environment at
    ``/opt/tritonop`` with the examples in it. Triton's ``python3`` (first on its PATH, as
    the NGC image's /usr/bin/python3 is) is the environment bound at
    ``/opt/tritonserver/python``: the Python backend's stub embeds Python, which finds its
    prefix from the ``python3`` on PATH, so the models import from that environment too,
    not from the development venv.
    """
    images = images or Images()
    operator_prefix, triton_python = "/opt/tritonop", "/opt/tritonserver/python"
    env, wd, _ = dockerfile_environment(ROOT / "deploy" / "Dockerfile.operator")
    operator = StandIn({operator_prefix: image_environment("operator", operator_prefix)},
                       env, wd or "/")

    home = triton_home()
    triton_root = workdir / "images" / "triton"
    (triton_root / "bin").mkdir(parents=True, exist_ok=True)
    (triton_root / "python").mkdir(exist_ok=True)  # the environment's mount point
    for name, target in (("bin/tritonserver", home / "bin" / "tritonserver"),
                         ("caches", home / "caches")):
        link = triton_root / name
        if not link.is_symlink():
            link.symlink_to(target)
    make_backend_dir(triton_root / "backends", home)
    local = server_environment(home)
    env = {"PATH": f"/opt/tritonserver/bin:{triton_python}/bin:{BASE_PATH}",
           "LD_LIBRARY_PATH": local["LD_LIBRARY_PATH"]}
    extra, wd, _ = dockerfile_environment(ROOT / "deploy" / "Dockerfile.triton")
    env.update({k: v.replace(BASE_PATH, env["PATH"]) for k, v in extra.items()})
    triton = StandIn({"/opt/tritonserver": triton_root,
                      triton_python: image_environment("triton", triton_python)},
                     env, wd or "/opt/tritonserver")
    return {images.operator: operator, images.triton: triton}


KEEP = Path("/run/tritonop-podrunner")
"""Where a container's namespace keeps this machine's folders that a volume will cover."""


def _image_sources() -> list[Path]:
    """Folders of this machine that the image stand-ins reach by absolute path.

    The venv's scripts, its editable install and the stand-ins' links name the repository,
    the venv, the wheel's Triton and the interpreter where they lie here. A checkout under
    /tmp (CI clones anywhere) would be covered by the pod's /tmp emptyDir, and every
    container would exit 127; such a folder is bound back into place after the volume.
    """
    paths = {ROOT.resolve(), Path(sys.prefix).resolve(), triton_home().resolve(),
             Path(sys.base_prefix).resolve()}
    return sorted(p for p in paths if not any(q in p.parents for q in paths))


def _covered(target: str, sources: list[Path]) -> list[Path]:
    """The image sources that a volume mounted at ``target`` would hide."""
    return [p for p in sources if Path(target) in p.parents]


def _hidden_interpreter_dirs() -> list[Path]:
    """Folders on the way to this Python that a non-root user cannot traverse.

    A pyenv interpreter under ``/root`` (mode 0700) cannot be run by uid 1000; inside the
    container's mount namespace such a folder is covered by a traversable tmpfs with the
    interpreter's tree bound back into it (an image's interpreter sits in /usr).
    """
    hidden = []
    prefix = Path(sys.base_prefix).resolve()
    for parent in reversed(prefix.parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            hidden.append(parent)
    return hidden


# --- probes --------------------------------------------------------------------------------


@dataclass
class Probe:
    """One rendered probe with the kubelet's defaults."""

    spec: Manifest
    kind: str  # startup, readiness, liveness

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))

    @property
    def failure_threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))

    @property
    def initial_delay(self) -> float:
        return float(self.spec.get("initialDelaySeconds", 0))


# --- the pod -------------------------------------------------------------------------------


@dataclass
class Container:
    """One container of the pod and its running process."""

    spec: Manifest
    init: bool
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: bool = False
    ready: bool = False
    exit_codes: list[int] = field(default_factory=list)
    set_up: bool = False
    """Its mounts and root are in place: its script said so just before ``exec``. Until
    then a kubelet shows no running container (no probe, no exec, not Ready)."""
    setup_pipe: int | None = None
    """Read end of the pipe on which the script says so."""
    env: dict[str, str] = field(default_factory=dict)
    """Its environment (the image's, then its own), which ``kubectl exec`` runs with too."""

    @property
    def name(self) -> str:
        return str(self.spec["name"])


class PodRunner:
    """A rendered pod, run here the way a kubelet runs it (see the module docstring).

    Args:
        manifest: a Deployment (its pod template is run) or a pod template.
        config_maps: ConfigMap ``data`` by name, for the pod's configMap volumes and
            ``configMapKeyRef``.
        claims: folder on this machine per PersistentVolumeClaim name.
        secrets: Secret contents by name (decoded: ``stringData``, or bytes), for secret
            volumes and ``secretKeyRef``; a Secret not named here does not exist.
        workdir: where the volumes, image stand-ins and logs are kept.
        name: the pod's name (its hostname, and part of its network namespace's name).
        namespace: the pod's namespace (``fieldRef: metadata.namespace``).
        peers: other pods' namespaces routed to this one from its start, before any
            container runs (a server a test runs as another pod of the cluster).
    """

    def __init__(self, manifest: Manifest, config_maps: Mapping[str, Mapping[str, str]],
                 workdir: Path, *, claims: Mapping[str, Path] | None = None,
                 secrets: Mapping[str, SecretData] | None = None,
                 name: str = "pod", namespace: str = "default",
                 peers: Sequence[OtherPod] = ()) -> None:
        template = manifest["spec"]["template"] if manifest.get("kind") == "Deployment" \
            else manifest
        self.pod: Manifest = template["spec"]
        self.name = name
        self.namespace = namespace
        self.uid = str(uuid.uuid4())
        self.workdir = Path(workdir)
        self.config_maps = {k: dict(v) for k, v in config_maps.items()}
        self.secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self.claims = dict(claims or {})
        self.peers = list(peers)
        self._forwards: dict[int, socket.socket] = {}
        self.images = stand_in_images(self.workdir)
        self.volumes: dict[str, Path] = {}
        self._tmpfs: list[Path] = []
        number = next(_POD_NUMBERS)
        self.netns = f"tpod{os.getpid() % 100000}n{number}"
        self._host_if = f"tph{os.getpid() % 100000}n{number}"[:15]
        self.ip = f"10.{200 + os.getpid() % 50}.{number % 250}.2"
        self._host_ip = self.ip.rsplit(".", 1)[0] + ".1"
        self.containers = [Container(c, init=True) for c in self.pod.get("initContainers", [])]
        self.containers += [Container(c, init=False) for c in self.pod["containers"]]
        self._stop = threading.Event()
        self._pipes = threading.Lock()  # the containers' setup pipes (read, closed once)
        self._monitors: list[threading.Thread] = []
        self.started_at: float | None = None
        self.ready_at: float | None = None
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)

    # -- set-up ---------------------------------------------------------------------------

    @property
    def fs_group(self) -> int | None:
        value = self.pod.get("securityContext", {}).get("fsGroup")
        return None if value is None else int(value)

    @staticmethod
    def _volume_type(volume: Manifest) -> str:
        """The volume's source (``configMap``, ``secret``...), its fields checked."""
        types = [key for key in volume if key != "name"]
        if len(types) != 1 or types[0] not in _VOLUME_FIELDS:
            raise PodFailed(f"volume {volume.get('name')}: {types} not supported by the pod "
                            f"runner (it implements {sorted(_VOLUME_FIELDS)})")
        unknown = set(volume[types[0]] or {}) - _VOLUME_FIELDS[types[0]]
        if unknown:
            raise PodFailed(f"volume {volume['name']}: {types[0]} field {sorted(unknown)} "
                            "not supported by the pod runner")
        return types[0]

    def _write_api_volume(self, volume: Manifest) -> None:
        """Write a configMap or secret volume's current contents (the atomic writer)."""
        kind = self._volume_type(volume)
        source = volume[kind]
        if kind == "configMap":
            data, what = self.config_maps.get(source["name"]), f'configmap "{source["name"]}"'
        else:
            data, what = self.secrets.get(source["secretName"]), \
                f'secret "{source["secretName"]}"'
        files = volume_files(data, source, f"volume {volume['name']}: {what}")
        write_atomic(self.volumes[volume["name"]], files, self.fs_group)

    def _make_volumes(self) -> None:
        for volume in self.pod.get("volumes", []):
            name = volume["name"]
            folder = self.workdir / "volumes" / name
            kind = self._volume_type(volume)
            if kind in ("configMap", "secret"):
                if kind == "secret":  # the kubelet keeps Secrets in memory (tmpfs)
                    folder.mkdir(parents=True, exist_ok=True)
                    _run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0777", "tmpfs",
                          str(folder)])
                    self._tmpfs.append(folder)
                self.volumes[name] = folder
                self._write_api_volume(volume)
            elif "emptyDir" in volume:
                folder.mkdir(parents=True, exist_ok=True)
                medium = volume["emptyDir"].get("medium", "")
                if medium not in ("", "Memory"):
                    raise PodFailed(f"volume {name}: emptyDir medium {medium!r} not supported "
                                    "by the pod runner")
                if medium == "Memory":
                    size = volume["emptyDir"].get("sizeLimit", "64Mi")
                    size = size.replace("Gi", "g").replace("Mi", "m").replace("Ki", "k")
                    _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs",
                          str(folder)])
                    self._tmpfs.append(folder)
                os.chmod(folder, 0o777)
                _own_for_fs_group(folder, self.fs_group)
            elif "hostPath" in volume:
                folder = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if claim not in self.claims:
                    raise PodFailed(f"volume {name}: persistentVolumeClaim {claim!r} is not "
                                    "bound (no folder given for it)")
                folder = self.claims[claim]
                folder.mkdir(parents=True, exist_ok=True)
                _own_for_fs_group(folder, self.fs_group)
            self.volumes[name] = folder

    def _make_network(self) -> None:
        ns = self.netns
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", self._host_if, "type", "veth", "peer", "name", "eth0",
              "netns", ns])
        _run(["ip", "addr", "add", f"{self._host_ip}/30", "dev", self._host_if])
        _run(["ip", "link", "set", self._host_if, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.ip}/30", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for peer in self.peers:
            peer.reach(self)

    def _script(self, container: Container) -> Path:
        """The shell script that makes a container's mount namespace and starts it."""
        spec = container.spec
        stand_in = self.images.get(spec["image"])
        if stand_in is None:
            raise PodFailed(f"{spec['name']}: no stand-in for image {spec['image']}")
        privileges = self._privileges(container)
        env = self._container_env(container)  # before any mount: a kubelet checks it first
        mounts: list[tuple[Path, str, bool]] = [
            (path, target, True) for target, path in stand_in.binds.items()]
        volumes = {v["name"]: v for v in self.pod.get("volumes", [])}
        for mount in spec.get("volumeMounts", []):
            unknown = set(mount) - _MOUNT_FIELDS
            if unknown:
                raise PodFailed(f"{spec['name']}: volumeMounts field {sorted(unknown)} not "
                                "supported by the pod runner")
            if mount["name"] not in self.volumes:
                raise PodFailed(f"{spec['name']}: volumeMounts names no volume "
                                f"{mount['name']!r}")
            source = self.volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            # The kubelet mounts ConfigMaps and Secrets read-only whatever the mount says.
            read_only = bool(mount.get("readOnly")) or "configMap" in volume \
                or "secret" in volume \
                or bool(volume.get("persistentVolumeClaim", {}).get("readOnly"))
            mounts.append((source, mount["mountPath"], read_only))
        # A target that hides another mount's source (/tmp over a source under /tmp) last.
        # (The sources are listed first: list.sort empties the list while it sorts.)
        sources_of_mounts = [str(source) for source, _, _ in mounts]
        mounts.sort(key=lambda m: any(s.startswith(m[1].rstrip("/") + "/")
                                      for s in sources_of_mounts))
        lines = ["set -e"]
        # Mount points on the shared root (created once, empty, on the host).
        lines += [f"mkdir -p {shlex.quote(target)}" for _, target, _ in mounts]
        # The termination message file, first: no volume hides its source yet. Its mount
        # point on the shared root is a null device, not a file: a program that writes its
        # message only where the file is there finds none outside a pod.
        message = shlex.quote(spec.get("terminationMessagePath", "/dev/termination-log"))
        lines += [f"mkdir -p $(dirname {message})",
                  f"[ -e {message} ] || mknod -m 666 {message} c 1 3 2>/dev/null "
                  f"|| [ -e {message} ]",
                  f"mount --bind {shlex.quote(str(self._termination_file(container)))} "
                  f"{message}"]
        for index, hidden in enumerate(_hidden_interpreter_dirs()):
            keep = self.workdir / "images" / f"hidden{index}"
            keep.mkdir(parents=True, exist_ok=True)
            inner = Path(sys.base_prefix).resolve().relative_to(hidden).parts[0]
            lines += [f"mount --bind {hidden / inner} {keep}",
                      f"mount -t tmpfs -o mode=755,size=1m tmpfs {hidden}",
                      f"mkdir -p {hidden / inner}", f"mount --bind {keep} {hidden / inner}"]
        sources = _image_sources()
        volume_targets = [m["mountPath"] for m in spec.get("volumeMounts", [])]
        kept = {path: KEEP / f"keep{i}" for i, path in enumerate(
            p for t in volume_targets for p in _covered(t, sources))}
        for path, keep in kept.items():
            keep.mkdir(parents=True, exist_ok=True)
            lines.append(f"mount --bind {shlex.quote(str(path))} {keep}")
        for source, target, read_only in mounts:
            lines.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
            for path in _covered(target, list(kept)):
                lines += [f"mkdir -p {shlex.quote(str(path))}",
                          f"mount --bind {kept[path]} {shlex.quote(str(path))}"]
            if read_only:
                lines.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        if spec.get("securityContext", {}).get("readOnlyRootFilesystem"):
            lines.append("mount -o remount,bind,ro /")
        # $(VAR) comes from the container's own env only, not the image's.
        command = [expand(part, env) for part in [*spec.get("command", []),
                                                  *spec.get("args", [])]]
        env = {**stand_in.env, "HOSTNAME": self.name, **env}
        env.setdefault("PATH", BASE_PATH)
        container.env = env
        workdir = spec.get("workingDir") or stand_in.workdir
        lines.append(f"cd {shlex.quote(workdir)}")
        # Tell the runner the container is set up ($1: the pipe's fd, which may be above 9:
        # bash, not dash, redirects those), and close it.
        lines.append('eval "printf up >&$1; exec $1>&-"')
        lines.append("exec " + shlex.join([*privileges, "env", "-i",
                                           *(f"{k}={v}" for k, v in env.items()), *command]))
        script = self.workdir / f"{spec['name']}.sh"
        script.write_text("\n".join(lines) + "\n")
        return script

    def _container_env(self, container: Container) -> dict[str, str]:
        """The container's ``env`` as the kubelet resolves it (see the module docstring).

        Raises:
            PodFailed: a Secret, ConfigMap or key that is missing and not optional
                (CreateContainerConfigError), or a field the runner does not implement.
        """
        spec = container.spec
        if "envFrom" in spec:
            raise PodFailed(f"{spec['name']}: envFrom is not supported by the pod runner")
        env: dict[str, str] = {}
        for index, item in enumerate(spec.get("env", [])):
            where = f"{spec['name']}: env[{index}] {item.get('name')}"
            unknown = set(item) - _ENV_FIELDS
            if unknown:
                raise PodFailed(f"{where}: field {sorted(unknown)} not supported by the pod "
                                "runner")
            if "valueFrom" in item:
                value = self._value_from(where, item["valueFrom"])
                if value is None:  # optional and missing: the variable is not set
                    continue
            else:
                value = expand(str(item.get("value", "")), env)
            env[item["name"]] = value
        return env

    def _value_from(self, where: str, source: Manifest) -> str | None:
        """One ``valueFrom``: its value, or None for a missing optional reference."""
        if len(source) != 1:
            raise PodFailed(f"{where}: valueFrom needs exactly one source, got {sorted(source)}")
        ((kind, ref),) = source.items()
        if kind == "fieldRef":
            values = {"metadata.name": self.name, "metadata.namespace": self.namespace,
                      "metadata.uid": self.uid, "status.podIP": self.ip}
            path = ref.get("fieldPath")
            if path not in values:
                raise PodFailed(f"{where}: valueFrom.fieldRef.fieldPath {path!r} not "
                                f"supported by the pod runner (it implements {FIELD_PATHS})")
            return values[path]
        if kind not in ("secretKeyRef", "configMapKeyRef"):
            raise PodFailed(f"{where}: valueFrom.{kind} not supported by the pod runner")
        unknown = set(ref) - {"name", "key", "optional"}
        if unknown:
            raise PodFailed(f"{where}: valueFrom.{kind} field {sorted(unknown)} not "
                            "supported by the pod runner")
        objects: Mapping[str, SecretData]
        objects, what = ((self.secrets, "Secret") if kind == "secretKeyRef"
                         else (self.config_maps, "ConfigMap"))
        data = objects.get(ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            problem = (f'{what.lower()} "{ref["name"]}" not found' if data is None else
                       f"couldn't find key {ref['key']} in {what} "
                       f"{self.namespace}/{ref['name']}")
            raise PodFailed(f"CreateContainerConfigError: {problem} ({where})")
        value = data[ref["key"]]
        return value.decode() if isinstance(value, bytes) else value

    def _privileges(self, container: Container) -> list[str]:
        """``setpriv`` arguments for the container's security context (exec uses them too)."""
        spec = container.spec
        pod_security = self.pod.get("securityContext", {})
        security = {**pod_security, **spec.get("securityContext", {})}
        uid, gid = int(security.get("runAsUser", 0)), int(security.get("runAsGroup", 0))
        if security.get("runAsNonRoot") and uid == 0:
            raise PodFailed(f"{spec['name']}: runAsNonRoot with uid 0 "
                            "(the kubelet refuses to start it)")
        privileges = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
        groups = [str(g) for g in {self.fs_group, *pod_security.get("supplementalGroups", [])}
                  if g is not None]
        privileges += [f"--groups={','.join(groups)}"] if groups else ["--clear-groups"]
        capabilities = spec.get("securityContext", {}).get("capabilities", {})
        unknown = set(capabilities) - {"drop", "add"}
        if unknown or set(capabilities.get("drop", [])) - {"ALL"}:
            raise PodFailed(f"{spec['name']}: capabilities {capabilities} not supported by "
                            "the pod runner (drop: [ALL] and add are)")
        if "ALL" in capabilities.get("drop", []):
            added = "".join(f",+{c.lower()}" for c in capabilities.get("add", []))
            privileges += [f"--inh-caps=-all{added}", f"--bounding-set=-all{added}"]
        elif capabilities.get("add"):
            raise PodFailed(f"{spec['name']}: capabilities.add without drop: [ALL] is not "
                            "supported by the pod runner")
        if security.get("allowPrivilegeEscalation") is False:
            privileges.append("--no-new-privs")
        return privileges

    def _launch(self, container: Container) -> None:
        script = self._script(container)
        log = open(self.workdir / "logs" / f"{container.name}.log", "ab")
        self._close_setup(container)
        read_end, write_end = os.pipe()
        container.process = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount",
             "--propagation", "private", "bash", str(script), str(write_end)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            pass_fds=(write_end,))
        log.close()
        os.close(write_end)
        os.set_blocking(read_end, False)
        with self._pipes:
            container.setup_pipe = read_end
        container.started = container.ready = container.set_up = False

    def _is_set_up(self, container: Container) -> bool:
        """Whether the container's script has finished its mounts and exec'd its command."""
        with self._pipes:
            if not container.set_up and container.setup_pipe is not None:
                try:
                    container.set_up = bool(os.read(container.setup_pipe, 8))
                except BlockingIOError:  # nothing yet
                    pass
            return container.set_up

    def _close_setup(self, container: Container) -> None:
        """Close the setup pipe's read end, once. A monitor that restarts a container and
        stop() may both close it: closed twice, the second close would hit whatever file
        took that number since, such as another pod's pipe, whose container then dies of
        SIGPIPE as it reports its setup (seen once under load)."""
        with self._pipes:
            if container.setup_pipe is not None:
                os.close(container.setup_pipe)
                container.setup_pipe = None

    # -- running --------------------------------------------------------------------------

    def start(self, init_timeout: float = 1800) -> PodRunner:
        """Lay out the volumes, run the init containers to completion, start the rest."""
        self.started_at = time.monotonic()
        atexit.register(self.stop)  # a test run that is killed still cleans up
        try:
            self._make_volumes()
            self._make_network()
            for container in self.containers:
                if container.init:
                    self._run_init(container, init_timeout)
            for container in self.containers:
                if not container.init:
                    self._launch(container)
                    monitor = threading.Thread(target=self._monitor, args=(container,),
                                               name=f"probe-{container.name}", daemon=True)
                    monitor.start()
                    self._monitors.append(monitor)
        except BaseException:
            self.stop()
            raise
        return self

    def _run_init(self, container: Container, timeout: float) -> None:
        self._launch(container)
        assert container.process is not None
        try:
            code = container.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(container)
            raise PodFailed(f"init container {container.name} still running after "
                            f"{timeout:.0f} s:\n{self.log_tail(container.name)}") from None
        container.exit_codes.append(code)
        if code != 0:
            # A kubelet would retry it with back-off; a test wants to see why at once.
            raise PodFailed(f"init container {container.name} exited with {code}:\n"
                            f"{self.log_tail(container.name)}")

    def _monitor(self, container: Container) -> None:
        """The kubelet's probe loop for one container, restarting it when it must."""
        spec = container.spec
        probes = [Probe(spec[f"{kind}Probe"], kind) for kind in ("startup", "readiness",
                                                                  "liveness")
                  if f"{kind}Probe" in spec]
        backoff = 10.0
        while not self._stop.is_set():
            launched = time.monotonic()
            due = {p.kind: launched + p.initial_delay for p in probes}
            failures = dict.fromkeys(due, 0)
            container.started = "startup" not in due
            restart_reason = None
            while not self._stop.is_set() and restart_reason is None:
                assert container.process is not None
                code = container.process.poll()
                if code is not None:
                    container.exit_codes.append(code)
                    restart_reason = f"exited with {code}"
                    break
                if not self._is_set_up(container):  # not running yet: nothing to probe
                    time.sleep(0.02)
                    continue
                now = time.monotonic()
                for probe in probes:
                    if now < due[probe.kind] or (probe.kind != "startup"
                                                 and not container.started):
                        continue
                    if probe.kind == "startup" and container.started:
                        continue
                    due[probe.kind] = now + probe.period
                    ok = self._probe(container, probe)
                    failures[probe.kind] = 0 if ok else failures[probe.kind] + 1
                    failed = failures[probe.kind] >= probe.failure_threshold
                    if probe.kind == "startup":
                        container.started = ok
                        if failed:
                            restart_reason = "startup probe failed"
                    elif probe.kind == "readiness":
                        if ok and not container.ready:
                            container.ready = True
                            self._note_ready()
                        elif failed:
                            container.ready = False
                    elif failed:
                        restart_reason = "liveness probe failed"
                if not any(p.kind == "readiness" for p in probes) and container.started:
                    if not container.ready:
                        container.ready = True
                        self._note_ready()
                time.sleep(0.1)
            container.ready = False
            if self._stop.is_set():
                return
            self._kill(container)
            # restartPolicy: Never keeps every container down; OnFailure, one that exited 0.
            policy = self.pod.get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure"
                                     and restart_reason == "exited with 0"):
                self._log(container, f"[podrunner] not restarted ({policy}): {restart_reason}")
                return
            self._log(container, f"[podrunner] restarting: {restart_reason}")
            container.restarts += 1
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 300.0)
            try:
                self._launch(container)
            except PodFailed as error:  # the kubelet keeps it waiting, with the reason
                self._log(container, f"[podrunner] {error}")
                return

    def _note_ready(self) -> None:
        if self.ready and self.ready_at is None:
            self.ready_at = time.monotonic()

    def _probe(self, container: Container, probe: Probe) -> bool:
        spec = probe.spec
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                port = self.port(get["port"], container)
                url = f"http://{get.get('host', self.ip)}:{port}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=probe.timeout) as response:
                    return 200 <= response.status < 400
            if "tcpSocket" in spec:
                port = self.port(spec["tcpSocket"]["port"], container)
                with socket.create_connection((self.ip, port), timeout=probe.timeout):
                    return True
            if "exec" in spec:
                return self.exec(container.name, spec["exec"]["command"],
                                 timeout=probe.timeout).returncode == 0
        except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
            return False
        raise PodFailed(f"{container.name}: unsupported {probe.kind} probe {spec}")

    def port(self, port: int | str, container: Container | None = None) -> int:
        """A container port by number or by name, as probes and Services name it."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for candidate in ([container] if container else self.containers):
            for declared in candidate.spec.get("ports", []):
                if declared.get("name") == port:
                    return int(declared["containerPort"])
        raise PodFailed(f"no container port named {port!r}")

    def url(self, port: int | str = "http") -> str:
        return f"http://{self.ip}:{self.port(port)}"

    def forward(self, port: int) -> str:
        """``kubectl port-forward``: a URL on this machine's loopback to ``port`` on the
        pod's loopback, where Triton's HTTP and gRPC listen unless exposed."""
        if port not in self._forwards:
            listener = socket.create_server(("127.0.0.1", 0))
            self._forwards[port] = listener
            threading.Thread(target=self._accept, args=(listener, port), daemon=True,
                             name=f"forward-{port}").start()
        return f"http://127.0.0.1:{self._forwards[port].getsockname()[1]}"

    def _accept(self, listener: socket.socket, port: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by stop()
                return
            try:
                upstream = in_network_namespace(self.netns, socket.create_connection,
                                                ("127.0.0.1", port), 10)
            except OSError:
                client.close()  # the client sees the refusal as a closed connection
                continue
            _splice(client, upstream)

    def exec(self, name: str, command: list[str], timeout: float = 30
             ) -> subprocess.CompletedProcess[str]:
        """``kubectl exec``: a command in a running container's namespaces, as its user."""
        container = self.container(name)
        assert container.process is not None
        deadline = time.monotonic() + timeout
        while not self._is_set_up(container):  # a kubelet execs into running containers only
            if container.process.poll() is not None or time.monotonic() > deadline:
                raise PodFailed(f"container {name} is not running:\n{self.log_tail(name)}")
            time.sleep(0.02)
        return subprocess.run(
            ["nsenter", f"--target={container.process.pid}", "--mount", "--net",
             *self._privileges(container), "env", "-i",
             *(f"{k}={v}" for k, v in container.env.items()), *command],
            capture_output=True, text=True, timeout=timeout, check=False)

    def container(self, name: str) -> Container:
        (found,) = [c for c in self.containers if c.name == name]
        return found

    @property
    def ready(self) -> bool:
        return all(c.ready for c in self.containers if not c.init)

    def wait_ready(self, timeout: float = 900) -> float:
        """Wait until every container is Ready; returns seconds since :meth:`start`.

        Raises:
            PodFailed: a container exited or was restarted (crash loop), or the pod was
                not Ready in time; the message carries the container's log.
        """
        assert self.started_at is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready:
                assert self.ready_at is not None
                return self.ready_at - self.started_at
            for container in self.containers:
                if not container.init and (container.restarts or container.exit_codes):
                    raise PodFailed(
                        f"container {container.name} exited {container.exit_codes} "
                        f"(restarts: {container.restarts}):\n{self.log_tail(container.name)}")
            time.sleep(0.2)
        raise PodFailed(f"pod not Ready after {timeout:.0f} s:\n"
                        + "\n".join(self.log_tail(c.name) for c in self.containers))

    def update_config_map(self, name: str, data: Mapping[str, str]) -> None:
        """Apply a new ConfigMap version to the running pod, as the kubelet syncs it."""
        self.config_maps[name] = dict(data)
        for volume in self.pod.get("volumes", []):
            if volume.get("configMap", {}).get("name") == name:
                self._write_api_volume(volume)

    def update_secret(self, name: str, data: SecretData) -> None:
        """Apply a new Secret version to the running pod, as the kubelet syncs it."""
        self.secrets[name] = dict(data)
        for volume in self.pod.get("volumes", []):
            if volume.get("secret", {}).get("secretName") == name:
                self._write_api_volume(volume)

    def _termination_file(self, container: Container) -> Path:
        """A new empty file for this run of the container, writable by any uid (0666, as
        the kubelet makes it), bound at its ``terminationMessagePath``."""
        path = self.workdir / "termination" / container.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.chmod(path, 0o666)
        return path

    def termination_message(self, name: str) -> str:
        """What the container's terminated state reports as its ``message``.

        The file it wrote at its ``terminationMessagePath`` (the first 4096 bytes, as the
        kubelet reads it); with ``FallbackToLogsOnError``, an empty file and a non-zero
        exit, the end of its log (80 lines, 2048 bytes at most).
        """
        container = self.container(name)
        path = self.workdir / "termination" / name
        message = path.read_bytes()[:4096].decode(errors="replace") if path.exists() else ""
        if (not message and container.exit_codes and container.exit_codes[-1] != 0
                and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"):
            tail = "\n".join(self.logs(name).splitlines()[-80:]).encode()
            message = tail[-2048:].decode(errors="replace")
        return message

    def logs(self, name: str) -> str:
        """A container's output, every restart included (``kubectl logs``, roughly)."""
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines: int = 60) -> str:
        return f"--- {name} ---\n" + "\n".join(self.logs(name).splitlines()[-lines:])

    def _log(self, container: Container, message: str) -> None:
        with open(self.workdir / "logs" / f"{container.name}.log", "a") as log:
            log.write(message + "\n")

    # -- teardown -------------------------------------------------------------------------

    def _kill(self, container: Container, grace: float = 10.0, *, again: bool = False) -> None:
        """SIGTERM to the container's process group, SIGKILL after the grace period.

        With ``again``, SIGTERM once more each second while the container runs (a stop asked
        for again, as a second Ctrl-C): the gateway, which drains for its ``--drain-seconds``
        on the first signal, stops at once on the next (Triton ignores a repeated one).
        """
        process = container.process
        if process is None or process.poll() is not None:
            return
        deadline = time.monotonic() + grace
        try:
            os.killpg(process.pid, signal.SIGTERM)
            while again and deadline - time.monotonic() > 1:
                try:
                    process.wait(1)
                    return
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGTERM)
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def stop(self, grace: float | None = None,
             before_kill: Callable[[Container, float], None] | None = None,
             *, drain: bool = True) -> None:
        """Stop every container, then remove the network namespace and tmpfs mounts.

        Args:
            grace: seconds between SIGTERM and SIGKILL; by default the pod's
                ``terminationGracePeriodSeconds`` capped at 20 s, so that a test's teardown
                stays short (Triton exits within seconds of SIGTERM).
            before_kill: run for each container, with the seconds of the grace left,
                before its SIGTERM (the node agent's preStop hooks); the containers are
                stopped in parallel, each SIGTERM after its own hook, SIGKILL when the grace
                is over (at least 2 s after the hook).
            drain: False sends SIGTERM again each second while a container runs, so that
                the gateway skips its drain (10 s): for a stop that no test checks, such as
                a fixture's teardown. The kubelet (and the node agent) signals once.
        """
        self._stop.set()  # from here on no container is restarted
        for listener in self._forwards.values():
            try:  # wakes the thread blocked in accept(), which close() alone does not
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        self._forwards.clear()
        if grace is None:
            grace = min(float(self.pod.get("terminationGracePeriodSeconds", 30)), 20.0)
        # All at once, as the kubelet does: Triton waits for the gateway's connection to
        # it to close, which it does only when the gateway goes too.
        deadline = time.monotonic() + grace

        def stop_one(container: Container) -> None:
            left = grace
            if before_kill is not None:
                before_kill(container, max(0.0, deadline - time.monotonic()))
                left = max(2.0, deadline - time.monotonic())
            self._kill(container, left, again=not drain)

        killers = [threading.Thread(target=stop_one, args=(container,), daemon=True)
                   for container in self.containers]
        for killer in killers:
            killer.start()
        for killer in killers:
            killer.join()
        for monitor in self._monitors:
            monitor.join(timeout=5)
        for container in self.containers:  # after the monitors, which read them
            self._close_setup(container)
        # Wait for every process in the namespace to be gone (children of the main
        # process die of the group's signal, asynchronously); SIGKILL what lingers, such
        # as a process that left the group.
        deadline = time.monotonic() + 5
        while pids := self._pids():
            if time.monotonic() > deadline - 3:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", self._host_if], capture_output=True, check=False)
        for folder in self._tmpfs:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)
        self._tmpfs.clear()

    def _pids(self) -> list[int]:
        """Live processes in the pod's network namespace (zombies excluded)."""
        found = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                               text=True, check=False).stdout.split()
        alive = []
        for pid in found:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                alive.append(int(pid))
        return alive

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PodFailed(f"{shlex.join(command)}: {result.stderr.strip()}")
