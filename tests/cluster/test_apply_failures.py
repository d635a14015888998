"""A child the real API server keeps refusing: the status, the condition and one Event say
which child, why, and what was left in place.

A request of an extended resource without its limit (``example.com/fpga: 1``) is valid
for the CRD and the operator, and refused by the server's Deployment validation: such a
resource cannot be overcommitted. (A request above its limit, which this test used before,
is now refused by the operator itself, naming ``spec.resources``.)
"""

from __future__ import annotations

import time

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import children, condition, delete, events, example, wait_status

ES = "EmbeddingSearch"
SERVER_MESSAGE = "Limit must be set for non overcommitable resources"


def test_a_refused_deployment_names_itself_and_the_children_kept(cluster, live_operator):
    name = "over-limit"
    cluster.apply(example(ES, name, NAMESPACE,
                          resources={"requests": {"example.com/fpga": "1"}}))
    try:
        resource = wait_status(cluster, ES, name, NAMESPACE,
                               lambda r: (r.get("status") or {}).get("phase") == "Failed",
                               "Failed", timeout=60)
        rendered = condition(resource, "ConfigRendered")
        assert (rendered["status"], rendered["reason"]) == ("False", "ApplyRejected")
        message = resource["status"]["message"]
        assert message.startswith(f"the API server refused Deployment '{name}-triton' (422): ")
        assert SERVER_MESSAGE in message
        assert "(applied before it, and kept: " in message and f"Service '{name}'" in message
        kept = children(cluster, NAMESPACE, name)
        assert kept.get("Service") and kept.get("ConfigMap") and not kept.get("Deployment")
        # Refused again at each backoff, with no new Event while the answer stays the same.
        time.sleep(3 * live_operator.resync_seconds)
        warnings = [e for e in events(cluster, NAMESPACE, name)
                    if e["type"] == "Warning" and SERVER_MESSAGE in e.get("message", "")]
        assert len(warnings) == 1 and warnings[0].get("count", 1) == 1, warnings
    finally:
        delete(cluster, ES, name, NAMESPACE)
