"""Starting the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel ships.

The wheel carries Triton 2.51 with its Python backend, one backend stub per Python
version, and the local response cache. Three details make it run from a virtual
environment without a container:

* the Python backend wants a backend directory holding ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub for the running interpreter: we
  assemble one from symlinks;
* the stub embeds Python and finds its ``sys.prefix`` by looking up ``python3`` on
  ``PATH``, ignoring ``PYTHONPATH``: putting this interpreter's ``bin`` first makes the
  stub see this virtual environment (its ``pyvenv.cfg`` and site-packages);
* the stub links ``libpython3.X.so``: this interpreter's own ``LIBDIR`` goes first on
  ``LD_LIBRARY_PATH``, so that a distribution's different patch release is not used.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import IO

READY_TIMEOUT_S = 600.0
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """tritonserver could not be found, started, or made ready."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps a server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def connect_host(host: str) -> str:
    """The host a client on this machine uses to reach a server listening on ``host``."""
    if host in ("", "0.0.0.0", "::", "localhost"):
        return "localhost"
    return f"[{host}]" if ":" in host else host


def triton_home() -> Path:
    """The ``tritonserver`` directory inside the installed ``nvidia-pytriton`` wheel."""
    spec = find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: pip install nvidia-pytriton "
                          "(it ships the tritonserver binary)")
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").exists():
        raise ServerError(f"{home} has no bin/tritonserver")
    return home


def make_backend_dir(destination: Path, home: Path | None = None) -> Path:
    """Assemble ``destination/python`` for ``--backend-directory``; returns ``destination``."""
    home = home or triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the Triton wheel has no Python backend stub for Python {version}")
    python = destination / "python"
    python.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": home / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": home / "backends" / "python"
        / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in links.items():
        link = python / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return destination


def server_environment(home: Path) -> dict[str, str]:
    """The environment that makes the server and its stubs use this virtual environment."""
    env = dict(os.environ)
    libraries = [str(home.parent.parent / "nvidia_pytriton.libs")]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / sysconfig.get_config_var("LDLIBRARY")).exists():
        libraries.insert(0, libdir)
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Each stub is its own process; keep BLAS and tokenizers from each starting one
    # thread per core. Models that compute set their own thread counts.
    env.setdefault("OMP_NUM_THREADS", "1")
    # Threads that spin while waiting steal the core another stub needs (measured: p99 of
    # a 2-thread encoder on 2 shared cores fell from 351 ms to 20 ms with PASSIVE).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class TritonServer:
    """A running ``tritonserver`` process over one model repository.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``address`` is where
    its HTTP, gRPC and metrics endpoints listen: loopback unless asked otherwise, since
    none of them takes a key and the repository API loads code.
    """

    repository: Path
    workdir: Path
    ports: Ports = field(default_factory=Ports)
    cache_bytes: int = 0
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()
    address: str = LOOPBACK
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{connect_host(self.address)}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.address)}:{self.ports.grpc}"

    def command(self) -> list[str]:
        home = triton_home()
        args = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={make_backend_dir(self.workdir / 'backends', home)}",
            f"--cache-directory={home / 'caches'}",
            f"--http-address={self.address}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.ports.metrics}",
            # Configs are complete as rendered; skipping auto-complete saves one stub
            # start per model.
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        if self.cache_bytes:
            args.append(f"--cache-config=local,size={self.cache_bytes}")
        return args + list(self.extra_args)

    def start(self, timeout: float = READY_TIMEOUT_S) -> TritonServer:
        """Start the server and wait until every model is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_path or self.workdir / "tritonserver.log"
        self._log = open(self.log_path, "wb")
        env = server_environment(triton_home())
        # Own session: a Ctrl-C in the terminal reaches us, and we stop Triton in order.
        self.process = subprocess.Popen(self.command(), stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """Ask Triton to finish in-flight requests and exit; kill it if it will not."""
        process, self.process = self.process, None
        code = None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
        elif process is not None:
            code = process.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
