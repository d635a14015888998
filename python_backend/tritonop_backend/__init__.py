"""Logic that runs inside Triton's Python backend, kept free of Triton itself.

Everything here is plain numpy/torch code that the tests import directly. Only
the adapters in :mod:`tritonop_backend.models` import ``triton_python_backend_utils``;
they are copied into the rendered model repository as each model's ``model.py``.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tritonop")
except _metadata.PackageNotFoundError:  # imported from a source tree, not installed
    __version__ = "unknown"


class ReleaseMismatch(RuntimeError):
    """The model.py adapters and this library come from different tritonop releases."""


def check_release(rendered: str | None) -> None:
    """Fail a model's load when its adapter was rendered by another tritonop release.

    The operator ships the ``model.py`` adapters in the ConfigMap, while this library is
    baked into the Triton image: an operator upgraded without the image (or the reverse)
    would otherwise fail later in some less obvious way, or serve subtly differently.

    Raises:
        ReleaseMismatch: naming both versions and what to change.
    """
    if rendered != __version__:
        raise ReleaseMismatch(
            f"model.py was rendered by tritonop {rendered or 'unknown'} but the Triton image "
            f"has tritonop_backend {__version__}: use the Triton image of the operator's "
            f"release (ghcr.io/tritonop/triton:{rendered}) or set spec.image to it")
