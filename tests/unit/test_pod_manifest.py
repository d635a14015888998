"""The rendered pod, reviewed for what the pod runner cannot show (tests/pods shows the rest).

GPUs, rollouts, resource requests, name lengths, the images and their release: each is
checked on the rendered objects or the files that build the images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from tests.support.crd_schema import validation_errors
from tritonop import __version__
from tritonop.crd import custom_resource_definition
from tritonop.render.kubernetes import (
    PREPARE_BUDGET_SECONDS,
    config_map,
    model_names,
    prepare_job,
    render_children,
    resolve_job,
)
from tritonop.render.repository import render_repository
from tritonop.resources import ResourceError, max_name_length, parse_resource
from tritonop_backend import ReleaseMismatch, check_release
from tritonop_backend.cpus import available_cpus, cgroup_cpu_limit

ROOT = Path(__file__).resolve().parents[2]
API = "serving.tritonop.dev/v1alpha1"


def es(name: str = "news", **spec: Any):
    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": name},
                           "spec": {"corpus": {"source": "c.jsonl"}, **spec}})


def llm(name: str = "chat", **spec: Any):
    return parse_resource({"apiVersion": API, "kind": "LLMService", "metadata": {"name": name},
                           "spec": spec})


def deployment(resource) -> dict[str, Any]:
    return next(c for c in render_children(resource) if c["kind"] == "Deployment")


def pod(resource) -> dict[str, Any]:
    return deployment(resource)["spec"]["template"]["spec"]


def container(resource, name: str = "triton") -> dict[str, Any]:
    spec = pod(resource)
    return next(c for c in spec["containers"] + spec.get("initContainers", [])
                if c["name"] == name)


def env(resource, name: str = "triton") -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(resource, name)["env"]}


@pytest.mark.parametrize("resource", [es(), llm()], ids=["search", "llm"])
def test_triton_loads_exactly_the_rendered_models_never_the_kubelets_dot_folders(resource):
    args = container(resource)["args"]
    assert "--model-control-mode=explicit" in args
    loaded = [a.removeprefix("--load-model=") for a in args if a.startswith("--load-model=")]
    folders = {path.split("/", 1)[0] for path in render_repository([resource])}
    assert loaded == sorted(folders) == model_names(config_map(resource))
    assert not any(name.startswith(".") for name in loaded)


@pytest.mark.parametrize("name", ["triton", "prepare"])
def test_every_cache_points_at_the_writable_tmp_volume(name):
    variables = env(es(), name)
    mounts = {m["mountPath"]: m for m in container(es(), name)["volumeMounts"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly")
    assert container(es(), name)["securityContext"]["readOnlyRootFilesystem"]
    for key in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert variables[key].startswith("/tmp"), key
    assert variables["TRITONOP_ARTIFACTS"] == "/artifacts"


@pytest.mark.parametrize(("resource", "gpus"), [
    (es(), 0), (es(model={"device": "gpu"}), 1), (llm(), 0), (llm(gpus=2), 2)],
    ids=["search-cpu", "search-gpu", "llm-cpu", "llm-2-gpus"])
def test_gpus_are_requested_hidden_and_rolled_out_without_surge(resource, gpus):
    limits = container(resource)["resources"].get("limits", {})
    strategy = deployment(resource)["spec"]["strategy"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus
        assert "NVIDIA_VISIBLE_DEVICES" not in env(resource)
        # A one-GPU node must be enough: the old pod goes before the new one comes.
        assert strategy["rollingUpdate"]["maxSurge"] == 0
    else:
        assert "nvidia.com/gpu" not in limits
        assert env(resource)["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert env(resource, "prepare")["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert strategy["rollingUpdate"]["maxSurge"] != 0


@pytest.mark.parametrize("resource", [es(), llm(), llm(gpus=1),
                                      es(artifacts={"hostPath": {"path": "/a"},
                                                    "prepare": False})],
                         ids=["search", "llm", "llm-gpu", "no-prepare"])
def test_progress_deadline_outlasts_a_cold_start(resource):
    probe = container(resource)["startupProbe"]
    startup = probe["periodSeconds"] * probe["failureThreshold"]
    prepare = PREPARE_BUDGET_SECONDS if "initContainers" in pod(resource) else 0
    assert deployment(resource)["spec"]["progressDeadlineSeconds"] > prepare + startup


def test_default_requests_make_pods_burstable_and_are_overridable():
    for resource in (es(), llm()):
        requests = container(resource)["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests)
        assert {"cpu", "memory"} <= set(container(resource, "prepare")["resources"]["requests"])
    custom = container(es(resources={"requests": {"cpu": "3"}, "limits": {"memory": "8Gi"}}))
    assert custom["resources"]["requests"]["cpu"] == "3"
    assert custom["resources"]["requests"]["memory"] == "2Gi"  # the default stays
    assert custom["resources"]["limits"] == {"memory": "8Gi"}


@pytest.mark.parametrize(("kind", "make"), [("EmbeddingSearch", es), ("LLMService", llm)])
def test_names_too_long_for_their_children_are_rejected_by_the_crd(kind, make):
    longest = max_name_length(kind)
    fits = make("a" * longest)
    for child in render_children(fits):
        assert len(child["metadata"]["name"]) <= 63
        assert all(len(v) <= 63 for v in child["metadata"]["labels"].values())
    crd = custom_resource_definition(kind)
    body = {"apiVersion": API, "kind": kind, "metadata": {"name": "a" * longest},
            "spec": {"corpus": {"source": "c.jsonl"}} if kind == "EmbeddingSearch" else {}}
    assert validation_errors(crd, body) == []
    body["metadata"]["name"] += "a"
    assert any(f"at most {longest} characters" in e for e in validation_errors(crd, body))
    with pytest.raises(ResourceError, match=r"metadata\.name"):
        make("a" * (longest + 1))


@pytest.mark.parametrize(("kind", "make", "source"), [
    ("EmbeddingSearch", es, {"model": {"source": "hf://org/encoder"}}),
    ("LLMService", llm, {"model": {"source": "hf://org/model"}}),
])
def test_the_jobs_of_the_longest_names_fit_and_stay_apart(kind, make, source):
    """A Job's name is its pods' label (63 characters): the resolve Job of a 50-character
    LLMService was 65 and refused, which ended the resource Failed."""
    longest = max_name_length(kind)
    first, second = (make(prefix + "a" * (longest - 1), **source) for prefix in "xy")
    def names(resource) -> tuple[str, ...]:
        if kind == "LLMService":  # prepared in each pod: a resolve Job only
            return (resolve_job(resource)["metadata"]["name"],)
        return tuple(job["metadata"]["name"] for job in (
            resolve_job(resource), prepare_job(resource), prepare_job(resource, cleanup=True)))

    jobs = [names(first), names(second)]
    assert all(len(name) <= 63 for names in jobs for name in names), jobs
    assert not set(jobs[0]) & set(jobs[1])
    assert prepare_job(es(), cleanup=False)["metadata"]["name"].startswith("news-prepare-")


def test_default_requests_stay_within_the_limits_and_requests_above_them_are_refused():
    """The API server refuses a request above its limit: a default one comes down to the
    limit the user set, and one the user set above it is refused naming the field."""
    small = container(llm(resources={"limits": {"memory": "1Gi", "cpu": "500m"}}))
    assert small["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    large = container(llm(resources={"limits": {"memory": "64Gi"}}))
    assert large["resources"]["requests"]["memory"] == "4Gi"  # the default, below the limit
    with pytest.raises(ResourceError, match=r"requests\.cpu: 2 is more than limits\.cpu 1500m"):
        llm(resources={"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}})


def test_every_python_model_carries_the_release_that_rendered_it():
    for resource in (es(), llm()):
        for path, text in render_repository([resource]).items():
            if path.endswith("config.pbtxt") and b'backend: "python"' in text:
                assert re.search(rb'key: "tritonop_version"\s+value \{\s+string_value: "'
                                 + __version__.encode(), text), path


def test_a_release_mismatch_names_both_versions():
    check_release(__version__)
    with pytest.raises(ReleaseMismatch, match=f"tritonop 0.0.9 .* tritonop_backend {__version__}"):
        check_release("0.0.9")


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "50000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "max 100000\n"}, None),
    ({}, None),
], ids=["v2-1.5", "v2-0.5", "v1-3", "v1-unlimited", "v2-unlimited", "none"])
def test_threads_auto_follows_the_cgroup_quota(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cores = available_cpus(tmp_path / "nowhere")
    if expected is None:
        assert cgroup_cpu_limit(tmp_path) is None
        assert available_cpus(tmp_path) == cores
    else:
        assert available_cpus(tmp_path) == min(expected, cores)


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), re.MULTILINE))


def test_triton_image_installs_the_torch_the_python_backend_imports():
    dockerfile = ROOT / "deploy" / "Dockerfile.triton"
    args = dockerfile_args(dockerfile)
    assert Version(args["TORCH_VERSION"]) >= Version("2.6")  # transformers' floor for LLMs
    text = dockerfile.read_text()
    assert re.search(r'pip install "torch==\$\{TORCH_VERSION\}" --index-url', text)
    # A base with Python 3.12 (Ubuntu 24.04) and CUDA 12.6, matching the torch index.
    tag = args["TRITON_IMAGE"].rsplit(":", 1)[1]
    assert Version(tag.split("-")[0]) >= Version("24.12")
    assert args["TORCH_INDEX_URL"].endswith("/cu126")
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    assert args["TRITON_IMAGE"].split("/")[-1] in guide
