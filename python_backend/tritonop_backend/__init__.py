"""Logic that runs inside Triton's Python backend, kept free of Triton itself.

Everything here is plain numpy/torch code that the tests import directly. Only
the adapters in :mod:`tritonop_backend.models` import ``triton_python_backend_utils``;
they are copied into the rendered model repository as each model's ``model.py``.
"""
