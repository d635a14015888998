"""Job mode under the pod runner: the prepare Job's pod builds, Triton pods only read.

The runner has no run-to-completion mode of its own; the Job's pod runs its container
the way an init container runs, to completion (``restartPolicy: Never`` asks the same of
one try), with the Job's own volumes, environment, uid and read-only root.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pods.conftest import record, resource
from tests.support.podrunner import PodFailed, PodRunner
from tritonop.artifacts.versions import complete_versions, resource_fingerprint
from tritonop.render.kubernetes import prepare_job
from tritonop_backend.artifacts import VERSION_FILE, VersionManifest

ROOT = Path(__file__).resolve().parents[2]
API = "serving.tritonop.dev/v1alpha1"
OLD = "0" * 16


def jobs(**spec: Any) -> Any:
    body = {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "jobs"},
            "spec": {"model": {"format": "onnx"},
                     "corpus": {"source": "/artifacts/corpus/texts.jsonl"},
                     "search": {"defaultTopK": 3, "maxTopK": 20},
                     "artifacts": {"prepare": "job"}, **spec}}
    return resource(body)


@pytest.fixture(scope="module")
def claim(tmp_path_factory, exported) -> Path:
    """The operator's claim: a 200-text corpus, and an older version whose encoder export
    the Job reuses (a corpus or pooling change keeps the model)."""
    folder = tmp_path_factory.mktemp("job-claim") / "volume"
    (folder / "corpus").mkdir(parents=True)
    with open(ROOT / "examples" / "corpus" / "debian-packages.jsonl") as demo:
        (folder / "corpus" / "texts.jsonl").write_text("".join(itertools.islice(demo, 200)))
    old = folder / "jobs" / OLD
    shutil.copytree(exported["onnx"], old / "model")
    VersionManifest(OLD, {}, "").write(old)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, 1000, 1000)
    return folder


def run_job(job: dict[str, Any], claims: dict[str, Path], workdir: Path) -> PodRunner:
    spec = job["spec"]["template"]["spec"]
    init = [*spec.get("initContainers", []), *spec["containers"]]
    pod = PodRunner({"spec": {**spec, "initContainers": init, "containers": []}},
                    {}, workdir, claims=claims, name="jobs-prepare")
    try:
        pod.start()
    finally:
        pod.stop()
    return pod


def search(pod: PodRunner) -> dict[str, Any]:
    # Triton listens on the pod's loopback: reached as kubectl port-forward reaches it.
    request = urllib.request.Request(f"{pod.forward(8000)}/v2/models/jobs/generate",
                                     data=json.dumps({"text": "storm warning"}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_job_prepares_once_and_replicas_start_without_preparing(run_pod, claim,
                                                                     tmp_path):
    spec = jobs(replicas=3)
    claims = {"jobs-artifacts": claim}
    job = run_job(prepare_job(spec), claims, tmp_path / "job")
    log = job.logs("prepare")
    fingerprint = resource_fingerprint(spec)
    assert f"artifacts version {fingerprint} complete" in log, log
    assert "onnx encoder reused" in log, log
    assert VersionManifest.read(claim / "jobs" / fingerprint).fingerprint == fingerprint
    pods = [run_pod(spec, name=f"jobs-{i}", claims=claims) for i in range(2)]
    for pod in pods:
        assert "initContainers" not in pod.pod
        record("search replica, prepared by the Job (200 texts)", pod.wait_ready())
    answers = [search(pod) for pod in pods]
    assert answers[0]["ids"] == answers[1]["ids"] and len(answers[0]["ids"]) == 3
    assert pods[0].exec("triton", ["touch", f"/artifacts/jobs/{fingerprint}/x"]).returncode != 0


def test_the_job_prepares_on_a_host_path_that_root_made(tmp_path):
    """A node folder as a user leaves it: made as root (0755) with the corpus copied in,
    never given to uid 1000 (the test does not chown). The Job's artifacts-owner container
    hands the folder to the pods' user, and the prepare container builds there."""
    folder = tmp_path / "node" / "jobs-artifacts"
    (folder / "corpus").mkdir(parents=True, mode=0o755)
    folder.chmod(0o755)
    with open(ROOT / "examples" / "corpus" / "debian-packages.jsonl") as demo:
        (folder / "corpus" / "texts.jsonl").write_text("".join(itertools.islice(demo, 200)))
    assert (folder.stat().st_uid, folder.stat().st_mode & 0o777) == (0, 0o755)
    spec = jobs(artifacts={"hostPath": {"path": str(folder)}, "prepare": "job"})
    job = run_job(prepare_job(spec), {}, tmp_path / "job")
    fingerprint = resource_fingerprint(spec)
    assert job.container("artifacts-owner").exit_codes == [0]
    assert f"artifacts version {fingerprint} complete" in job.logs("prepare")
    assert VersionManifest.read(folder / "jobs" / fingerprint).fingerprint == fingerprint
    assert folder.stat().st_uid == 1000 and (folder / "corpus").stat().st_uid == 0


def test_a_folder_root_left_in_the_host_path_is_named_in_one_line(tmp_path):
    """The resource's folder made by root inside the hostPath (a `tritonop prepare` run as
    root on the node): artifacts-owner gives the pods the top folder only, and prepare
    fails with one line naming the folder, its owner and mode, not a traceback."""
    folder = tmp_path / "node" / "jobs-artifacts"
    (folder / "corpus").mkdir(parents=True, mode=0o755)
    (folder / "jobs").mkdir(mode=0o755)
    with open(ROOT / "examples" / "corpus" / "debian-packages.jsonl") as demo:
        (folder / "corpus" / "texts.jsonl").write_text("".join(itertools.islice(demo, 20)))
    spec = jobs(artifacts={"hostPath": {"path": str(folder)}, "prepare": "job"})
    with pytest.raises(PodFailed) as failed:
        run_job(prepare_job(spec), {}, tmp_path / "job")
    assert ("error: /artifacts/jobs (in the artifacts folder /artifacts) is not writable by "
            "uid 1000 (owned by uid 0, mode 0o755)") in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_the_cleanup_job_keeps_only_the_version_in_use(claim, tmp_path):
    spec = jobs()
    fingerprint = resource_fingerprint(spec)
    if not (claim / "jobs" / fingerprint / VERSION_FILE).exists():
        run_job(prepare_job(spec), {"jobs-artifacts": claim}, tmp_path / "job")
    assert OLD in complete_versions(claim / "jobs")
    cleanup = run_job(prepare_job(spec, cleanup=True), {"jobs-artifacts": claim},
                      tmp_path / "cleanup")
    assert "already complete" in cleanup.logs("cleanup")
    assert complete_versions(claim / "jobs") == [fingerprint]


def test_a_pod_without_its_version_fails_its_start_naming_both(run_pod, claim, tmp_path):
    """A spec whose fingerprint has no complete version on the volume never serves."""
    current = jobs()
    if not (claim / "jobs" / resource_fingerprint(current) / VERSION_FILE).exists():
        run_job(prepare_job(current), {"jobs-artifacts": claim}, tmp_path / "job")
    other = jobs(model={"format": "onnx", "pooling": "cls"})
    pod = run_pod(other, name="jobs-missing", claims={"jobs-artifacts": claim})
    with pytest.raises(PodFailed):
        pod.wait_ready(300)
    message = pod.logs("triton")
    assert f"artifacts version {resource_fingerprint(other)} is missing" in message
    assert resource_fingerprint(current) in message
