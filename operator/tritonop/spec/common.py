"""Spec pieces that both custom resources share."""

from __future__ import annotations

from typing import Union

from pydantic import Field

from tritonop.spec.base import SpecModel


class StageSettings(SpecModel):
    """Dynamic batching and instances of one Triton model.

    Rendered into the model's ``config.pbtxt``: ``max_batch_size``,
    ``dynamic_batching.max_queue_delay_microseconds``,
    ``dynamic_batching.default_queue_policy.max_queue_size`` (a full queue answers
    HTTP 503 / gRPC UNAVAILABLE at once instead of letting latency grow without bound)
    and ``instance_group.count``.
    """

    max_batch_size: int = Field(32, ge=1, le=4096, description="Most rows in one batch.")
    max_queue_delay_microseconds: int = Field(
        0, ge=0, le=10_000_000,
        description="How long a batch may wait for more requests when it cannot fill up.",
    )
    max_queue_size: int = Field(
        512, ge=1, le=1_000_000, description="Requests queued before new ones get 503."
    )
    instances: int = Field(1, ge=1, le=64, description="Model instances (processes).")


class ResourceRequirements(SpecModel):
    """Kubernetes container resources, passed through to the Triton container."""

    requests: dict[str, Union[str, int]] = Field(default_factory=dict)
    limits: dict[str, Union[str, int]] = Field(default_factory=dict)


class DeploymentSpec(SpecModel):
    """How the Triton deployment that serves a resource runs in a cluster."""

    replicas: int = Field(1, ge=0, le=1000, description="Triton pods.")
    image: str | None = Field(
        None, min_length=1, description="Triton image. Default: the project's image."
    )
    resources: ResourceRequirements = ResourceRequirements()
