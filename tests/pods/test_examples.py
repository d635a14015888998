"""The examples' pods, cold: the prepare init container fills the emptyDir, then Triton.

Each pod comes up Ready under the pod runner (probes as rendered) and answers the
example's request; the search is checked against sentence-transformers and a numpy
brute-force scan over the index the pod built, the chat against the known answer of
greedy decoding. A second start of the same pod on the artifacts the first one left
measures the warm start (the init container finds everything current).

The news pods are shared by this module's tests (prepared once): what another pod can
reach of the warm pod as rendered (the gateway and metrics, not Triton), and of one with
Triton exposed and API keys (Triton's control APIs and the gateway locked by keys from
Secrets).
"""

from __future__ import annotations

import base64
import json
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tests.pods.conftest import record
from tests.support.podrunner import PodFailed, PodRunner
from tritonop.resources import iter_resources, parse_resource

ROOT = Path(__file__).resolve().parents[2]
SEED_REQUEST = {"text": "europe climate change storm", "num_results": 5}
CHAT_REQUEST = {"text_input": "What is the capital of France?", "max_tokens": 32,
                "temperature": 0}


def example(name: str):
    (found,) = iter_resources([ROOT / "examples" / name])
    return found


def post(pod: PodRunner, model: str, body: dict[str, Any]) -> dict[str, Any]:
    # Triton listens on the pod's loopback: reached as kubectl port-forward reaches it.
    request = urllib.request.Request(f"{pod.forward(8000)}/v2/models/{model}/generate",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def on_claim(folder: Path):
    """Swap the pod's artifacts volume for a claim on ``folder`` (a warm start)."""
    def patch(deployment: dict[str, Any], _: dict[str, Any]) -> None:
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        for index, volume in enumerate(volumes):
            if volume["name"] == "artifacts":
                volumes[index] = {"name": "artifacts",
                                  "persistentVolumeClaim": {"claimName": "warm"}}
    return patch, {"warm": folder}


@dataclass(frozen=True)
class Prepared:
    """What the news example's cold pod left: its artifacts and its answer."""

    folder: Path  # the artifacts volume the init container filled, for warm pods
    answer: dict[str, Any]  # the seed request's answer
    prepare_exit_codes: list[int]


@pytest.fixture(scope="module")
def news_prepared(module_pods) -> Prepared:
    """The news example's pod, cold: its init container prepares, then it is stopped."""
    pod = module_pods(example("news-search.yaml"), name="news-cold")
    record("news-search.yaml cold (prepare: ONNX export + 20,000 texts)", pod.wait_ready())
    answer = post(pod, "news", SEED_REQUEST)
    pod.stop(drain=False)
    return Prepared(pod.volumes["artifacts"], answer, pod.container("prepare").exit_codes)


@pytest.fixture(scope="module")
def news_warm(module_pods, news_prepared) -> PodRunner:
    """The news example's pod, warm (the cold pod's artifacts on a claim), as rendered."""
    patch, claims = on_claim(news_prepared.folder)
    pod = module_pods(example("news-search.yaml"), name="news-warm", claims=claims,
                      patch=patch)
    record("news-search.yaml warm", pod.wait_ready())
    return pod


def test_news_example_pod_serves_the_seed_request(news_prepared, news_warm):
    news = example("news-search.yaml")
    assert news_prepared.prepare_exit_codes == [0]
    body = news_prepared.answer

    from sentence_transformers import SentenceTransformer

    from tritonop.artifacts.sources import locate
    from tritonop.artifacts.versions import resource_fingerprint

    index = news_prepared.folder / "news" / resource_fingerprint(news) / "index"
    matrix = load_file(str(index / "embeddings.safetensors"))["embeddings"]
    assert matrix.shape == (20000, 384)
    query = SentenceTransformer(str(locate(news.spec.model.source)), device="cpu").encode(
        SEED_REQUEST["text"], normalize_embeddings=True)
    scores = matrix @ query
    expected = np.argsort(-scores, kind="stable")[:5]
    assert body["ids"] == expected.tolist()
    np.testing.assert_allclose(body["scores"], scores[expected], atol=1e-3)
    blob, offsets = (index / "texts.utf8").read_bytes(), np.load(index / "texts.offsets.npy")
    texts = [blob[offsets[i]:offsets[i + 1]].decode() for i in range(len(offsets) - 1)]
    assert body["texts"] == [texts[i] for i in expected]
    assert any("climate" in text.lower() or "weather" in text.lower()
               for text in body["texts"])

    assert post(news_warm, "news", SEED_REQUEST)["ids"] == body["ids"]


def http(method: str, url: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request; its status and body, whatever the status."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_other_pods_reach_the_gateway_and_metrics_but_not_triton(news_prepared, news_warm,
                                                                 other_pod):
    """Issue 19: from another pod, the news pod as rendered by default answers on the
    gateway and on Triton's metrics; Triton's HTTP and gRPC (and so its model-repository
    API) listen on the pod's loopback only, where the gateway reaches them."""
    other_pod.reach(news_warm)
    for port in (8000, 8001):
        with pytest.raises(ConnectionRefusedError):
            other_pod.call(socket.create_connection, (news_warm.ip, port), 5)
    status, body = other_pod.call(http, "POST", f"http://{news_warm.ip}:8080/v1/search",
                                  {"model": "news", **SEED_REQUEST})
    assert status == 200, body
    hits = json.loads(body)["data"]
    assert [hit["id"] for hit in hits] == news_prepared.answer["ids"]
    assert [hit["text"] for hit in hits] == news_prepared.answer["texts"]
    status, metrics = other_pod.call(http, "GET", f"http://{news_warm.ip}:8002/metrics")
    assert status == 200
    assert b'nv_inference_request_success{model="news",version="1"}' in metrics


ADMIN_KEY = "admin-0f4c2a9e7b1d"
CLIENT_KEY = "client-5e8a3c1f90b2"
RESTRICTED = b"This API is restricted, expecting header 'triton-admin-key'"
# A model whose loading would write a file in the pod: what a load with a model.py of
# one's own could do before Triton's control APIs were restricted.
EVIL_MODEL = ("open('/tmp/evil-was-here', 'w').write('loaded')\n"
              "class TritonPythonModel:\n"
              "    def execute(self, requests):\n"
              "        return []\n")
EVIL_CONFIG = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0,
                          "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [1]}],
                          "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]})
GRPC_ATTEMPTS = """
import json, sys
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
address, config, model, key = sys.argv[1:]
client = grpcclient.InferenceServerClient(address)
found = {}
def attempt(name, call):
    try:
        found[name] = call()
    except InferenceServerException as error:
        found[name] = [error.status(), error.message()]
attempt("unload", lambda: client.unload_model("news"))
attempt("load", lambda: client.load_model("evil", config=config,
                                          files={"file:1/model.py": model.encode()}))
header = {"triton-grpc-protocol-triton-admin-key": key}
attempt("index", lambda: [m.name for m in client.get_model_repository_index(
    headers=header).models])
attempt("ready", lambda: client.is_model_ready("news"))
print(json.dumps(found))
"""


@pytest.fixture(scope="module")
def news_exposed(module_pods, news_prepared) -> PodRunner:
    """The news pod with ``api.triton.expose`` (an admin key in a Secret) and API keys."""
    path = ROOT / "examples" / "news-search.yaml"
    body = yaml.safe_load(path.read_text())
    body["spec"]["api"] = {"triton": {"expose": True, "adminSecretName": "news-admin"},
                           "auth": {"secretName": "news-api-keys"}}
    patch, claims = on_claim(news_prepared.folder)
    pod = module_pods(parse_resource(body, path.parent.resolve()), name="news-exposed",
                      claims=claims, patch=patch,
                      secrets={"news-admin": {"admin-key": ADMIN_KEY},
                               "news-api-keys": {"search-team": CLIENT_KEY}})
    record("news-search.yaml warm, Triton exposed, API keys", pod.wait_ready())
    return pod


def test_exposed_triton_refuses_its_control_apis_without_the_admin_key(
        news_prepared, news_exposed, other_pod):
    """Issue 19: exposed, Triton's repository API refuses unload and a load carrying a
    model.py of its own, over HTTP (403) and gRPC (UNAVAILABLE), to another pod without
    the admin key; the model stays loaded and serves; the key from the Secret opens it."""
    pod = news_exposed
    other_pod.reach(pod)
    triton = f"http://{pod.ip}:8000"
    payload = {"parameters": {"config": EVIL_CONFIG, "file:1/model.py":
                              base64.b64encode(EVIL_MODEL.encode()).decode()}}
    assert other_pod.call(http, "POST", f"{triton}/v2/repository/models/news/unload") == (
        403, b'{"error":"' + RESTRICTED + b'"}')
    assert other_pod.call(http, "POST", f"{triton}/v2/repository/models/evil/load",
                          payload)[0] == 403
    assert other_pod.call(http, "POST", f"{triton}/v2/repository/index", None,
                          {"triton-admin-key": ADMIN_KEY[:-1]})[0] == 403  # almost right
    grpc = other_pod.run([sys.executable, "-c", GRPC_ATTEMPTS, f"{pod.ip}:8001",
                          EVIL_CONFIG, EVIL_MODEL, ADMIN_KEY])
    assert grpc.returncode == 0, grpc.stderr
    found = json.loads(grpc.stdout)
    refused = ["StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header "
               "'triton-grpc-protocol-triton-admin-key'"]
    assert found["unload"] == found["load"] == refused
    assert "news" in found["index"]  # the key opens it
    assert found["ready"] is True

    assert other_pod.call(http, "GET", f"{triton}/v2/models/news/ready")[0] == 200
    status, body = other_pod.call(http, "POST", f"{triton}/v2/models/news/generate",
                                  SEED_REQUEST)
    assert status == 200 and json.loads(body)["ids"] == news_prepared.answer["ids"]
    assert not (pod.volumes["tmp"] / "evil-was-here").exists()
    status, body = other_pod.call(http, "POST", f"{triton}/v2/repository/index", None,
                                  {"triton-admin-key": ADMIN_KEY})
    assert status == 200
    assert {"name": "news", "version": "1", "state": "READY"} in json.loads(body)
    assert pod.ready and pod.container("triton").restarts == 0
    # The key reached Triton through the kubelet's $(VAR) expansion, not the pod spec.
    assert ADMIN_KEY not in json.dumps(pod.pod)


def test_gateway_in_the_pod_needs_a_key_from_the_secret_volume(news_prepared, news_exposed,
                                                               other_pod):
    """api.auth: the gateway reads its keys from the Secret volume the kubelet lays out
    (group-readable by the pod's fsGroup only) and refuses a request without one."""
    other_pod.reach(news_exposed)
    url = f"http://{news_exposed.ip}:8080/v1/search"
    request = {"model": "news", **SEED_REQUEST}
    status, body = other_pod.call(http, "POST", url, request)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert other_pod.call(http, "POST", url, request,
                          {"Authorization": f"Bearer {CLIENT_KEY[:-1]}"})[0] == 401
    status, body = other_pod.call(http, "POST", url, request,
                                  {"Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 200
    assert [hit["id"] for hit in json.loads(body)["data"]] == news_prepared.answer["ids"]


def test_chat_example_pod_answers_paris(run_pod):
    chat = example("chat.yaml")
    pod = run_pod(chat, name="chat-cold")
    record("chat.yaml cold (prepare: GGUF to safetensors)", pod.wait_ready())
    body = post(pod, "chat", CHAT_REQUEST)
    assert "Paris" in body["text_output"], body
    assert body["finish_reason"] in ("stop", "length")

    pod.stop(drain=False)
    patch, claims = on_claim(pod.volumes["artifacts"])
    warm = run_pod(chat, name="chat-warm", claims=claims, patch=patch)
    record("chat.yaml warm", warm.wait_ready())
    # Greedy decoding: the same answer from the same weights.
    assert post(warm, "chat", CHAT_REQUEST)["text_output"] == body["text_output"]


def on_fresh_host_path(name: str, folder: Path):
    """The example with its artifacts on a hostPath that does not exist yet: the runner
    makes it as a kubelet does (DirectoryOrCreate: root, 0755, no fsGroup)."""
    body = yaml.safe_load((ROOT / "examples" / name).read_text())
    body["spec"].setdefault("artifacts", {})["hostPath"] = {"path": str(folder)}
    return parse_resource(body, ROOT / "examples")


def test_a_fresh_host_path_is_handed_to_the_pods_user_then_prepared(run_pod, tmp_path):
    folder = tmp_path / "node" / "chat-artifacts"
    pod = run_pod(on_fresh_host_path("chat.yaml", folder), name="chat-host-path")
    record("chat.yaml cold on a fresh hostPath", pod.wait_ready())
    assert (folder.stat().st_uid, folder.stat().st_gid) == (1000, 1000)
    assert "Paris" in post(pod, "chat", CHAT_REQUEST)["text_output"]


def test_a_host_path_the_pods_cannot_write_fails_with_a_message_not_a_traceback(run_pod,
                                                                                tmp_path):
    """Without the artifacts-owner container (what the pod was before it existed)."""
    def without_owner(deployment: dict[str, Any], _: dict[str, Any]) -> None:
        spec = deployment["spec"]["template"]["spec"]
        spec["initContainers"] = [c for c in spec["initContainers"]
                                  if c["name"] != "artifacts-owner"]

    folder = tmp_path / "node" / "chat-artifacts"
    with pytest.raises(PodFailed) as failed:
        run_pod(on_fresh_host_path("chat.yaml", folder), name="chat-root-owned",
                patch=without_owner)
    assert "the artifacts folder /artifacts is not writable by uid 1000 (owned by uid 0, " \
           "mode 0o755)" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_pods_run_as_rendered_user_on_a_read_only_root(run_pod, tmp_path):
    """What the rendered security context means once the pod runs (checked with exec)."""
    resource = example("news-search.yaml")
    folder = tmp_path / "warm"
    patch, claims = on_claim(folder)

    def no_prepare(deployment: dict[str, Any], config_maps: dict[str, Any]) -> None:
        patch(deployment, config_maps)
        spec = deployment["spec"]["template"]["spec"]
        spec.pop("initContainers")
        # sleep in place of each program: the point is the container around it.
        for container in spec["containers"]:
            container.update(command=["sleep", "600"], args=[])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                container.pop(probe, None)

    pod = run_pod(resource, name="security", claims=claims, patch=no_prepare)
    pod.wait_ready(30)
    ids = pod.exec("triton", ["id", "-u"]).stdout.split()
    assert ids == ["1000"]
    assert pod.exec("triton", ["touch", "/opt/tritonserver/x"]).returncode != 0
    assert pod.exec("triton", ["touch", "/models/x"]).returncode != 0
    assert pod.exec("triton", ["touch", "/artifacts/x"]).returncode != 0
    assert pod.exec("triton", ["touch", "/tmp/x"]).returncode == 0
    assert pod.exec("triton", ["touch", "/etc/x"]).returncode != 0
    status = pod.exec("triton", ["grep", "CapEff", "/proc/self/status"]).stdout
    assert status.split()[-1] == "0000000000000000"
