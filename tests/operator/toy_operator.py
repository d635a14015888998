"""A throwaway kopf operator that drives the emulator the way tritonop will.

For each EmbeddingSearch it server-side-applies one owned ConfigMap through the
``kubernetes`` client (so the kubeconfig plumbing is exercised too) and reports
the handled generation in ``status``. Its delete handler only exists to make
kopf put a finalizer on the object and remove it on deletion.
"""

from typing import Any

import kopf
import kubernetes

GROUP, VERSION, PLURAL = "serving.tritonop.dev", "v1alpha1", "embeddingsearches"
FIELD_MANAGER = "toy-operator"


def config_map_name(owner_name: str) -> str:
    """Deterministic child name, so that every run writes the same object."""
    return f"{owner_name}-config"


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def reconcile(
    *, body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, name: str, namespace: str | None,
    patch: kopf.Patch, **_: Any,
) -> None:
    """Apply the child and record the handled generation."""
    assert namespace is not None, "EmbeddingSearch is namespaced"
    config_map: dict[str, Any] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": config_map_name(name)},
        "data": {"replicas": str(spec.get("replicas", 1))},
    }
    kopf.adopt(config_map, owner=body)
    client = kubernetes.config.new_client_from_config()  # type: ignore[no-untyped-call]
    api = kubernetes.client.CoreV1Api(client)
    api.patch_namespaced_config_map(
        config_map_name(name), namespace, config_map, field_manager=FIELD_MANAGER, force=True,
        _content_type="application/apply-patch+yaml",
    )
    patch.status["observedGeneration"] = meta["generation"]
    patch.status["phase"] = "Ready"


@kopf.on.delete(GROUP, VERSION, PLURAL)
def finalize(*, patch: kopf.Patch, **_: Any) -> None:
    """Leave a trace in the object's history that deletion went through kopf."""
    patch.status["phase"] = "Deleting"
