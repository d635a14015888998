"""The cluster tier: the real operator against a real control plane (tests/support/cluster.py).

One control plane per session. deploy/ is applied with the built kubectl as a user would
(`kubectl apply -k deploy/`): the CRDs, the tritonop-system namespace, the RBAC and the
operator Deployment. The Deployment's pod is admitted by Pod Security (restricted) and "run"
by kwok, which proves the manifest is accepted; then it is scaled to 0 and the real operator
runs as a local process with that Deployment's command, environment and ServiceAccount token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import ROOT, ControlPlane, Operator, build_binaries, wait_for

NAMESPACE = "tritonop-test"
UNREADY_NAMESPACE = "tritonop-unready"  # kwok never makes pods here ready (kwok-stages.yaml)
CRD_NAMES = ("embeddingsearches.serving.tritonop.dev", "llmservices.serving.tritonop.dev")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


_planes: list[ControlPlane] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """On a failure, the tail of every component's log (the operator's first)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and _planes:
        report.sections.append(("cluster logs", _planes[0].logs(60)))


def install(cluster: ControlPlane) -> None:
    cluster.kubectl("apply", "-k", str(ROOT / "deploy"))
    for crd in CRD_NAMES:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    cluster.kubectl("rollout", "status", "deployment/tritonop", "-n", "tritonop-system",
                    "--timeout=120s")
    cluster.kubectl("scale", "deployment/tritonop", "-n", "tritonop-system", "--replicas=0")
    cluster.create_namespace(NAMESPACE)
    cluster.create_namespace(UNREADY_NAMESPACE)
    wait_owner_references(cluster)


def wait_owner_references(cluster: ControlPlane, timeout: float = 90) -> None:
    """Wait until admission can resolve owner references to the new kinds.

    OwnerReferencesPermissionEnforcement looks an owner's kind up in kube-apiserver's
    discovery RESTMapper, which is refreshed every 30 s: until then, a child with
    blockOwnerDeletion pointing at a just-installed kind gets a 403 ("cannot find RESTMapping").
    test_crds_installed_after_the_operator_started covers that window; the others start after.
    """
    for kind in ("EmbeddingSearch", "LLMService"):
        probe = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": "owner-probe", "namespace": NAMESPACE, "ownerReferences": [{
                "apiVersion": "serving.tritonop.dev/v1alpha1", "kind": kind, "name": "probe",
                "uid": "00000000-0000-0000-0000-000000000000", "blockOwnerDeletion": True}]}}
        # As the operator: the plugin skips the lookup for users who may finalize anything.
        wait_for(lambda probe=probe: cluster.kubectl(
            "create", "--dry-run=server", "-f", "-", "--as=system:serviceaccount:"
            "tritonop-system:tritonop", input=json.dumps(probe), check=False).returncode == 0,
            timeout, f"admission to resolve {kind} owners", interval=1)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The control plane with deploy/ installed; its logs stay in ``<tmp>/cluster0/logs``."""
    plane = ControlPlane(build_binaries(), tmp_path_factory.mktemp("cluster"))
    _planes.append(plane)
    plane.start()
    try:
        install(plane)
        yield plane
    finally:
        plane.stop()
        _planes.remove(plane)


@pytest.fixture(scope="session")
def operator(cluster: ControlPlane) -> Iterator[Operator]:
    """The cluster-wide operator (deploy/), shared by the tier; tests that stop it restart it."""
    running = Operator(cluster).start()
    yield running
    running.stop()


@pytest.fixture()
def live_operator(operator: Operator) -> Operator:
    """The operator, started again if an earlier test left it stopped."""
    if operator.process is None or not operator.process.running():
        operator.start()
    return operator
