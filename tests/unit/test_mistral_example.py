"""examples/mistral.yaml: Mistral-7B-Instruct from the Hub on one GPU, as a user applies it.

Rendering is pure, so the GPU pod is checked here without a cluster, a GPU or the Hub; the
download is the prepare step's (``artifacts/fetch.py``), and the real API server accepts
the example in the cluster tier (``tests/cluster/test_crds.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tests.support.crd_schema import validation_errors
from tritonop.crd import custom_resource_definition
from tritonop.render.kubernetes import render_children
from tritonop.render.repository import render_repository
from tritonop.resources import load_resources
from tritonop.spec import LLMServiceSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mistral.yaml"


def test_the_crd_schema_accepts_it() -> None:
    (document,) = [doc for doc in yaml.safe_load_all(EXAMPLE.read_text()) if doc]
    assert validation_errors(custom_resource_definition("LLMService"), document) == []


def test_it_asks_for_mistral_from_the_hub_on_a_gpu_in_bfloat16() -> None:
    (resource,) = load_resources(EXAMPLE)
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    assert spec.model.source == "hf://mistralai/Mistral-7B-Instruct-v0.3"
    assert spec.model.credentials is not None and spec.model.credentials.secret_name == "hf-token"
    assert (spec.model.dtype, spec.model.device, spec.gpus) == ("bfloat16", "cuda", 1)
    assert spec.model.trust_remote_code is False


def test_it_renders_a_gpu_pod_that_serves_the_downloaded_folder() -> None:
    (resource,) = load_resources(EXAMPLE)
    children = render_children(resource)
    for manifest in children:
        kubernetes_validate.validate(manifest, "1.30", strict=True)
    (deployment,) = [c for c in children if c["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    containers: dict[str, dict[str, Any]] = {c["name"]: c for c in pod["containers"]}
    gpu_containers = [name for name, c in containers.items()
                      if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1]
    assert len(gpu_containers) == 1
    assert [c["name"] for c in pod["initContainers"]] == ["prepare"]
    sizes = {volume["name"]: volume.get("emptyDir", {}).get("sizeLimit")
             for volume in pod["volumes"]}
    assert sizes["artifacts"] == "20Gi"  # the 14.5 GB of safetensors fit
    # The Secret's name may travel with the resource; no Triton or gateway container reads it.
    assert "hf-token" not in yaml.safe_dump(list(containers.values()))
    files = render_repository([resource])
    config = text_format.Parse(files["mistral/config.pbtxt"].decode(),
                               model_config_pb2.ModelConfig())
    assert [group.kind for group in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert config.parameters["model_dir"].string_value == "/artifacts/mistral/model"
    assert config.parameters["dtype"].string_value == "bfloat16"
    assert config.parameters["trust_remote_code"].string_value == "false"
