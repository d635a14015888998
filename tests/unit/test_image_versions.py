"""What ships is what is tested: one list of versions (deploy/versions.txt) for the images and
for the environment the tests (and the pod runner's stand-in images) run with."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.unit.test_deploy import instructions

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ROOT / "deploy" / "versions.txt"
# Pinned for an image only: the Triton image's CUDA build of the onnxruntime release the
# tests run (onnxruntime), which this machine (no GPU) cannot install.
IMAGE_ONLY = {"onnxruntime-gpu"}


def pins() -> dict[str, str]:
    found = {}
    for line in VERSIONS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line}: versions.txt pins exact versions"
            found[canonical(requirement.name)] = spec.version
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_installs(path: Path) -> list[str]:
    """The arguments of every `pip install` in a Dockerfile's RUN lines."""
    found = []
    for instruction, args in instructions(path):
        if instruction == "RUN":
            for command in args.split("&&"):
                if re.search(r"\bpip install\b", command):
                    found.append(command.split("pip install", 1)[1])
    return found


@pytest.mark.parametrize("name", sorted(set(pins()) - IMAGE_ONLY))
def test_the_environment_runs_the_listed_version(name):
    assert metadata.version(name) == pins()[name], (
        f"{name}: installed {metadata.version(name)}, deploy/versions.txt says {pins()[name]}; "
        "run `make install`")


def test_the_gpu_onnxruntime_is_the_release_the_tests_run():
    listed = pins()
    assert listed["onnxruntime-gpu"] == listed["onnxruntime"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.triton"])
def test_every_image_install_is_constrained_by_the_list(dockerfile):
    path = ROOT / "deploy" / dockerfile
    # all but the CUDA torch of the Triton image (the list's one exception) and the
    # project's own wheel installed --no-deps
    installs = [args for args in pip_installs(path)
                if not ("--index-url" in args and "-c " not in args)
                and not all(w.startswith(("-", "/")) for w in args.split())]
    assert installs
    listed = pins()
    for args in installs:
        assert re.search(r"-c /tmp/(versions|constraints)\.txt", args), args
        for word in args.split():
            if word.startswith(("-", "/", '"', "https://")) or word.endswith(".whl"):
                continue
            # a package named, never a version of its own: the list decides
            assert "==" not in word and "<" not in word, f"{dockerfile}: {word} pins itself"
            if not word.startswith(("${", "/tmp")):
                assert canonical(word) in listed, f"{dockerfile}: {word} is not in the list"


def test_make_install_takes_the_list():
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"pip install (.*)", makefile)
    assert installs and all("-c deploy/versions.txt" in line for line in installs
                            if "--upgrade pip" not in line)
    assert re.search(r"^\$\(STAMP\): .*deploy/versions\.txt", makefile, re.M)
