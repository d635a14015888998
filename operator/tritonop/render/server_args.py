"""Arguments of ``tritonserver`` that the pods and ``tritonop serve`` share.

Triton's control APIs (model repository, model config, shared memory, statistics, trace,
logging) can load code into the server (a repository load with a ``model.py``) or take
its models away. Wherever Triton listens beyond its own host, they are restricted to
callers that send the admin key; inference, metadata and health stay open.
"""

from __future__ import annotations

ADMIN_HEADER = "triton-admin-key"
"""The HTTP header of the admin key. Over gRPC, Triton 2.51 expects it as the metadata
``triton-grpc-protocol-triton-admin-key``."""
ADMIN_KEY_ENV = "TRITONOP_TRITON_ADMIN_KEY"
"""The variable that holds the admin key: in a pod, from the admin Secret; locally, set by
the user (``tritonop serve --host`` beyond loopback)."""
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics",
                   "trace", "logging")
"""Every control API that Triton 2.51 can restrict; health, metadata and inference stay
open, since probes and clients use them."""


def restricted_api_args(key: str) -> list[str]:
    """``--http-restricted-api`` and ``--grpc-restricted-protocol`` for ``key``.

    ``key`` may be a ``$(VAR)`` reference, which the kubelet expands from the container's
    environment, so that the key itself is never in the pod spec. Triton splits the flag
    at ``,``, ``:`` and ``=``: a key must not contain them.
    """
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={key}"
    return [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
