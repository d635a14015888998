"""The operator: kopf handlers over a level-based reconciler.

``handlers`` holds thin kopf decorators; ``reconcile`` makes the API calls;
``observe`` turns what it saw into a status without touching the API; ``kube`` is the
small Kubernetes API layer they share. Manifests come from :mod:`tritonop.render`.
"""
