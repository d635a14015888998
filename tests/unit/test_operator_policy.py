"""What a tenant's resource may make the operator do: corpus paths, host paths, images."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tritonop.artifacts.versions import read_corpus_sha256
from tritonop.controller.policy import (
    DEFAULT_POLICY,
    OperatorPolicy,
    PolicyError,
)
from tritonop.controller.reconcile import InvalidResource, parse, reconcile
from tritonop.render.kubernetes import Images
from tritonop.resources import CORPUS_SHA256_ANNOTATION, ResourceError, parse_resource

API = "serving.tritonop.dev/v1alpha1"
IMAGES = Images(triton="registry.example/triton:1", operator="registry.example/operator:1")


def body(source: str = "corpus/texts.jsonl", annotations: dict | None = None,
         kind: str = "EmbeddingSearch", **spec: Any) -> dict[str, Any]:
    if kind == "EmbeddingSearch":
        spec = {"corpus": {"source": source}, **spec}
    return {"apiVersion": API, "kind": kind,
            "metadata": {"name": "news", "namespace": "ml", "uid": "u1", "generation": 1,
                         "annotations": annotations or {}},
            "spec": spec, "status": {}}


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The operator image's examples folder, as TRITONOP_EXAMPLES_DIR names it."""
    folder = tmp_path / "examples"
    (folder / "corpus").mkdir(parents=True)
    (folder / "corpus" / "texts.jsonl").write_text('{"text": "storm"}\n')
    (tmp_path / "secret.txt").write_text("the operator's own file\n")
    monkeypatch.setenv("TRITONOP_EXAMPLES_DIR", str(folder))
    return folder


def finishes(call: Callable[[], Any], seconds: float = 5) -> Any:
    """``call()``'s result or exception, or a failure if it is still running after ``seconds``.

    Hashing /dev/zero never ends: run where a hang fails the test instead of the run.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as err:  # handed back to the test
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def failed_message(result: Any) -> str:
    assert isinstance(result, InvalidResource), result
    assert result.status.phase == "Failed"
    return result.status.message


# Corpus paths, as the operator reads them -------------------------------------------------


def test_a_corpus_inside_the_folder_is_hashed_and_a_tenants_hash_is_not_trusted(examples):
    resource = parse(body(annotations={CORPUS_SHA256_ANNOTATION: "0" * 64}))
    content = (examples / "corpus" / "texts.jsonl").read_bytes()
    assert resource.corpus_sha256 == hashlib.sha256(content).hexdigest()


def test_a_symlink_to_a_device_fails_at_once_naming_the_field(examples):
    (examples / "corpus" / "zero.jsonl").symlink_to("/dev/zero")
    message = failed_message(finishes(lambda: parse(body("corpus/zero.jsonl"))))
    assert message.startswith("spec.corpus.source: 'corpus/zero.jsonl' leads outside the folder")


def test_a_symlink_to_a_file_outside_the_folder_is_not_read(examples):
    (examples / "corpus" / "mine.jsonl").symlink_to(examples.parent / "secret.txt")
    message = failed_message(finishes(lambda: parse(body("corpus/mine.jsonl"))))
    assert "spec.corpus.source: 'corpus/mine.jsonl' leads outside the folder" in message


def test_a_symlink_within_the_folder_is_followed(examples):
    (examples / "alias.jsonl").symlink_to(examples / "corpus" / "texts.jsonl")
    assert parse(body("alias.jsonl")).corpus_sha256 == parse(body()).corpus_sha256


def test_a_fifo_in_the_folder_is_never_opened(examples):
    os.mkfifo(examples / "corpus" / "pipe.jsonl")  # opened for reading, it waits for a writer
    message = failed_message(finishes(lambda: parse(body("corpus/pipe.jsonl"))))
    assert message.endswith("corpus/pipe.jsonl is not a regular file; name a corpus file")
    assert message.startswith("spec.corpus.source: ")


def test_a_folder_is_no_corpus(examples):
    message = failed_message(finishes(lambda: parse(body("corpus"))))
    assert message.startswith("spec.corpus.source: ") and " is a folder;" in message


def test_a_corpus_beyond_the_operators_size_cap_is_refused(examples):
    (examples / "big.jsonl").write_bytes(b"x" * 101)
    assert parse(body("big.jsonl"), OperatorPolicy(max_corpus_bytes=101)).corpus_sha256
    message = failed_message(finishes(
        lambda: parse(body("big.jsonl"), OperatorPolicy(max_corpus_bytes=100))))
    assert "spec.corpus.source: " in message
    assert "is larger than 100 bytes, the most this operator hashes (TRITONOP_MAX_CORPUS_BYTES)" \
        in message


def test_parent_segments_are_refused_before_any_file_is_touched(examples):
    message = failed_message(finishes(lambda: parse(body("../" * 16 + "dev/zero"))))
    assert message.endswith("spec.corpus.source: must not contain '..' path segments: a "
                            "relative path names a file inside the folder it resolves against")


def test_locally_a_symlink_anywhere_is_the_users_own_but_a_device_is_still_refused(tmp_path):
    """`tritonop serve` and `prepare`: no confinement, no cap; never a non-regular file."""
    (tmp_path / "data.jsonl").write_text('{"text": "storm"}\n')
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "corpus.jsonl").symlink_to(tmp_path / "data.jsonl")
    (folder / "zero.jsonl").symlink_to("/dev/zero")
    local = parse_resource(body("corpus.jsonl"), folder)
    assert read_corpus_sha256(local) == hashlib.sha256(b'{"text": "storm"}\n').hexdigest()
    zero = parse_resource(body("zero.jsonl"), folder)
    error = finishes(lambda: read_corpus_sha256(zero))
    assert isinstance(error, ResourceError)
    assert str(error) == "spec.corpus.source: /dev/zero is not a regular file; name a corpus file"


# Host paths and images -------------------------------------------------------------------


def test_the_defaults_allow_no_host_path_and_only_the_operators_images():
    policy = OperatorPolicy.from_environment({}, IMAGES)
    assert policy == OperatorPolicy(False, (IMAGES.triton, IMAGES.operator), 1 << 30)
    assert OperatorPolicy.from_environment({}, Images()) == DEFAULT_POLICY


@pytest.mark.parametrize(("image", "allowed"), [
    ("registry.example/triton:1", True),  # the operator's own
    ("registry.example/triton:2", False),
    ("mirror.example/team/triton:24.08", True),  # under a prefix ending in '/'
    ("mirror.example/team-b/triton:1", False),
    ("nvcr.io/nvidia/tritonserver:24.08-py3", True),  # under a prefix ending in ':'
    ("nvcr.io/nvidia/tritonserver-evil:1", False),
    ("docker.io/library/python:3.12", True),  # an exact name
    ("docker.io/library/python:3.12-slim", False),
])
def test_allowed_images_are_exact_names_or_prefixes_ending_in_a_separator(image, allowed):
    policy = OperatorPolicy.from_environment({"TRITONOP_ALLOWED_IMAGES": (
        " mirror.example/team/, nvcr.io/nvidia/tritonserver:,docker.io/library/python:3.12,")},
        IMAGES)
    assert policy.allows_image(image) is allowed


@pytest.mark.parametrize(("variable", "value"), [
    ("TRITONOP_ALLOW_HOST_PATH", "yes"), ("TRITONOP_MAX_CORPUS_BYTES", "1Gi"),
    ("TRITONOP_MAX_CORPUS_BYTES", "0")])
def test_a_setting_the_operator_does_not_understand_stops_its_start(variable, value):
    with pytest.raises(PolicyError, match=f"^{variable} must be"):
        OperatorPolicy.from_environment({variable: value}, IMAGES)


class NoCluster:
    """A Kube that fails any call: a refused resource must be decided before any."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the reconcile called Kube.{name} for a refused resource")


REFUSED = {
    "hostPath": (body(artifacts={"hostPath": {"path": "/"}}),
                 "spec.artifacts.hostPath: this operator does not allow host paths (a pod that "
                 "mounts the node's filesystem); its administrator can, with "
                 "TRITONOP_ALLOW_HOST_PATH=true"),
    "image": (body(kind="LLMService", image="attacker.example/miner:1"),
              "spec.image: 'attacker.example/miner:1' is not an image this operator runs; its "
              "administrator can allow it in TRITONOP_ALLOWED_IMAGES"),
    "prepareImage": (body(artifacts={"prepareImage": "registry.example/operator:2"}),
                     "spec.artifacts.prepareImage: 'registry.example/operator:2' is not an "
                     "image this operator runs"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_policy_forbids_fails_not_allowed_before_any_api_call(case):
    resource, says = REFUSED[case]
    with pytest.raises(InvalidResource) as caught:
        reconcile(NoCluster(), resource, IMAGES,  # type: ignore[arg-type]
                  policy=OperatorPolicy.from_environment({}, IMAGES))
    status = caught.value.status
    assert status.phase == "Failed" and says in status.message
    rendered = next(c for c in status.conditions if c.type == "ConfigRendered")
    assert (rendered.status, rendered.reason, rendered.message) == (
        "False", "NotAllowed", status.message)


def test_the_operators_settings_allow_them():
    policy = OperatorPolicy.from_environment({
        "TRITONOP_ALLOW_HOST_PATH": "true",
        "TRITONOP_ALLOWED_IMAGES": "attacker.example/,registry.example/operator:"}, IMAGES)
    for resource, _ in REFUSED.values():
        assert policy.refusals(parse_resource(resource)) == []
