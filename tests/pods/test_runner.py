"""The pod runner itself: the kubelet's ConfigMap layout, probes, restarts and teardown.

The other tests here trust the runner to behave like a kubelet; these check that it does,
on small pods whose container is a shell or Python's http.server in place of Triton.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.support.podrunner import PodRunner, write_config_map
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
