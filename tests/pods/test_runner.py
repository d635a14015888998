"""The pod runner itself: the kubelet's ConfigMap layout, probes, restarts and teardown.

The other tests here trust the runner to behave like a kubelet; these check that it does,
on small pods whose container is a shell or Python's http.server in place of Triton.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.podrunner import OtherPod, PodFailed, PodRunner, expand, write_config_map
from tritonop.render.kubernetes import Images

PYTHON = ["python3", "-c"]


def test_config_map_volume_is_laid_out_and_updated_as_the_atomic_writer_does(tmp_path):
    items = [{"key": "m__config.pbtxt", "path": "m/config.pbtxt"},
             {"key": "r.yaml", "path": "r.yaml"}]
    write_config_map(tmp_path, {"m__config.pbtxt": "one", "r.yaml": "a", "unused": "x"}, items)
    first = os.readlink(tmp_path / "..data")
    assert first.startswith("..20") and (tmp_path / first).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["..data", first, "m", "r.yaml"])
    assert os.readlink(tmp_path / "m") == "..data/m"
    assert (tmp_path / "m" / "config.pbtxt").read_text() == "one"
    assert not (tmp_path / first / "unused").exists()  # items select keys

    write_config_map(tmp_path, {"m__config.pbtxt": "two"}, items[:1])
    second = os.readlink(tmp_path / "..data")
    assert second != first and not (tmp_path / first).exists()
    assert (tmp_path / "m" / "config.pbtxt").read_text() == "two"
    assert not (tmp_path / "r.yaml").is_symlink()  # an entry no longer there goes


def pod(container: dict[str, Any]) -> dict[str, Any]:
    base = {"name": "main", "image": Images().triton,
            "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
            "ports": [{"name": "http", "containerPort": 8000}],
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    return {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
                     "containers": [{**base, **container}],
                     "volumes": [{"name": "tmp", "emptyDir": {}}]}}


def quick(probe: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**probe, "periodSeconds": 1, "timeoutSeconds": 1, **extra}


def test_probes_gate_readiness_and_a_failing_liveness_probe_restarts(tmp_path):
    server = {
        "command": ["python3", "-m", "http.server", "8000"], "workingDir": "/tmp",
        # Started once /tmp/started exists; Ready while the port answers; alive while
        # /tmp/dead does not exist.
        "startupProbe": quick({"exec": {"command": ["test", "-f", "/tmp/started"]}},
                              failureThreshold=60),
        "readinessProbe": quick({"tcpSocket": {"port": "http"}}),
        "livenessProbe": quick({"exec": {"command": ["sh", "-c", "! test -f /tmp/dead"]}},
                               failureThreshold=2),
    }
    runner = PodRunner(pod(server), {}, tmp_path, name="probes")
    with runner:
        time.sleep(3)
        assert not runner.ready  # serving, but the startup probe holds readiness back
        assert runner.exec("main", ["touch", "/tmp/started"]).returncode == 0
        runner.wait_ready(20)
        assert runner.exec("main", ["touch", "/tmp/dead"]).returncode == 0
        deadline = time.monotonic() + 20
        while runner.container("main").restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.container("main").restarts == 1
        assert "liveness probe failed" in runner.logs("main")
        pid = runner.container("main").process.pid
    # Teardown: the process group and the network namespace are gone.
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert runner.netns not in namespaces


@pytest.mark.parametrize(("policy", "code", "restarted"), [
    ("Never", 3, False), ("Never", 0, False), ("OnFailure", 0, False), ("OnFailure", 3, True),
    ("Always", 0, True)])
def test_restart_policy_decides_whether_an_exited_container_restarts(tmp_path, policy, code,
                                                                     restarted):
    """What Job pods (restartPolicy Never) need: a container that exits stays down."""
    manifest = pod({"command": ["sh", "-c", f"exit {code}"]})
    manifest["spec"]["restartPolicy"] = policy
    with PodRunner(manifest, {}, tmp_path, name="policy") as runner:
        container = runner.container("main")
        deadline = time.monotonic() + 20
        while not container.exit_codes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert container.exit_codes == [code]
        if restarted:
            while container.restarts == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert container.restarts == 1
        else:
            (monitor,) = runner._monitors
            monitor.join(10)
            assert not monitor.is_alive() and container.restarts == 0
            assert f"not restarted ({policy}): exited with {code}" in runner.logs("main")


def test_runner_refuses_root_where_run_as_non_root_and_children_die_with_the_pod(tmp_path):
    # The container starts a child in the background and waits: stopping the pod must
    # end both (process group), even though only the parent was started by the runner.
    script = "import subprocess, time; subprocess.Popen(['sleep', '600']); time.sleep(600)"
    runner = PodRunner(pod({"command": [*PYTHON, script]}), {}, tmp_path / "a", name="tree")
    with runner:
        runner.wait_ready(10)
        time.sleep(1)
        pids = subprocess.run(["ip", "netns", "pids", runner.netns], capture_output=True,
                              text=True).stdout.split()
        assert len(pids) >= 2
    assert runner._pids() == []
    for pid in pids:  # gone, or a zombie waiting for this machine's init to reap it
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"

    root = pod({"command": ["true"]})
    root["spec"]["securityContext"]["runAsUser"] = 0
    refused = PodRunner(root, {}, tmp_path / "b", name="root")
    try:
        refused.start()
        raise AssertionError("a runAsNonRoot container with uid 0 was started")
    except RuntimeError as error:
        assert "runAsNonRoot" in str(error)


def test_a_container_is_running_only_once_its_mounts_are_in_place(tmp_path, monkeypatch):
    """No probe, no exec and no Ready before the container's mounts and read-only root.

    A kubelet shows a container as running only after its runtime set it up. The runner
    used to count a probe-less container Ready as soon as its launcher started, so an
    exec could land between two mount steps (CI once saw ``touch /models/x`` succeed on a
    volume that is read-only). The setup is slowed down here to widen that window.
    """
    script = PodRunner._script

    def slow(self: PodRunner, container: Any) -> Path:
        path = script(self, container)
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], "sleep 2", *lines[1:]]) + "\n")
        return path

    monkeypatch.setattr(PodRunner, "_script", slow)
    spec = pod({"command": ["sleep", "600"]})
    spec["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "data", "mountPath": "/data", "readOnly": True})
    spec["spec"]["volumes"].append({"name": "data", "emptyDir": {}})
    runner = PodRunner(spec, {}, tmp_path, name="slow")
    with runner:
        assert not runner.ready
        started = time.monotonic()
        assert runner.exec("main", ["touch", "/data/x"]).returncode != 0  # read-only
        assert time.monotonic() - started > 1  # it waited for the setup
        assert runner.exec("main", ["touch", "/etc/x"]).returncode != 0  # read-only root
        assert runner.exec("main", ["touch", "/tmp/x"]).returncode == 0
        runner.wait_ready(10)


def test_dollar_references_expand_as_the_kubelet_expands_them():
    variables = {"A": "alpha", "EMPTY": ""}
    assert expand("$(A)", variables) == "alpha"
    assert expand("x$(A)y$(A)", variables) == "xalphayalpha"
    assert expand("$$(A)", variables) == "$(A)"  # escaped: stays literal
    assert expand("$$$(A)", variables) == "$alpha"
    assert expand("$(NOPE)", variables) == "$(NOPE)"  # undefined: kept as written
    assert expand("[$(EMPTY)]", variables) == "[]"
    assert expand("$A $ $(A", variables) == "$A $ $(A"  # not references
    assert expand("end$", variables) == "end$"


def secret_pod(env: list[dict[str, Any]], **volume: Any) -> dict[str, Any]:
    """A sleeping container with ``env``, its argv carrying $(...) references, and a
    Secret volume mounted without readOnly (the kubelet makes it read-only anyway)."""
    spec = pod({"command": ["python3", "-c", "import time; time.sleep(600)"],
                "args": ["$(KEY)", "$$(KEY)", "$(UNSET)", "ip=$(POD_IP)"], "env": env})
    spec["spec"]["containers"][0]["volumeMounts"].append({"name": "keys",
                                                          "mountPath": "/etc/keys"})
    spec["spec"]["volumes"].append({"name": "keys", "secret": {"secretName": "keys",
                                                               **volume}})
    return spec


def process_environment(runner: PodRunner) -> dict[str, str]:
    pid = runner.container("main").process.pid
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if item)


def test_secrets_reach_env_args_and_a_volume_the_pod_user_reads_but_cannot_write(tmp_path):
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "k1"}}},
           {"name": "DERIVED", "value": "<$(KEY)>"},
           {"name": "ABSENT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "x",
                                                             "optional": True}}},
           *({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
             for name, path in (("POD_NAME", "metadata.name"), ("POD_NS", "metadata.namespace"),
                                ("POD_UID", "metadata.uid"), ("POD_IP", "status.podIP")))]
    runner = PodRunner(secret_pod(env, defaultMode=0o400), {}, tmp_path, name="keys",
                       namespace="ml", secrets={"keys": {"k1": "s3cret", "k2": b"two"}})
    with runner:
        runner.wait_ready(20)
        variables = process_environment(runner)
        assert variables["KEY"] == "s3cret" and variables["DERIVED"] == "<s3cret>"
        assert "ABSENT" not in variables
        assert (variables["POD_NAME"], variables["POD_NS"], variables["POD_IP"]) == (
            "keys", "ml", runner.ip)
        assert variables["POD_UID"] == runner.uid and len(runner.uid) == 36
        pid = runner.container("main").process.pid
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[3:-1]
        assert argv == [b"s3cret", b"$(KEY)", b"$(UNSET)", f"ip={runner.ip}".encode()]

        # defaultMode 0400 plus the fsGroup's read bit: uid 1000 reads through its group.
        assert runner.exec("main", ["cat", "/etc/keys/k1"]).stdout == "s3cret"
        assert runner.exec("main", ["stat", "-L", "-c", "%a %g", "/etc/keys/k2"]
                           ).stdout.split() == ["440", "1000"]
        assert os.readlink(runner.volumes["keys"] / "k1") == "..data/k1"
        assert runner.exec("main", ["touch", "/etc/keys/new"]).returncode != 0  # read-only
        runner.update_secret("keys", {"k1": "rotated"})
        assert runner.exec("main", ["cat", "/etc/keys/k1"]).stdout == "rotated"
        assert runner.exec("main", ["test", "-e", "/etc/keys/k2"]).returncode != 0
        assert process_environment(runner)["KEY"] == "s3cret"  # env: only at a restart


@pytest.mark.parametrize(("change", "message"), [
    ({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]},
     'CreateContainerConfigError: secret "gone" not found (main: env[0] K)'),
    ({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "x"}}}]},
     "CreateContainerConfigError: couldn't find key x in Secret default/keys"),
    ({"env": [{"name": "K", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]},
     "main: env[0] K: valueFrom.resourceFieldRef not supported by the pod runner"),
    ({"env": [{"name": "K", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]},
     "valueFrom.fieldRef.fieldPath 'spec.nodeName' not supported"),
    ({"envFrom": [{"secretRef": {"name": "keys"}}]}, "main: envFrom is not supported"),
    ({"volumeMounts": [{"name": "tmp", "mountPath": "/tmp", "mountPropagation": "None"}]},
     "main: volumeMounts field ['mountPropagation'] not supported"),
    ({"volume": {"name": "keys", "secret": {"secretName": "absent"}}},
     'FailedMount: volume keys: secret "absent" not found'),
    ({"volume": {"name": "keys", "secret": {"secretName": "keys",
                                            "items": [{"key": "nope", "path": "p"}]}}},
     "FailedMount: volume keys: secret \"keys\" has no key 'nope'"),
    ({"volume": {"name": "keys", "downwardAPI": {"items": []}}},
     "volume keys: ['downwardAPI'] not supported by the pod runner"),
    ({"volume": {"name": "keys", "emptyDir": {"medium": "HugePages"}}},
     "volume keys: emptyDir medium 'HugePages' not supported"),
])
def test_what_a_kubelet_refuses_or_the_runner_lacks_fails_the_pod_by_name(tmp_path, change,
                                                                          message):
    spec = pod({"command": ["sleep", "600"]})
    container = spec["spec"]["containers"][0]
    if "volume" in change:
        spec["spec"]["volumes"].append(change.pop("volume"))
    container.update(change)
    runner = PodRunner(spec, {}, tmp_path, name="refused", secrets={"keys": {"k": "v"}})
    with pytest.raises(PodFailed) as failed:
        runner.start()
    assert message in str(failed.value)
    assert runner.container("main").process is None  # never started


def test_other_pods_reach_the_pod_ip_and_port_forward_reaches_its_loopback(tmp_path):
    """Loopback stays the pod's own: another pod's namespace, routed through the host,
    reaches what listens on the pod IP and is refused what listens on 127.0.0.1 only;
    ``forward`` (kubectl port-forward) reaches that. The host's ip_forward is left as it
    was, and the pod's interface gets its setting back when the other pod goes."""
    serve = ("import http.server, threading\n"
             "def serve(address, port):\n"
             "    http.server.ThreadingHTTPServer((address, port),\n"
             "        http.server.SimpleHTTPRequestHandler).serve_forever()\n"
             "threading.Thread(target=serve, args=('127.0.0.1', 8000)).start()\n"
             "serve('0.0.0.0', 8002)\n")
    spec = pod({"command": [*PYTHON, serve], "workingDir": "/tmp",
                "readinessProbe": quick({"tcpSocket": {"port": 8002}})})
    ip_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    runner = PodRunner(spec, {}, tmp_path, name="loopback")
    with runner, OtherPod() as other:
        runner.wait_ready(20)
        pod_if = Path(f"/proc/sys/net/ipv4/conf/{runner._host_if}/forwarding")
        before = pod_if.read_text()
        with pytest.raises(OSError):  # no route yet: nothing but the host reaches a pod
            other.call(socket.create_connection, (runner.ip, 8002), 1)
        other.reach(runner)

        def status(url: str) -> int:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status

        assert other.call(status, f"http://{runner.ip}:8002/") == 200
        with pytest.raises(ConnectionRefusedError):
            other.call(socket.create_connection, (runner.ip, 8000), 5)
        assert status(f"{runner.forward(8000)}/") == 200
        other.close()
        assert pod_if.read_text() == before
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == ip_forward
