"""Pure renderers: a validated resource in, files or Kubernetes manifests out.

Nothing here talks to a cluster, reads a clock or draws random numbers, so the same
resource always renders to the same bytes; the operator, ``tritonop serve`` and the
tests all rely on that.
"""
