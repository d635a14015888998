"""A model from a private Hub repository in job mode, under the pod runner (issue 21).

The test Hub (tests/support/hub.py) runs as another pod of the cluster: it listens on an
:class:`OtherPod`'s address, which every pod here is routed to from its start, and it
records each request with the address of the pod that made it and whether it carried the
token. The repository holds a tiny random-weight encoder (tests/support/encoders.py) and
is private to one token, which lives only in a Secret that ``spec.model.credentials``
names.

The operator's order is followed with the rendered manifests: the resolve Job's pod says
which commit the branch means (its termination message), the resource is pinned to it as
the operator pins it (the annotation), the prepare Job's pod downloads and builds that
version onto the claim, and three replicas that never prepare serve it. Then the branch
moves (a new weight file): resolved again, a new version is prepared beside the old one
while an old replica keeps answering from the old version, whose folder stays untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.pods.conftest import record, resource, stop_all
from tests.support.hub import HubRepo, HubServer, _Handler
from tests.support.podrunner import OtherPod, PodRunner
from tests.support.triton import TINY_TEXTS
from tritonop.artifacts.progress import DownloadProgress, parse_progress
from tritonop.artifacts.versions import complete_versions, resource_fingerprint
from tritonop.render.kubernetes import prepare_job, render_children, resolve_job
from tritonop.resources import Resource
from tritonop_backend.artifacts import VERSION_FILE, VersionManifest

API = "serving.tritonop.dev/v1alpha1"
NAME = "hubsearch"
REPO = "acme/private-encoder"
TOKEN = "hf_pods_only"
SECRET = "hub-credentials"
CLAIM = f"{NAME}-artifacts"
QUERY = {"text": "storm over the mountains"}


class Seen(NamedTuple):
    """One request as the Hub saw it."""

    client: str
    method: str
    path: str
    token: bool
    """It carried ``Authorization: Bearer <the Secret's token>``."""


class _Recording(_Handler):
    server: PodHub

    def do_GET(self) -> None:  # HEAD comes here too (do_HEAD calls do_GET)
        auth = self.headers.get("Authorization")
        self.server.seen.append(Seen(self.client_address[0], self.command, self.path,
                                     auth == f"Bearer {TOKEN}"))
        super().do_GET()


class PodHub(HubServer):
    """The test Hub listening on another pod's address, every request recorded."""

    def __init__(self, root: Path, address: str) -> None:
        self.address = address
        self.seen: list[Seen] = []
        super().__init__(root)
        self.RequestHandlerClass = _Recording

    def server_bind(self) -> None:
        self.server_address = (self.address, 0)
        super().server_bind()

    def since(self, start: int) -> list[Seen]:
        return self.seen[start:]


def downloads(seen: list[Seen]) -> Counter[str]:
    """File paths GET through ``/resolve/``, with how often each was."""
    return Counter(s.path.split("/resolve/", 1)[1].split("/", 1)[1] for s in seen
                   if s.method == "GET" and "/resolve/" in s.path)


def searchspec(**spec: Any) -> Resource:
    body = {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": NAME},
            "spec": {"model": {"source": f"hf://{REPO}", "format": "onnx",
                               "credentials": {"secretName": SECRET}},
                     "corpus": {"source": "/artifacts/corpus/texts.jsonl"},
                     "search": {"defaultTopK": 3, "maxTopK": 20},
                     "artifacts": {"prepare": "job"}, **spec}}
    return resource(body)


@dataclass
class Cluster:
    """What this module's pods share: the Hub pod, the Secret, the claim."""

    hub: PodHub
    hub_pod: OtherPod
    repo: HubRepo
    first_commit: str
    claim: Path
    workdir: Path
    pods: list[PodRunner]

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        return {SECRET: {"HF_TOKEN": TOKEN, "HF_ENDPOINT": self.hub.endpoint}}

    def pod(self, manifest: dict[str, Any], name: str, **kwargs: Any) -> PodRunner:
        pod = PodRunner(manifest, kwargs.pop("config_maps", {}),
                        self.workdir / f"{name}-{len(self.pods)}",
                        claims={CLAIM: self.claim}, secrets=self.secrets, name=name,
                        peers=[self.hub_pod], **kwargs)
        self.pods.append(pod)
        return pod

    def run_job(self, job: dict[str, Any], name: str) -> PodRunner:
        """The Job's pod, its container run to completion (as test_artifacts_job does)."""
        spec = job["spec"]["template"]["spec"]
        pod = self.pod({"spec": {**spec, "initContainers": spec["containers"],
                                 "containers": []}}, name)
        try:
            pod.start()
        finally:
            pod.stop()
        return pod

    def resolve(self, spec: Resource) -> dict[str, str]:
        """The resolve Job's answer, read from its termination message."""
        start = len(self.hub.seen)
        pod = self.run_job(resolve_job(spec), f"{NAME}-resolve")
        seen = self.hub.since(start)
        # One metadata call, with the Secret's token, and no file downloaded.
        assert [(s.client, s.method, s.path.split("?")[0], s.token) for s in seen] == [
            (pod.ip, "GET", f"/api/models/{REPO}", True)], seen
        return json.loads(pod.termination_message("resolve"))

    def cached_files(self, revision: str) -> list[str]:
        """The files of the model folder a prepare placed in the claim's cache."""
        folder = self.claim / ".models" / "hf" / Path(*REPO.split("/")) / revision
        marker = json.loads((folder / ".tritonop-complete.json").read_text())
        return [file["path"] for file in marker["files"]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_encoders) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("download")
    claim = workdir / "claim"
    (claim / "corpus").mkdir(parents=True)
    (claim / "corpus" / "texts.jsonl").write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in TINY_TEXTS))
    for path in [claim, *claim.rglob("*")]:
        os.chown(path, 1000, 1000)
    pods: list[PodRunner] = []
    with OtherPod() as hub_pod:
        # Its socket opened in the other pod's namespace, on that pod's address.
        hub = hub_pod.call(PodHub, workdir / "hub", hub_pod.ip).start()
        try:
            repo = hub.create_repo(REPO, private_to=(TOKEN,))
            sha = repo.commit_folder(tiny_encoders["bert"], "tiny bert")
            yield Cluster(hub, hub_pod, repo, sha, claim, workdir, pods)
        finally:
            stop_all(pods)
            hub.stop()


@dataclass
class Served:
    """The first revision: resolved, prepared by the Job, served by three replicas."""

    revision: dict[str, str]
    spec: Resource
    job: PodRunner
    job_seen: list[Seen]
    replicas: list[PodRunner]
    replica_seen: list[Seen]
    answers: list[dict[str, Any]]


def search(pod: PodRunner) -> dict[str, Any]:
    # Triton listens on the pod's loopback: reached as kubectl port-forward reaches it.
    request = urllib.request.Request(f"{pod.forward(8000)}/v2/models/{NAME}/generate",
                                     data=json.dumps(QUERY).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(cluster: Cluster) -> Served:
    hub = cluster.hub
    revision = cluster.resolve(searchspec(replicas=3))
    pinned = dataclasses.replace(searchspec(replicas=3), model_revision=revision["revision"])
    start = len(hub.seen)
    job = cluster.run_job(prepare_job(pinned), f"{NAME}-prepare")
    job_seen = hub.since(start)
    children = render_children(pinned)
    deployment = next(c for c in children if c["kind"] == "Deployment")
    config_maps = {c["metadata"]["name"]: c["data"] for c in children if c["kind"] == "ConfigMap"}
    start = len(hub.seen)
    replicas = [cluster.pod(deployment, f"{NAME}-{i}", config_maps=config_maps).start()
                for i in range(3)]
    seconds = []
    for pod in replicas:
        assert "initContainers" not in pod.pod
        seconds.append(pod.wait_ready())
    record("hub model in job mode, 3 replicas at once (prepared by the Job)", max(seconds))
    answers = [search(pod) for pod in replicas]
    return Served(revision, pinned, job, job_seen, replicas, hub.since(start), answers)


def test_the_resolve_job_names_the_commit_of_the_branch(cluster: Cluster, served: Served):
    """Its termination message, as the operator reads it from the pod's status; the version
    the Job prepared is the one the pinned render names."""
    assert served.revision == {"name": NAME, "source": f"hf://{REPO}",
                               "revision": cluster.first_commit}
    assert resource_fingerprint(served.spec) in complete_versions(cluster.claim / NAME)


def test_three_replicas_serve_the_version_the_job_prepared_alike(served: Served):
    first, *others = served.answers
    assert len(first["ids"]) == 3
    assert all(answer == first for answer in others), served.answers


def test_each_file_is_downloaded_once_by_the_job_with_the_token(cluster: Cluster,
                                                                served: Served):
    """Every file of the model folder the Job placed came through one GET, made by the Job's
    pod with the Secret's token; a request without it is refused by the private repository,
    and the replicas made no request at all."""
    files = cluster.cached_files(cluster.first_commit)
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert downloads(cluster.hub.seen) == Counter(files)  # all requests so far, any pod
    gets = [s for s in served.job_seen if s.method == "GET" and "/resolve/" in s.path]
    assert {s.client for s in gets} == {served.job.ip}
    assert all(s.token for s in served.job_seen), served.job_seen
    assert served.replica_seen == []
    assert not {s.client for s in cluster.hub.seen} & {p.ip for p in served.replicas}
    anonymous = f"{cluster.hub.endpoint}/{REPO}/resolve/{cluster.first_commit}/config.json"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=10)
    assert refused.value.code == 401


def test_the_prepare_job_prints_its_download_progress(cluster: Cluster, served: Served):
    """With no terminal, the Job's pod prints ``progress: ...`` lines on stdout, which the
    operator reads from its log for ArtifactsReady: the first at once, the last when every
    byte of the model folder is there; none shows the token."""
    log = served.job.logs("prepare")
    said = [progress for line in log.splitlines() if (progress := parse_progress(line))]
    folder = cluster.claim / ".models" / "hf" / Path(*REPO.split("/")) / cluster.first_commit
    total = sum((folder / name).stat().st_size for name in cluster.cached_files(
        cluster.first_commit))
    assert said and said[0].done < total, log
    assert said[-1] == DownloadProgress(NAME, f"hf://{REPO}", total, total)
    assert TOKEN not in log


def _secret_names(container: dict[str, Any]) -> set[str]:
    return {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_only_the_downloading_steps_get_the_credentials(cluster: Cluster, served: Served):
    """The Job's container reads the Secret; Triton's and the gateway's name it nowhere, and
    no process of a replica holds the token in its environment."""
    job = served.job.container("prepare").spec
    assert {e["name"] for e in job["env"] if "valueFrom" in e} >= {"HF_TOKEN", "HF_ENDPOINT"}
    assert _secret_names(job) == {SECRET}
    pod = served.replicas[0]
    assert {c.name for c in pod.containers} == {"triton", "gateway"}
    for container in pod.containers:
        assert _secret_names(container.spec) == set(), container.name
    assert not [v for v in pod.pod["volumes"] if v.get("secret", {}).get("secretName") == SECRET]
    for replica in served.replicas:
        pids = subprocess.run(["ip", "netns", "pids", replica.netns], capture_output=True,
                              text=True, check=True).stdout.split()
        assert len(pids) >= 2  # triton (and its Python stubs) and the gateway
        for pid in pids:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [v for v in environ if v.startswith(b"HF_TOKEN=") or TOKEN.encode() in v]


def tree(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder`` with its size, modification time and inode."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_upstream_revision_is_prepared_beside_the_old_while_it_serves(
        cluster: Cluster, served: Served):
    """New weights on the branch: resolved again, a new revision and fingerprint; the Job
    builds the new version beside the old one while an old replica keeps answering as
    before, and leaves every file of the old version as it was."""
    from safetensors.numpy import load, save

    old_version = cluster.claim / NAME / resource_fingerprint(served.spec)
    before = tree(old_version)
    weights = load(_lfs_content(cluster.repo, "model.safetensors"))
    weights["embeddings.word_embeddings.weight"] = \
        weights["embeddings.word_embeddings.weight"][::-1].copy()  # the tokens' rows swapped
    moved = cluster.repo.commit({"model.safetensors": save(weights)}, "new weights")

    revision = cluster.resolve(searchspec(replicas=3))
    assert revision == {"name": NAME, "source": f"hf://{REPO}", "revision": moved}
    pinned = dataclasses.replace(searchspec(replicas=3), model_revision=moved)
    assert resource_fingerprint(pinned) != old_version.name

    old_pod, expected = served.replicas[0], served.answers[0]
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def keep_searching() -> None:
        while not done.wait(0.2):
            try:
                answers.append(search(old_pod))
            except Exception as error:  # reported below
                errors.append(error)

    searcher = threading.Thread(target=keep_searching, daemon=True)
    start = len(cluster.hub.seen)
    searcher.start()
    try:
        job = cluster.run_job(prepare_job(pinned), f"{NAME}-prepare-moved")
    finally:
        done.set()
        searcher.join(timeout=120)
    assert not errors, errors
    assert answers and all(answer == expected for answer in answers), len(answers)
    assert search(old_pod) == expected  # after the new version is complete, too

    versions = complete_versions(cluster.claim / NAME)
    assert set(versions) == {old_version.name, resource_fingerprint(pinned)}
    new_version = cluster.claim / NAME / resource_fingerprint(pinned)
    assert VersionManifest.read(new_version).inputs["model.revision"] == moved
    assert VersionManifest.read(old_version).inputs["model.revision"] == cluster.first_commit
    assert (new_version / VERSION_FILE).is_file()
    assert tree(old_version) == before
    index = "index/embeddings.safetensors"  # the new weights embedded the corpus anew
    assert (new_version / index).read_bytes() != (old_version / index).read_bytes()
    # The new revision's folder came whole, each file once, from the new Job's pod only.
    files = cluster.cached_files(moved)
    seen = cluster.hub.since(start)
    assert downloads(seen) == Counter(files) and "model.safetensors" in files
    assert {s.client for s in seen} == {job.ip} and all(s.token for s in seen)


def _lfs_content(repo: HubRepo, path: str) -> bytes:
    """The bytes a file of the branch's head holds (through its LFS pointer)."""
    head = repo.resolve("main")
    assert head is not None
    return repo.content(repo.entries(head)[path])
