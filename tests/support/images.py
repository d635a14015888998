"""Environments that hold only what each image installs, for the pod runner's image stand-ins.

The pod runner stands in for the operator and Triton images with this machine's files. Their
Python environments are not the development venv (every test and bench package): each is a
virtual environment (``python -m venv --without-pip``, this machine's interpreter) whose
site-packages links to exactly the distributions that image's ``pip install`` lines give,
read from ``deploy/Dockerfile.*``, with the dependency closure pip would add (the
``Requires-Dist`` of the development venv's installed distributions, markers evaluated; not
for ``--no-deps`` installs). So an import that the image lacks fails in the stand-in too.

* The project's wheel holds both packages, ``tritonop`` and ``tritonop_backend`` (only
  ``.py`` files, so linking the source folders gives what the wheel does). The operator
  image installs it with its dependencies; the Triton image with ``--no-deps``, so there
  ``import tritonop_backend`` works and ``import kopf`` does not.
* ``onnxruntime-gpu`` is stood in for by ``onnxruntime`` (the CPU build of the same release,
  the same ``onnxruntime`` package and dependencies): this machine has no GPU.
* Packages of the base image's own Python that a Dockerfile does not install are added from
  :data:`BASE_PACKAGES` (the NGC image's ``python3`` comes with pip, setuptools and wheel);
  a ``python -m venv`` in a Dockerfile seeds pip (and setuptools before Python 3.12).
* Console scripts (``tritonop``) are written for the environment's ``python`` at the path the
  image has it (``/opt/tritonop/bin/python``), so they run inside a container only.

Each environment is built once per set of inputs (this module, the Dockerfile, the installed
distributions) under ``<venv>/stand-in-images/`` and reused: no download, a few hundred links.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import re
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
import tomllib
import venv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": ROOT / "deploy" / "Dockerfile.operator",
               "triton": ROOT / "deploy" / "Dockerfile.triton"}
PROJECT = "tritonop"
PROJECT_PACKAGES = {"tritonop": ROOT / "operator" / "tritonop",
                    "tritonop_backend": ROOT / "python_backend" / "tritonop_backend"}
STAND_INS = {"onnxruntime-gpu": "onnxruntime"}
"""A GPU build the image installs -> the CPU build of the same release that stands in here."""
BASE_PACKAGES = {"operator": (), "triton": ("pip", "setuptools", "wheel")}
"""Python packages that the image's base has before its Dockerfile installs anything."""
CACHE = Path(sys.prefix) / "stand-in-images"
# pip's options that take a value, and the flags the Dockerfiles use; anything else is
# refused, so that a new option cannot silently change what the stand-ins hold.
_VALUE_OPTIONS = {"-c", "--constraint", "--index-url", "-i", "--extra-index-url",
                  "-f", "--find-links"}
_FLAGS = {"--no-deps", "--no-cache-dir", "--upgrade", "-U", "--break-system-packages"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?")


@dataclass(frozen=True)
class PipInstall:
    """One ``pip install`` of a Dockerfile."""

    requirements: tuple[str, ...]  # names with their extras, versions left out
    project: bool  # the project's wheel (``/dist/*.whl``, ``.``)
    no_deps: bool


def logical_lines(dockerfile: Path) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += stripped.removesuffix("\\").strip() + " "
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def _commands(dockerfile: Path) -> list[list[str]]:
    """Every shell command of the Dockerfile's ``RUN`` lines, split into words as a shell
    splits them (``&&``, ``||``, ``;``, ``|`` and braces end a command)."""
    commands = []
    for line in logical_lines(dockerfile):
        word, _, rest = line.partition(" ")
        if word.upper() != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "{", "}"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
    return commands


def pip_installs(dockerfile: Path) -> list[PipInstall]:
    """The ``pip install`` commands of a Dockerfile, in order.

    Raises:
        ValueError: an option or argument this reader does not know (so that the stand-ins
            never silently miss what an image installs).
    """
    installs = []
    for words in _commands(dockerfile):
        if "pip" not in words or words[words.index("pip") + 1:words.index("pip") + 2] != [
                "install"]:
            continue
        arguments = words[words.index("pip") + 2:]
        requirements, project, no_deps = [], False, False
        index = 0
        while index < len(arguments):
            argument = arguments[index]
            if argument in _VALUE_OPTIONS:
                index += 2
                continue
            if argument.startswith("-"):
                if argument not in _FLAGS:
                    raise ValueError(f"{dockerfile.name}: pip install option {argument} is "
                                     "not known to tests/support/images.py")
                no_deps = no_deps or argument == "--no-deps"
            elif argument == "." or argument.endswith(".whl"):
                project = True
            else:
                match = _NAME.match(argument)
                if match is None:
                    raise ValueError(f"{dockerfile.name}: cannot read requirement {argument!r}")
                requirements.append(match.group(0))
            index += 1
        installs.append(PipInstall(tuple(requirements), project, no_deps))
    return installs


def seeded_packages(dockerfile: Path) -> list[str]:
    """What ``python -m venv`` in the Dockerfile puts in the environment it makes."""
    for words in _commands(dockerfile):
        if words[1:3] == ["-m", "venv"] and "--without-pip" not in words:
            return ["pip", *(["setuptools"] if sys.version_info < (3, 12) else [])]
    return []


def installed(site_packages: Path | None = None) -> dict[str, metadata.Distribution]:
    """The development venv's distributions by canonical name."""
    path = site_packages or Path(sysconfig.get_paths()["purelib"])
    return {canonicalize_name(d.metadata["Name"]): d
            for d in metadata.distributions(path=[str(path)])}


def _requires(name: str, distribution: metadata.Distribution) -> list[str]:
    """A distribution's ``Requires-Dist``; the project's from pyproject.toml, which its
    wheel is built from (the development venv's editable install may predate a change)."""
    if name == PROJECT:
        with (ROOT / "pyproject.toml").open("rb") as file:
            return list(tomllib.load(file)["project"]["dependencies"])
    return list(distribution.requires or [])


def dependency_closure(roots: Iterable[str], available: Mapping[str, metadata.Distribution],
                       no_deps: Iterable[str] = ()) -> set[str]:
    """Canonical names of ``roots`` (requirement names with extras) and what they require.

    Markers are evaluated for this interpreter and the requested extras. ``no_deps``: roots
    installed without their dependencies.

    Raises:
        LookupError: a required distribution that the development venv does not have.
    """
    skip = {canonicalize_name(name) for name in no_deps}
    found: set[str] = set()
    missing: list[str] = []
    queue = [(Requirement(root), None) for root in roots]
    seen_extras: dict[str, set[str]] = {}
    while queue:
        requirement, wanted_by = queue.pop()
        name = canonicalize_name(requirement.name)
        name = STAND_INS.get(name, name)
        extras = set(requirement.extras)
        if name in found and extras <= seen_extras.get(name, set()):
            continue
        distribution = available.get(name)
        if distribution is None:
            missing.append(f"{name} (required by {wanted_by or 'the Dockerfile'})")
            continue
        found.add(name)
        seen_extras.setdefault(name, set()).update(extras)
        if name in skip:
            continue
        for text in _requires(name, distribution):
            dependency = Requirement(text)
            if dependency.marker is None or any(
                    dependency.marker.evaluate({"extra": extra}) for extra in extras | {""}):
                queue.append((dependency, name))
    if missing:
        raise LookupError("the image installs what the development venv lacks: "
                          + ", ".join(sorted(missing)))
    return found


def image_distributions(image: str, available: Mapping[str, metadata.Distribution]
                        ) -> tuple[set[str], bool]:
    """Canonical names of the distributions ``image`` holds, and whether it has the project."""
    dockerfile = DOCKERFILES[image]
    names: set[str] = set()
    has_project = False
    for install in pip_installs(dockerfile):
        roots = list(install.requirements)
        if install.project:
            has_project = True
            roots.append(PROJECT)
        names |= dependency_closure(roots, available,
                                    no_deps=roots if install.no_deps else ())
    base = [*seeded_packages(dockerfile), *BASE_PACKAGES[image]]
    names |= dependency_closure([b for b in base if canonicalize_name(b) in available],
                                available)
    return names, has_project


def _top_level(distribution: metadata.Distribution) -> list[tuple[str, ...]]:
    """The distribution's files inside site-packages, as path parts."""
    return [tuple(Path(str(f)).parts) for f in distribution.files or []
            if not str(f).startswith("..")]


def link_site_packages(target: Path, site_packages: Path, wanted: set[str],
                       available: Mapping[str, metadata.Distribution]) -> None:
    """Fill ``target`` with links to the files of the ``wanted`` distributions.

    A folder whose every file belongs to wanted distributions is one link; a folder shared
    with a distribution that is not wanted (a namespace package such as ``nvidia``, a
    top-level ``__pycache__``) is made here and its entries are linked one level down.
    """
    owners: dict[tuple[str, ...], set[str]] = {}
    for name, distribution in available.items():
        if name == PROJECT:  # its editable finder and .pth: the packages are linked instead
            continue
        for parts in _top_level(distribution):
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(name)
    made: set[tuple[str, ...]] = {()}  # folders made here, whose entries are looked at
    for prefix, names in sorted(owners.items()):
        if prefix[:-1] not in made or not names & wanted:
            continue
        path = target / Path(*prefix)
        if names <= wanted or not (site_packages / Path(*prefix)).is_dir():
            path.symlink_to(site_packages / Path(*prefix))
        else:
            path.mkdir(parents=True, exist_ok=True)
            made.add(prefix)


def _console_script(python: str, module: str, attribute: str) -> str:
    top = attribute.split(".")[0]
    return (f"#!{python}\nimport sys\nfrom {module} import {top}\n"
            f"if __name__ == '__main__':\n    sys.exit({attribute}())\n")


def build_environment(destination: Path, image: str, prefix: str,
                      site_packages: Path | None = None) -> None:
    """Make ``destination`` the environment of ``image`` that lives at ``prefix`` in it."""
    site_packages = site_packages or Path(sysconfig.get_paths()["purelib"])
    available = installed(site_packages)
    wanted, has_project = image_distributions(image, available)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(destination)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    target = destination / "lib" / version / "site-packages"
    link_site_packages(target, site_packages, wanted - {PROJECT}, available)
    scripts = []
    if has_project:
        for package, source in PROJECT_PACKAGES.items():
            (target / package).symlink_to(source)
        project = available[PROJECT]
        (target / Path(project._path).name).symlink_to(project._path)  # type: ignore[attr-defined]
    for name in sorted(wanted):
        scripts += [e for e in available[name].entry_points if e.group == "console_scripts"]
    for entry in scripts:
        module, _, attribute = entry.value.partition(":")
        script = destination / "bin" / entry.name
        script.write_text(_console_script(f"{prefix}/bin/python", module.strip(),
                                          attribute.strip()))
        os.chmod(script, 0o755)
    for source, copied in copied_files(DOCKERFILES[image], prefix).items():
        (destination / copied).symlink_to(source)
    (destination / "image.txt").write_text(
        f"Stand-in for {DOCKERFILES[image].relative_to(ROOT)}'s Python environment at "
        f"{prefix}: {', '.join(sorted(wanted))}\n")


def copied_files(dockerfile: Path, prefix: str) -> dict[Path, str]:
    """What the Dockerfile's last stage copies from the repository into ``prefix``:
    source -> path relative to ``prefix`` (``COPY examples/ /opt/tritonop/examples/``)."""
    lines = logical_lines(dockerfile)
    last = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    copied = {}
    for line in lines[last + 1:]:
        words = shlex.split(line)
        if words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        *sources, destination = words[1:]
        if destination.rstrip("/").startswith(prefix + "/") and len(sources) == 1:
            copied[ROOT / sources[0].rstrip("/")] = destination.rstrip("/")[len(prefix) + 1:]
    return copied


def _fingerprint(image: str, site_packages: Path) -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(DOCKERFILES[image].read_bytes())
    digest.update((ROOT / "pyproject.toml").read_bytes())
    digest.update(f"{sys.base_prefix} {sys.version} {site_packages}".encode())
    for entry in sorted(os.listdir(site_packages)):
        if entry.endswith((".dist-info", ".egg-info")):
            digest.update(entry.encode())
            record = site_packages / entry / "RECORD"
            if record.exists():
                digest.update(str(record.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:16]


def image_environment(image: str, prefix: str) -> Path:
    """The environment of ``image`` (``operator`` or ``triton``), built once and reused.

    ``prefix``: where the container sees it (its scripts' ``#!`` line).
    """
    site_packages = Path(sysconfig.get_paths()["purelib"])
    key = hashlib.sha256(prefix.encode()).hexdigest()[:6]
    final = CACHE / f"{image}-{key}-{_fingerprint(image, site_packages)}"
    if final.exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{image}-", dir=CACHE))
    try:
        build_environment(building / "env", image, prefix, site_packages)
        if (destination := building / "env").exists():
            try:
                os.rename(destination, final)
            except OSError:  # another process built it meanwhile
                if not final.exists():
                    raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    os.chmod(final, 0o755)
    _prune(final)
    return final


def _prune(current: Path, age: float = 6 * 3600) -> None:
    """Remove this image's environments of earlier inputs, once no pod can still use them
    (the longest test module runs well under ``age``)."""
    stem = current.name.rsplit("-", 1)[0]
    for old in current.parent.glob(f"{stem}-*"):
        if old != current and time.time() - old.stat().st_mtime > age:
            shutil.rmtree(old, ignore_errors=True)
