"""deploy/, kind-config.yaml and the Dockerfiles: what can be checked without a cluster.

The RBAC is compared with permissions derived from the operator's own code: the reconciler
runs against a Kube client that records its HTTP calls instead of sending them, and kopf's
registry says what kopf watches and patches.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kopf.cli
import kubernetes_validate
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes_validate.utils import latest_version

from tests.support.kube_emulator import load_operator
from tests.support.pod_security import pod_spec_of, restricted_violations
from tritonop import API_GROUP
from tritonop.controller.kube import MERGE_PATCH, PLURALS, Kube
from tritonop.controller.policy import DEFAULT_POLICY, OperatorPolicy
from tritonop.controller.reconcile import KINDS, get_owner, reconcile, refresh
from tritonop.crd import crd_files
from tritonop.render.kubernetes import Images

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
APPLY_PATCH = "application/apply-patch+yaml"
Obj = dict[str, Any]
Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

# Kubernetes objects and kustomizations; the Helm chart (generated from these) and
# kustomize's own configuration are checked by tests/unit/test_helm_chart.py.
YAML_FILES = sorted(p for p in DEPLOY.rglob("*.yaml")
                    if "helm" not in p.relative_to(DEPLOY).parts
                    and p.name != "kustomizeconfig.yaml")
KUSTOMIZATIONS = [*(p for p in YAML_FILES if p.name == "kustomization.yaml"),
                  ROOT / "crds" / "kustomization.yaml"]
MANIFEST_FILES = [p for p in YAML_FILES if p.name != "kustomization.yaml"]


def documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> Iterator[tuple[str, Obj]]:
    for path in MANIFEST_FILES:
        for doc in documents(path):
            yield f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc


def one(path: Path, kind: str, name: str = "tritonop") -> Obj:
    (found,) = [doc for doc in documents(path)
                if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


OPERATOR = one(DEPLOY / "base" / "operator.yaml", "Deployment")
CLUSTER_ROLE = one(DEPLOY / "rbac.yaml", "ClusterRole")
ROLE = one(DEPLOY / "namespaced" / "rbac.yaml", "Role")


# (a) every file loads, and every kustomization names files that exist


@pytest.mark.parametrize("path", [*YAML_FILES, ROOT / "kind-config.yaml"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_file_loads_as_kubernetes_style_objects(path):
    docs = documents(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), doc


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kustomization_resources_exist(path):
    for entry in yaml.safe_load(path.read_text())["resources"]:
        target = (path.parent / entry).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), \
            f"{path.relative_to(ROOT)}: {entry} is neither a file nor a kustomization"


def test_crds_kustomization_lists_every_generated_crd():
    listed = yaml.safe_load((ROOT / "crds" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(crd_files()), "crds/kustomization.yaml is out of date"


def test_cluster_install_includes_crds_rbac_and_operator():
    resources = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"]
    assert {"namespace.yaml", "../crds", "rbac.yaml", "base"} <= set(resources)


# (b) strict validation against the Kubernetes OpenAPI schemas


@pytest.mark.parametrize("version", ["1.30", str(latest_version())])
@pytest.mark.parametrize("name,manifest", list(manifests()), ids=[n for n, _ in manifests()])
def test_manifest_passes_strict_validation(name, manifest, version):
    kubernetes_validate.validate(manifest, version, strict=True)


def kustomize(folder: Path) -> list[Obj]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (needed for `kubectl kustomize`, no cluster)")
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def test_cluster_install_builds_and_validates():
    objects = kustomize(DEPLOY)
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(["Namespace", "CustomResourceDefinition", "CustomResourceDefinition",
                            "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                            "ClusterRole", "ClusterRoleBinding", "Deployment"])
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)


def test_namespaced_install_builds_to_namespaced_objects_watching_their_namespace():
    objects = kustomize(DEPLOY / "namespaced")
    assert sorted(obj["kind"] for obj in objects) == [
        "Deployment", "Role", "RoleBinding", "ServiceAccount"]
    assert len({obj["metadata"]["namespace"] for obj in objects}) == 1
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30", strict=True)
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "--namespace=$(POD_NAMESPACE)" and "--all-namespaces" not in args
    # Its Role cannot grant the cluster-scoped CRD watch: kopf would retry 403s instead.
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TRITONOP_WATCH_CRDS"] == "false"


# (c) RBAC: no wildcards, and exactly what the code needs plus the extras explained


def api_group(api_version: str) -> str:
    return api_version.rpartition("/")[0]


class RecordingKube(Kube):
    """A Kube whose HTTP calls are recorded instead of sent.

    Every object asked for exists and belongs to the resource being reconciled
    (``owner_uid``), as on a resync; lists are empty but for pods: one, whose ``prepare``
    container and init container run (its log is read for a download's progress). So every
    call a reconcile can make is made, deleting an optional child included.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.owner_uid = ""

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        self.calls.append((method, url, content_type))
        if method == "GET" and not query:
            return {"metadata": {"ownerReferences": [{"uid": self.owner_uid}]}}
        if method == "GET" and url.endswith("/pods"):
            selector = dict(query or []).get("labelSelector", "")
            running = [{"name": "prepare", "state": {"running": {}}}]
            return {"items": [{"metadata": {"name": "preparing", "labels": dict(
                pair.split("=", 1) for pair in selector.split(",") if pair)}, "status": {
                "containerStatuses": running, "initContainerStatuses": running}}]}
        return {}

    def _send(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json", accept: str = "application/json"
              ) -> bytes:
        self.calls.append((method, url, content_type))  # a pod's log
        return b""


class FreshKube(RecordingKube):
    """A RecordingKube on which nothing exists yet: the first reconcile's calls (the
    prepare Job is created, not read)."""

    def _call(self, method: str, url: str, body: Any = None,
              query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Obj:
        result = super()._call(method, url, body, query, content_type)
        if method == "GET" and not query:
            raise ApiException(status=404)
        return result


def permissions_of(method: str, url: str, content_type: str) -> set[Permission]:
    """What RBAC checks for one request to a namespaced object's URL."""
    parts = url.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[0] != "namespaces":  # a cluster-scoped kind (StorageClasses)
        rest = ["namespaces", "", *rest]
    plural, name, sub = rest[2], rest[3] if len(rest) > 3 else None, rest[4:]
    resource = "/".join([plural, *sub])
    if method == "GET":
        return {(group, resource, "get" if name else "list")}
    if method == "PATCH" and content_type == APPLY_PATCH:
        # Server-side apply is authorized as patch, and as create when the object is new.
        return {(group, resource, "patch"), (group, resource, "create")}
    verb = {"PATCH": "patch", "DELETE": "delete", "POST": "create", "PUT": "update"}[method]
    return {(group, resource, verb)}


def resource_bodies() -> list[Obj]:
    """Each example, and one asking for every optional child, as the API server returns them."""
    bodies = [doc for path in sorted((ROOT / "examples").glob("*.yaml"))
              for doc in documents(path)]
    everything = copy.deepcopy(bodies[0])
    everything["metadata"]["name"] = "everything"
    everything["spec"].update(replicas=2, autoscaling={"minReplicas": 2, "maxReplicas": 4},
                              networkPolicy={"enabled": True})
    bodies.append(everything)
    by_job = copy.deepcopy(next(b for b in bodies if b["kind"] == "EmbeddingSearch"))
    by_job["metadata"]["name"] = "prepared-by-a-job"
    by_job["spec"]["artifacts"] = {"prepare": "job"}
    bodies.append(by_job)
    for number, body in enumerate(bodies):
        body["metadata"].update(namespace="ml", uid=f"uid-{number}", resourceVersion="7",
                                generation=1)
    return bodies


def handled(selector: Any) -> tuple[str, str]:
    """(apiGroup, plural) of a kopf handler's selector, named by its plural."""
    plural = selector.plural or selector.any_name
    assert plural in PLURALS.values(), f"{plural}: named other than by its plural"
    return selector.group, plural


def code_permissions() -> set[Permission]:
    """Every permission the reconciler's calls and kopf's handlers need."""
    kube = RecordingKube()
    for body in resource_bodies():
        kube.owner_uid = body["metadata"]["uid"]
        reconcile(kube, body, Images())
        refresh(kube, body)
        kube.patch_status(body, {"phase": "Ready"})
        child = {"metadata": {"namespace": "ml", "ownerReferences": [
            {"apiVersion": body["apiVersion"], "kind": body["kind"],
             "name": body["metadata"]["name"]}]}}
        get_owner(kube, child)
    fresh = FreshKube()
    for body in resource_bodies():
        reconcile(fresh, body, Images())
    kube.calls += fresh.calls
    assert {content for method, _, content in kube.calls if method == "PATCH"} == {
        APPLY_PATCH, MERGE_PATCH}
    needed = set().union(*(permissions_of(*call) for call in kube.calls))
    # The operator's handlers in a registry of their own, whatever ran before in this
    # process. kopf's handler registries are private API; kopf is pinned (pyproject.toml).
    registry, _ = load_operator("tritonop.controller.handlers")
    for watching in registry._watching.get_all_handlers():
        needed |= {(*handled(watching.selector), verb) for verb in ("list", "watch")}
    for changing in [*registry._changing.get_all_handlers(),
                     *registry._spawning.get_all_handlers()]:
        # Watched, and patched with kopf's finalizer and bookkeeping annotations.
        needed |= {(*handled(changing.selector), verb) for verb in ("list", "watch", "patch")}
    # kopf.event() (handlers.announce) and kopf's own warnings: POST to core/v1 events
    # (kopf/_cogs/clients/events.py).
    needed.add(("", "events", "create"))
    return needed


def children() -> set[tuple[str, str]]:
    """(apiGroup, plural) of every kind the operator creates, from kube.PLURALS."""
    return {(api_group(version), plural) for (version, kind), plural in PLURALS.items()
            if kind not in (*KINDS, "Pod")}


def justified_extras() -> set[Permission]:
    """Granted beyond the code's own calls, for the OwnerReferencesPermissionEnforcement
    admission plugin (off by default, on in OpenShift and hardened clusters): setting an
    object's ownerReferences needs delete on it, and blockOwnerDeletion needs update on
    the owner's finalizers."""
    extras = {(group, plural, "delete") for group, plural in children()}
    extras |= {(API_GROUP, f"{plural}/finalizers", "update")
               for (version, kind), plural in PLURALS.items() if kind in KINDS}
    return extras


def granted(role: Obj) -> set[Permission]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


@pytest.mark.parametrize("role", [CLUSTER_ROLE, ROLE], ids=["ClusterRole", "Role"])
def test_rbac_has_no_wildcards(role):
    assert not [text for text in strings(role["rules"]) if "*" in text]
    assert all(set(rule) <= {"apiGroups", "resources", "verbs"} for rule in role["rules"]), \
        "no resourceNames or nonResourceURLs expected"


@pytest.mark.parametrize("role", [CLUSTER_ROLE, ROLE], ids=["ClusterRole", "Role"])
def test_rbac_covers_every_call_the_operator_makes(role):
    missing = code_permissions() - granted(role)
    assert not missing, f"the operator needs these, the {role['kind']} lacks them: {missing}"


@pytest.mark.parametrize("role", [CLUSTER_ROLE, ROLE], ids=["ClusterRole", "Role"])
def test_rbac_grants_nothing_the_operator_does_not_use(role):
    unused = granted(role) - code_permissions() - justified_extras()
    assert not unused, f"least privilege: nothing in the code uses {unused}"


def test_role_and_cluster_role_grant_the_same():
    assert ROLE["rules"] == CLUSTER_ROLE["rules"]


def test_cluster_install_may_watch_crds_to_serve_those_installed_later():
    observer = one(DEPLOY / "rbac.yaml", "ClusterRole", "tritonop-crd-observer")
    assert granted(observer) == {("apiextensions.k8s.io", "customresourcedefinitions", verb)
                                 for verb in ("list", "watch")}
    binding = one(DEPLOY / "rbac.yaml", "ClusterRoleBinding", "tritonop-crd-observer")
    assert binding["roleRef"]["name"] == "tritonop-crd-observer"
    assert binding["subjects"] == one(DEPLOY / "rbac.yaml", "ClusterRoleBinding")["subjects"]


def test_bindings_give_the_roles_to_the_operators_service_account():
    account = OPERATOR["spec"]["template"]["spec"]["serviceAccountName"]
    cluster_binding = one(DEPLOY / "rbac.yaml", "ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                          "kind": "ClusterRole", "name": "tritonop"}
    assert cluster_binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                            "namespace": OPERATOR["metadata"]["namespace"]}]
    binding = one(DEPLOY / "namespaced" / "rbac.yaml", "RoleBinding")
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == "tritonop"
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", account)]
    for path in (DEPLOY / "rbac.yaml", DEPLOY / "namespaced" / "rbac.yaml"):
        assert one(path, "ServiceAccount")["metadata"]["name"] == account


# (d) the operator Deployment: restricted pod security, and a command kopf accepts


def test_operator_pod_passes_the_restricted_pod_security_standard():
    assert restricted_violations(pod_spec_of(OPERATOR)) == []


def test_operator_root_filesystem_is_read_only_with_a_writable_tmp():
    pod = pod_spec_of(OPERATOR)
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


BREACHES = {
    "privileged": lambda pod: pod["containers"][0]["securityContext"].update(privileged=True),
    "escalation": lambda pod: pod["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True),
    "capabilities": lambda pod: pod["containers"][0]["securityContext"].update(
        capabilities={"add": ["SYS_ADMIN"]}),
    "root": lambda pod: pod["securityContext"].update(runAsUser=0),
    "no-non-root": lambda pod: (pod["securityContext"].pop("runAsNonRoot"),
                                pod["containers"][0]["securityContext"].pop("runAsNonRoot")),
    "no-seccomp": lambda pod: pod["securityContext"].pop("seccompProfile"),
    "host-path": lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
    "host-network": lambda pod: pod.update(hostNetwork=True),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_restricted_checker_catches_a_breach(breach):
    pod = copy.deepcopy(pod_spec_of(OPERATOR))
    BREACHES[breach](pod)
    assert restricted_violations(pod)


def test_operator_runs_one_standalone_kopf_with_a_liveness_probe():
    assert OPERATOR["spec"]["replicas"] == 1
    (container,) = pod_spec_of(OPERATOR)["containers"]
    command, args = container["command"], container["args"]
    assert command == ["kopf", "run", "--standalone", "-m", "tritonop.controller.handlers"]
    assert "--all-namespaces" in args
    options = kopf.cli.run.make_context("run", [*command[2:], *args]).params
    assert options["clusterwide"] and options["standalone"]
    liveness = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S*)", options["liveness_endpoint"])
    assert liveness, options["liveness_endpoint"]
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports[probe["port"]], probe["path"]) == (int(liveness[1]), liveness[2])


def test_namespaced_operator_args_parse_as_one_namespace():
    (container,) = pod_spec_of(OPERATOR)["containers"]
    args = ["--namespace=$(POD_NAMESPACE)", *container["args"][1:]]
    options = kopf.cli.run.make_context("run", [*container["command"][2:], *args]).params
    assert options["namespaces"] == ("$(POD_NAMESPACE)",) and not options["clusterwide"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_operator_image_is_the_one_it_gives_the_prepare_init_container():
    (container,) = pod_spec_of(OPERATOR)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TRITONOP_OPERATOR_IMAGE"] == container["image"] == Images().operator
    assert env["TRITONOP_TRITON_IMAGE"] == Images().triton


def test_the_operator_as_deployed_allows_no_host_path_and_only_its_own_images():
    """deploy/ states its policy, and it is the strict one (creating a resource is then
    creating a restricted pod that runs the project's images)."""
    (container,) = pod_spec_of(OPERATOR)["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert {"TRITONOP_ALLOW_HOST_PATH", "TRITONOP_ALLOWED_IMAGES",
            "TRITONOP_MAX_CORPUS_BYTES"} <= set(env)
    assert OperatorPolicy.from_environment(env, Images()) == DEFAULT_POLICY


# (e) Dockerfiles: multi-stage, non-root, and only what .dockerignore lets through


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def test_both_dockerfiles_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.operator", "Dockerfile.triton"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multi_stage_and_copies_from_a_named_stage(path):
    found = stages(path)
    assert len(found) >= 2
    names = [args.split()[-1] for (_, args), *_ in found[:-1]
             if re.search(r"\sAS\s", args, re.IGNORECASE)]
    assert names, "earlier stages should be named"
    sources = [m[1] for _, args in instructions(path) if (m := re.search(r"--from=(\S+)", args))]
    assert sources and set(sources) <= set(names)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_final_stage_runs_as_a_non_root_user(path):
    users = [args.split(":")[0] for instruction, args in stages(path)[-1] if instruction == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1] not in ("0", "root")
    assert users[-1] == "1000", "the pods run as uid 1000 (tritonop.render.kubernetes.UID)"


def dockerignore_allows(path: str) -> bool:
    """Whether ``path`` reaches the build context (last matching line wins)."""
    allowed = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_the_context_holds(path):
    for instruction, args in instructions(path):
        if instruction != "COPY" or "--from=" in args:
            continue
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source}: no such path"
            assert dockerignore_allows(source.rstrip("/")), f".dockerignore drops {source}"


def test_operator_image_entrypoint_is_the_deployments_command():
    (container,) = pod_spec_of(OPERATOR)["containers"]
    final = dict(stages(DEPLOY / "Dockerfile.operator")[-1])
    assert yaml.safe_load(final["ENTRYPOINT"]) == container["command"]
    assert yaml.safe_load(final["CMD"]) == container["args"]


# (f) kind-config.yaml


def test_kind_config_has_one_node_with_the_artifacts_folder_mounted():
    (config,) = documents(ROOT / "kind-config.yaml")
    assert (config["apiVersion"], config["kind"]) == ("kind.x-k8s.io/v1alpha4", "Cluster")
    (node,) = config["nodes"]
    assert node["role"] == "control-plane"
    mounts = {m["containerPath"]: m["hostPath"] for m in node["extraMounts"]}
    assert mounts == {"/artifacts": "./.kind-artifacts"}
    assert ".kind-artifacts/" in (ROOT / ".gitignore").read_text().splitlines()
