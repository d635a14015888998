"""Artifacts on a shared volume (a PersistentVolumeClaim or a hostPath), and updates.

The volume is prepared once per session (the first pod's init container does it) and
reused by the later tests, as replicas and restarts reuse a claim in a cluster. The corpus
lives on the volume too: a cluster has no other place a user's corpus could come from.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pods.conftest import record, resource
from tests.support.podrunner import PodFailed, PodRunner
from tritonop import __version__
from tritonop.render.kubernetes import config_hash, config_map

ROOT = Path(__file__).resolve().parents[2]
API = "serving.tritonop.dev/v1alpha1"
QUERY = {"text": "europe climate change storm"}


@pytest.fixture(scope="session")
def shared_volume(tmp_path_factory) -> Path:
    """A volume holding a 400-text corpus, writable by the pods' uid (as a kind node's)."""
    folder = tmp_path_factory.mktemp("shared") / "volume"
    (folder / "corpus").mkdir(parents=True)
    with open(ROOT / "examples" / "corpus" / "debian-packages.jsonl") as demo:
        lines = list(itertools.islice(demo, 400))
    (folder / "corpus" / "texts.jsonl").write_text("".join(lines))
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, 1000, 1000)
    return folder


@pytest.fixture
def prepared_volume(shared_volume) -> Path:
    """The shared volume with docs' artifacts (already there after the claim test)."""
    from tritonop.artifacts.prepare import prepare

    # The pods' /artifacts/corpus/texts.jsonl, found under the volume's folder here.
    prepare([docs({})], shared_volume, progress=False)
    for path in [shared_volume, *shared_volume.rglob("*")]:
        os.chown(path, 1000, 1000, follow_symlinks=False)
    return shared_volume


def docs(volume: dict[str, Any], **spec: Any) -> Any:
    body = {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "docs"},
            "spec": {"model": {"format": "onnx"},
                     "corpus": {"source": "/artifacts/corpus/texts.jsonl"},
                     "search": {"defaultTopK": 3, "maxTopK": 20},
                     **({"artifacts": volume} if volume else {}), **spec}}
    return resource(body)


def claim() -> dict[str, Any]:
    return {"persistentVolumeClaim": {"claimName": "models"}}


def host_path(folder: Path, prepare: bool = True) -> dict[str, Any]:
    return {"hostPath": {"path": str(folder)}, "prepare": prepare}


def search(pod: PodRunner, body: dict[str, Any] = QUERY) -> dict[str, Any]:
    # Triton listens on the pod's loopback: reached as kubectl port-forward reaches it.
    request = urllib.request.Request(f"{pod.forward(8000)}/v2/models/docs/generate",
                                     data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_two_pods_preparing_one_claim_at_once_share_one_good_copy(run_pod, shared_volume):
    """Two replicas start together on an empty claim: one builds, the other waits, both
    serve the same index; no staging folder is left behind."""
    spec = docs(claim())
    pods: list[PodRunner] = []
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            pods.append(run_pod(spec, name=name, claims={"models": shared_volume}))
        except BaseException as error:  # reported below, with the pod's log
            errors.append(error)

    threads = [threading.Thread(target=start, args=(f"docs-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    seconds = [pod.wait_ready() for pod in pods]
    record("docs on a claim, 2 pods at once, cold (400 texts)", max(seconds))
    logs = [pod.log_tail("prepare") for pod in pods]
    assert sum("already complete" in log for log in logs) == 1, logs
    assert sum("encoder exported" in log for log in logs) == 1, logs
    answers = [search(pod) for pod in pods]
    assert answers[0]["ids"] == answers[1]["ids"] and len(answers[0]["ids"]) == 3
    assert not list(shared_volume.glob("docs/.*staging*"))


def test_pod_on_a_prepared_host_path_starts_without_preparing(run_pod, prepared_volume):
    """prepare: false on a hostPath that already holds the artifacts (the kind set-up)."""
    pod = run_pod(docs(host_path(prepared_volume, prepare=False)), name="docs-host")
    assert "initContainers" not in pod.pod
    record("docs on a hostPath, warm, no init container", pod.wait_ready())
    assert len(search(pod)["ids"]) == 3


def test_config_map_update_is_not_picked_up_by_a_running_pod(run_pod, prepared_volume):
    """The kubelet swaps ``..data`` to a new timestamped folder; Triton, in explicit model
    control, never polls the repository, so the running pod keeps serving what it
    loaded. The new ConfigMap carries another config hash, and the Deployment's pod
    template annotation with it: the rollout's new pod serves the change."""
    before = docs(host_path(prepared_volume))
    after = docs(host_path(prepared_volume), search={"defaultTopK": 7, "maxTopK": 20})
    pod = run_pod(before, name="docs-update")
    pod.wait_ready()
    assert len(search(pod)["ids"]) == 3
    old, new = config_map(before), config_map(after)
    assert config_hash(old) != config_hash(new)
    folder = pod.volumes["model-repository"]
    data_before = os.readlink(folder / "..data")
    pod.update_config_map(old["metadata"]["name"], new["data"])
    assert os.readlink(folder / "..data") != data_before
    seen = pod.exec("triton", ["cat", "/models/docs_search/config.pbtxt"]).stdout
    assert '"7"' in seen.split("default_top_k", 1)[1][:80]  # the pod sees the new file
    time.sleep(3)  # Triton's default poll would have seen it by now; explicit mode never polls
    assert len(search(pod)["ids"]) == 3 and pod.ready  # and still serves the old one
    pod.stop(drain=False)
    rolled = run_pod(after, name="docs-rolled")
    rolled.wait_ready()
    assert len(search(rolled)["ids"]) == 7


def test_adapters_from_another_release_fail_at_load_naming_both(run_pod, prepared_volume):
    """An operator of another release renders model.py adapters that the image's
    tritonop_backend refuses, with both versions in the error."""

    def other_release(_: dict[str, Any], config_maps: dict[str, dict[str, str]]) -> None:
        for data in config_maps.values():
            for key, text in data.items():
                if key.endswith("config.pbtxt"):
                    data[key] = text.replace(f'"{__version__}"', '"9.9.9"')

    pod = run_pod(docs(host_path(prepared_volume, prepare=False)), name="docs-skew",
                  patch=other_release)
    with pytest.raises(PodFailed):
        pod.wait_ready(300)
    message = pod.logs("triton")
    assert "rendered by tritonop 9.9.9" in message
    assert f"tritonop_backend {__version__}" in message
