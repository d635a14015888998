"""The Helm chart deploy/helm/tritonop is what deploy/helm/generate.py makes of deploy/, and
`make images` builds and pushes the images the install names.

tests/cluster/test_helm.py renders the chart with helm, compares it with `kubectl kustomize`
and installs it; this file needs neither binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "deploy" / "helm" / "generate.py"
CHART = ROOT / "deploy" / "helm" / "tritonop"


def generate(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(root / "deploy" / "helm" / "generate.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False)


def copy_of_the_sources(tmp_path: Path) -> Path:
    """deploy/, crds/ and pyproject.toml in ``tmp_path``: what the generator reads."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copytree(ROOT / "crds", tmp_path / "crds")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_helm_chart_is_what_the_generator_makes():
    result = generate(ROOT, "--check")
    assert result.returncode == 0, result.stderr + "(run `make helm` and commit the chart)"
    assert sorted(p.relative_to(CHART).as_posix() for p in CHART.rglob("*") if p.is_file()) == [
        "Chart.yaml", "templates/cluster.yaml", "templates/namespaced.yaml",
        "values.schema.json", "values.yaml"]


def test_helm_chart_goes_stale_when_a_manifest_changes_and_regenerates(tmp_path):
    root = copy_of_the_sources(tmp_path)
    rbac = root / "deploy" / "rbac.yaml"
    docs = list(yaml.safe_load_all(rbac.read_text()))
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    role["metadata"]["labels"]["example.test/changed"] = "by-the-test"
    rbac.write_text(yaml.safe_dump_all(docs))

    stale = generate(root, "--check")
    assert stale.returncode == 1
    assert "out of date" in stale.stderr and "templates/cluster.yaml" in stale.stderr
    assert "templates/namespaced.yaml" not in stale.stderr

    assert generate(root).returncode == 0
    assert generate(root, "--check").returncode == 0
    template = (root / "deploy" / "helm" / "tritonop" / "templates" / "cluster.yaml").read_text()
    assert "example.test/changed: by-the-test" in template


def test_helm_chart_values_default_to_the_deployment_of_deploy():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    (deployment,) = [d for d in yaml.safe_load_all(
        (ROOT / "deploy" / "base" / "operator.yaml").read_text()) if d["kind"] == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    image = f"{values['image']['repository']}:{values['image']['tag']}"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert image == container["image"] == env["TRITONOP_OPERATOR_IMAGE"]
    assert (f"{values['tritonImage']['repository']}:{values['tritonImage']['tag']}"
            == env["TRITONOP_TRITON_IMAGE"])
    assert values["namespace"] == deployment["metadata"]["namespace"]
    assert values["replicas"] == deployment["spec"]["replicas"]
    assert values["resources"] == container["resources"]
    assert values["installMode"] == "cluster"


def test_helm_generator_names_a_kustomize_field_it_does_not_understand(tmp_path):
    root = copy_of_the_sources(tmp_path)
    kustomization = root / "deploy" / "namespaced" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "commonLabels: {team: a}\n")
    result = generate(root)
    assert result.returncode == 2
    assert "deploy/namespaced/kustomization.yaml: commonLabels is not supported" in result.stderr


def make_images(*args: str) -> list[str]:
    # Under `make test` the environment carries the outer make's MAKEFLAGS and MAKELEVEL,
    # which would make this one print "Entering directory" lines: run it as a user would.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(["make", "-n", "images", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.replace("\\\n", " ").splitlines()  # one line per command
    return [" ".join(c.split()) for c in commands if not c.startswith("test ")]


def test_make_images_builds_both_dockerfiles_and_pushes_when_asked():
    built = ["docker build -f deploy/Dockerfile.operator -t r/operator:t .",
             "docker build -f deploy/Dockerfile.triton -t r/triton:t ."]
    assert make_images("REGISTRY=r", "TAG=t", "BUILDER=docker") == built
    for dockerfile in ("Dockerfile.operator", "Dockerfile.triton"):
        assert (ROOT / "deploy" / dockerfile).is_file()

    assert make_images("REGISTRY=r", "TAG=t", "BUILDER=podman", "PUSH=1",
                       "TRITON_BASE_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3") == [
        "podman build -f deploy/Dockerfile.operator -t r/operator:t .",
        "podman build -f deploy/Dockerfile.triton --build-arg "
        "TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3 -t r/triton:t .",
        "podman push r/operator:t", "podman push r/triton:t"]
    # Another base's python3 version goes to the build's check with it.
    assert make_images("REGISTRY=r", "TAG=t", "BUILDER=docker",
                       "TRITON_BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3",
                       "TRITON_PYTHON=3.12")[1] == (
        "docker build -f deploy/Dockerfile.triton --build-arg "
        "TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.01-py3 --build-arg TRITON_PYTHON=3.12 "
        "-t r/triton:t .")
