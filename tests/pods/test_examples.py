"""The examples' pods, cold: the prepare init container fills the emptyDir, then Triton.

Each pod comes up Ready under the pod runner (probes as rendered) and answers the
example's request; the search is checked against sentence-transformers and a numpy
brute-force scan over the index the pod built, the chat against the known answer of
greedy decoding. A second start of the same pod on the artifacts the first one left
measures the warm start (the init container finds everything current).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from tests.pods.conftest import record
from tests.support.podrunner import PodRunner
from tritonop.resources import iter_resources

ROOT = Path(__file__).resolve().parents[2]
SEED_REQUEST = {"text": "europe climate change storm", "num_results": 5}
CHAT_REQUEST = {"text_input": "What is the capital of France?", "max_tokens": 32,
                "temperature": 0}


def example(name: str):
    (found,) = iter_resources([ROOT / "examples" / name])
    return found


def post(pod: PodRunner, model: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{pod.url()}/v2/models/{model}/generate",
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


def test_news_example_pod_serves_the_seed_request(run_pod):
    news = example("news-search.yaml")
    pod = run_pod(news, name="news-cold")
    record("news-search.yaml cold (prepare: ONNX export + 20,000 texts)", pod.wait_ready())
    assert pod.container("prepare").exit_codes == [0]
    body = post(pod, "news", SEED_REQUEST)

    from sentence_transformers import SentenceTransformer

    from tritonop.artifacts.sources import locate
    from tritonop.artifacts.versions import resource_fingerprint

    index = pod.volumes["artifacts"] / "news" / resource_fingerprint(news) / "index"
    matrix = load_file(str(index / "embeddings.safetensors"))["embeddings"]
    assert matrix.shape == (20000, 384)
    query = SentenceTransformer(str(locate(news.spec.model.source)), device="cpu").encode(
        SEED_REQUEST["text"], normalize_embeddings=True)
    scores = matrix @ query
    expected = np.argsort(-scores, kind="stable")[:5]
    assert body["ids"] == expected.tolist()
    np.testing.assert_allclose(body["scores"], scores[expected], atol=1e-3)
    texts = [json.loads(line) for line in (index / "texts.jsonl").read_text().splitlines()]
    assert body["texts"] == [texts[i] for i in expected]
    assert any("climate" in text.lower() or "weather" in text.lower()
               for text in body["texts"])

    pod.stop()
    patch, claims = on_claim(pod.volumes["artifacts"])
    warm = run_pod(news, name="news-warm", claims=claims, patch=patch)
    record("news-search.yaml warm", warm.wait_ready())
    assert post(warm, "news", SEED_REQUEST)["ids"] == body["ids"]
    # The same search through the pod's gateway container (its `openai` port), which
    # reaches Triton on the pod's localhost: the seed's body plus the model.
    request = urllib.request.Request(
        f"{warm.url('openai')}/v1/search", data=json.dumps({"model": "news", **SEED_REQUEST})
        .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        through_gateway = json.loads(response.read())["data"]
    assert [hit["id"] for hit in through_gateway] == body["ids"]
    assert [hit["text"] for hit in through_gateway] == body["texts"]


def test_chat_example_pod_answers_paris(run_pod):
    chat = example("chat.yaml")
    pod = run_pod(chat, name="chat-cold")
    record("chat.yaml cold (prepare: GGUF to safetensors)", pod.wait_ready())
    body = post(pod, "chat", CHAT_REQUEST)
    assert "Paris" in body["text_output"], body
    assert body["finish_reason"] in ("stop", "length")

    pod.stop()
    patch, claims = on_claim(pod.volumes["artifacts"])
    warm = run_pod(chat, name="chat-warm", claims=claims, patch=patch)
    record("chat.yaml warm", warm.wait_ready())
    # Greedy decoding: the same answer from the same weights.
    assert post(warm, "chat", CHAT_REQUEST)["text_output"] == body["text_output"]


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
