"""The Helm chart (deploy/helm/tritonop) with the helm binary built from its Go module.

`helm template` renders the objects `kubectl kustomize` renders, with the default values and
with the images and namespace overridden the way each tool overrides them. Installed on a
control plane of its own: the tier's shared one already holds `kubectl apply -k deploy/`, whose
CRDs, ClusterRole and namespace a second, Helm-owned copy cannot share. As there, kwok "runs"
the operator's pod (Pod Security admits it); the operator itself is not run, so these tests
check objects: install, `helm upgrade` with changed values, `helm uninstall`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import CRD_NAMES
from tests.support.cluster import ROOT, ControlPlane, build_binaries, wait_for

CHART = ROOT / "deploy" / "helm" / "tritonop"
RELEASE = "tritonop"
Obj = dict[str, Any]
Key = tuple[str, str, str]  # (kind, namespace, name)


def objects(text: str) -> dict[Key, Obj]:
    found: dict[Key, Obj] = {}
    for doc in yaml.safe_load_all(text):
        if doc:
            meta = doc["metadata"]
            found[(doc["kind"], meta.get("namespace", ""), meta["name"])] = doc
    return found


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                            env=env)
    assert result.returncode == 0, f"{' '.join(argv)} failed: {result.stderr}"
    return result.stdout


class Helm:
    """The built helm, with its own config, cache and data folders."""

    def __init__(self, bin_dir: Path, home: Path, kubeconfig: Path | None = None) -> None:
        self.binary = str(bin_dir / "helm")
        self.kubectl = str(bin_dir / "kubectl")
        self.kubeconfig = kubeconfig
        self.env = {**os.environ, **{f"HELM_{part}_HOME": str(home / part.lower())
                                     for part in ("CACHE", "CONFIG", "DATA")}}

    def __call__(self, *args: str) -> str:
        config = [f"--kubeconfig={self.kubeconfig}"] if self.kubeconfig else []
        return run([self.binary, *config, *args], self.env)

    def template(self, *sets: str) -> dict[Key, Obj]:
        return objects(self("template", RELEASE, str(CHART), *(f"--set={s}" for s in sets)))

    def kustomize(self, folder: Path) -> dict[Key, Obj]:
        return objects(run([self.kubectl, "kustomize", str(folder)]))


@pytest.fixture(scope="module")
def bin_dir() -> Path:
    return build_binaries()


@pytest.fixture(scope="module")
def helm_plane(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[ControlPlane]:
    """An empty control plane, as a user's cluster is before `helm install`."""
    plane = ControlPlane(bin_dir, tmp_path_factory.mktemp("helm-cluster"))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def helm(helm_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(helm_plane.bin_dir, tmp_path_factory.mktemp("helm-home"),
                helm_plane.admin_kubeconfig)


@pytest.fixture(scope="module")
def installed(helm: Helm, helm_plane: ControlPlane) -> Helm:
    """The chart installed with its default values (once per module)."""
    if RELEASE not in helm("list", "--all-namespaces", "--short").split():
        helm("install", RELEASE, str(CHART), "--wait", "--timeout=3m")
    return helm


def copy_of_deploy(tmp_path: Path) -> Path:
    """deploy/ and crds/ in ``tmp_path``, to edit as a user edits the kustomizations."""
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("helm"))
    shutil.copytree(ROOT / "crds", tmp_path / "crds")
    return tmp_path / "deploy"


IMAGES = {"ghcr.io/tritonop/operator": ("registry.example/team/operator", "0.2.0"),
          "ghcr.io/tritonop/triton": ("registry.example/team/triton", "0.2.0")}
IMAGE_VALUES = ("image.repository=registry.example/team/operator", "image.tag=0.2.0",
                "tritonImage.repository=registry.example/team/triton", "tritonImage.tag=0.2.0")


def add_images(kustomization: Path) -> None:
    """The `images:` entry docs/kubernetes.md tells a user to add (what `kustomize edit set
    image` writes)."""
    doc = yaml.safe_load(kustomization.read_text())
    doc["images"] = [{"name": name, "newName": new, "newTag": tag}
                     for name, (new, tag) in IMAGES.items()]
    kustomization.write_text(yaml.safe_dump(doc))


def contains(live: Any, want: Any, path: str = "") -> list[str]:
    """Where ``live`` (as the server holds it, defaults added) lacks what ``want`` says."""
    if isinstance(want, dict):
        if not isinstance(live, dict):
            return [f"{path}: {live!r}"]
        return [d for key, value in want.items()
                for d in contains(live.get(key), value, f"{path}.{key}")]
    if isinstance(want, list):
        if not isinstance(live, list) or len(live) != len(want):
            return [f"{path}: {live!r} is not {want!r}"]
        return [d for i, (a, b) in enumerate(zip(live, want, strict=True))
                for d in contains(a, b, f"{path}[{i}]")]
    if want == "" and live is None:  # the server leaves out empty strings (an env value "")
        return []
    return [] if live == want else [f"{path}: {live!r} is not {want!r}"]


def live_object(plane: ControlPlane, key: Key) -> Obj | None:
    kind, namespace, name = key
    args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
    result = plane.kubectl(*args, check=False)
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    return yaml.safe_load(result.stdout)


def assert_installed_as(plane: ControlPlane, expected: dict[Key, Obj], release: str,
                        namespace: str) -> None:
    for key, want in expected.items():
        live = live_object(plane, key)
        assert live is not None, f"{key} was not installed"
        assert contains(live, want) == [], key
        annotations = live["metadata"].get("annotations") or {}
        assert annotations.get("meta.helm.sh/release-name") == release, key
        assert annotations.get("meta.helm.sh/release-namespace") == namespace, key


# --- helm template against kubectl kustomize --------------------------------------------------


def test_helm_template_renders_what_kustomize_renders(bin_dir, tmp_path):
    helm = Helm(bin_dir, tmp_path / "home")
    cluster = helm.kustomize(ROOT / "deploy")
    assert {kind for kind, _, _ in cluster} >= {"CustomResourceDefinition", "Namespace",
                                                "ClusterRole", "Deployment"}
    assert helm.template() == cluster
    assert helm.template("installMode=namespaced") == helm.kustomize(ROOT / "deploy" / "namespaced")


def test_helm_template_overrides_images_and_namespace_as_kustomize_does(bin_dir, tmp_path):
    helm = Helm(bin_dir, tmp_path / "home")
    deploy = copy_of_deploy(tmp_path)
    add_images(deploy / "kustomization.yaml")
    overridden = helm.kustomize(deploy)
    assert helm.template(*IMAGE_VALUES) == overridden
    (deployment,) = [o for (kind, _, _), o in overridden.items() if kind == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == env["TRITONOP_OPERATOR_IMAGE"] == \
        "registry.example/team/operator:0.2.0"
    assert env["TRITONOP_TRITON_IMAGE"] == "registry.example/team/triton:0.2.0"

    # deploy/namespaced/: "to install into another namespace, change `namespace:`".
    namespaced = deploy / "namespaced" / "kustomization.yaml"
    namespaced.write_text(namespaced.read_text().replace("namespace: tritonop-system",
                                                         "namespace: team-a"))
    add_images(namespaced)
    assert helm.template("installMode=namespaced", "namespace=team-a", *IMAGE_VALUES) == \
        helm.kustomize(deploy / "namespaced")


# --- install, upgrade, uninstall ----------------------------------------------------------------


def test_helm_install_creates_what_kubectl_apply_k_deploy_creates(installed, helm_plane):
    for crd in CRD_NAMES:
        helm_plane.kubectl("wait", "--for=condition=Established", f"crd/{crd}",
                           "--timeout=60s")
    expected = installed.kustomize(ROOT / "deploy")
    assert_installed_as(helm_plane, expected, RELEASE, "default")
    namespace = helm_plane.get_json("namespace", "tritonop-system")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    # Admitted under "restricted" and (by kwok) run: the Deployment is available.
    helm_plane.kubectl("rollout", "status", "deployment/tritonop", "-n", "tritonop-system",
                       "--timeout=120s")
    helm_plane.kubectl("auth", "can-i", "patch", "embeddingsearches.serving.tritonop.dev",
                       "--all-namespaces", "--as=system:serviceaccount:tritonop-system:tritonop")


def test_helm_upgrade_with_new_images_rolls_the_operator_deployment(installed, helm_plane):
    before = helm_plane.get_json("deployment", "tritonop", "-n", "tritonop-system")
    crds = {crd: helm_plane.get_json("crd", crd)["metadata"]["uid"] for crd in CRD_NAMES}
    installed("upgrade", RELEASE, str(CHART), "--wait", "--timeout=3m",
              *(f"--set={s}" for s in IMAGE_VALUES))

    after = helm_plane.get_json("deployment", "tritonop", "-n", "tritonop-system")
    container = after["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"] == env["TRITONOP_OPERATOR_IMAGE"] == \
        "registry.example/team/operator:0.2.0"
    assert env["TRITONOP_TRITON_IMAGE"] == "registry.example/team/triton:0.2.0"
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert {crd: helm_plane.get_json("crd", crd)["metadata"]["uid"] for crd in CRD_NAMES} == crds
    history = yaml.safe_load(installed("history", RELEASE, "-o", "yaml"))
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"),
                                                               (2, "deployed")]
    helm_plane.kubectl("rollout", "status", "deployment/tritonop", "-n", "tritonop-system",
                       "--timeout=120s")


def test_helm_uninstall_removes_everything_it_installed(installed, helm_plane):
    expected = installed.kustomize(ROOT / "deploy")
    installed("uninstall", RELEASE, "--wait", "--timeout=3m")
    assert RELEASE not in installed("list", "--all-namespaces", "--short").split()

    def left() -> list[Key]:
        return [key for key in expected if live_object(helm_plane, key) is not None]

    try:
        wait_for(lambda: not left(), 120, "the release's objects to be deleted")
    except TimeoutError:
        assert left() == []


def test_helm_namespaced_install_into_an_existing_namespace(helm, helm_plane, tmp_path):
    # As deploy/namespaced/ says: a cluster admin installs the CRDs; the namespace exists.
    helm_plane.kubectl("apply", "-k", str(ROOT / "crds"))
    helm_plane.create_namespace("team-a")
    values = ("installMode=namespaced", "namespace=team-a")
    helm("install", "team", str(CHART), "-n", "team-a", "--wait", "--timeout=3m",
         *(f"--set={s}" for s in values))
    deploy = copy_of_deploy(tmp_path)
    kustomization = deploy / "namespaced" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("namespace: tritonop-system",
                                                               "namespace: team-a"))
    expected = helm.kustomize(deploy / "namespaced")
    assert {kind for kind, _, _ in expected} == {"ServiceAccount", "Role", "RoleBinding",
                                                 "Deployment"}
    assert_installed_as(helm_plane, expected, "team", "team-a")
    helm_plane.kubectl("auth", "can-i", "patch", "embeddingsearches.serving.tritonop.dev",
                       "-n", "team-a", "--as=system:serviceaccount:team-a:tritonop")

    helm("uninstall", "team", "-n", "team-a", "--wait", "--timeout=3m")
    wait_for(lambda: all(live_object(helm_plane, key) is None for key in expected), 120,
             "the namespaced release's objects to be deleted")
    # What it did not install stays: the CRDs and the namespace.
    for crd in CRD_NAMES:
        assert live_object(helm_plane, ("crd", "", crd)) is not None
    assert live_object(helm_plane, ("namespace", "", "team-a")) is not None
