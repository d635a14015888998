"""What the operator lets a resource ask for, as the operator's own configuration says.

The operator's ServiceAccount creates Deployments and Jobs in every namespace it serves, so
whoever may create an EmbeddingSearch or LLMService gets the pods it renders, whether or
not they may create pods themselves. Those pods meet the Pod Security Standard
"restricted" and run the project's images, unless the spec asks for a host path or
another image: those are the operator administrator's to allow, never the tenant's.

Read once when the operator starts (from its Deployment's environment, see deploy/) into
a frozen :class:`OperatorPolicy`, which the reconcile checks before anything is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tritonop.render.kubernetes import Images
from tritonop.resources import Resource

ALLOW_HOST_PATH = "TRITONOP_ALLOW_HOST_PATH"
ALLOWED_IMAGES = "TRITONOP_ALLOWED_IMAGES"
MAX_CORPUS_BYTES = "TRITONOP_MAX_CORPUS_BYTES"
DEFAULT_MAX_CORPUS_BYTES = 1 << 30


class PolicyError(ValueError):
    """The operator's configuration is not valid: the operator does not start."""


@dataclass(frozen=True)
class OperatorPolicy:
    """What a resource may ask for in this cluster.

    Attributes:
        allow_host_path: ``artifacts.hostPath`` is allowed (its pods then mount the node's
            filesystem, read-write in the prepare container, and meet no Pod Security level
            but privileged).
        allowed_images: images ``spec.image`` and ``artifacts.prepareImage`` may name: exact
            names, or prefixes when they end in ``/`` or ``:``. The operator's own images
            are always allowed.
        max_corpus_bytes: the largest corpus file in the operator image that the operator
            hashes for a resource.
    """

    allow_host_path: bool = False
    allowed_images: tuple[str, ...] = (Images().triton, Images().operator)
    max_corpus_bytes: int = DEFAULT_MAX_CORPUS_BYTES

    @classmethod
    def from_environment(cls, env: Mapping[str, str], images: Images) -> OperatorPolicy:
        """The policy the operator's environment sets; its own images are always allowed.

        Raises:
            PolicyError: a value that is not understood, naming the variable.
        """
        host_path = env.get(ALLOW_HOST_PATH, "false").strip().lower()
        if host_path not in ("true", "false"):
            raise PolicyError(f"{ALLOW_HOST_PATH} must be 'true' or 'false', got {host_path!r}")
        listed = [entry.strip() for entry in env.get(ALLOWED_IMAGES, "").split(",")]
        raw_bytes = env.get(MAX_CORPUS_BYTES, str(DEFAULT_MAX_CORPUS_BYTES)).strip()
        if not raw_bytes.isdigit() or int(raw_bytes) < 1:
            raise PolicyError(f"{MAX_CORPUS_BYTES} must be a positive number of bytes, "
                              f"got {raw_bytes!r}")
        own = (images.triton, images.operator)
        return cls(allow_host_path=host_path == "true",
                   allowed_images=tuple(dict.fromkeys([*own, *filter(None, listed)])),
                   max_corpus_bytes=int(raw_bytes))

    def allows_image(self, image: str) -> bool:
        """Whether ``image`` is one of :attr:`allowed_images`, or under one of its prefixes."""
        return any(image == entry or (entry.endswith(("/", ":")) and image.startswith(entry))
                   for entry in self.allowed_images)

    def refusals(self, resource: Resource) -> list[str]:
        """One line per field this policy does not allow, naming the setting that would."""
        spec, found = resource.spec, []
        if spec.artifacts.host_path is not None and not self.allow_host_path:
            found.append(
                f"spec.artifacts.hostPath: this operator does not allow host paths (a pod that "
                f"mounts the node's filesystem); its administrator can, with {ALLOW_HOST_PATH}"
                "=true; use a persistentVolumeClaim instead")
        for field, image in (("spec.image", spec.image),
                             ("spec.artifacts.prepareImage", spec.artifacts.prepare_image)):
            if image is not None and not self.allows_image(image):
                found.append(
                    f"{field}: {image!r} is not an image this operator runs; its administrator "
                    f"can allow it in {ALLOWED_IMAGES} (comma-separated names, or prefixes "
                    "ending in '/' or ':')")
        return found



DEFAULT_POLICY = OperatorPolicy()  # deploy/'s defaults: no host path, the project's images
