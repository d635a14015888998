"""Quantities: the CRD's pattern and the spec model give the same answer for every value.

The API server cannot convert ``cpu: fast`` into a Deployment (it answered the operator's
apply with a 500), so a quantity is refused at ``kubectl apply`` by the CRD, and by the
model for ``tritonop serve`` and the operator, with the field named. The pattern itself is
checked against kube-apiserver's own parser in tests/cluster/test_quantities.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.crd_schema import validation_errors
from tritonop.crd import custom_resource_definition
from tritonop.resources import ResourceError, parse_resource
from tritonop.spec import EmbeddingSearchSpec

CRD = custom_resource_definition("EmbeddingSearch")

# (value, valid as a container's request, valid as a size in bytes)
QUANTITIES: list[tuple[Any, bool, bool]] = [
    ("500m", True, False), ("2", True, True), (2, True, True), ("1.5", True, True),
    (".5", True, False), ("1.", True, False), ("4Gi", True, True), ("64Mi", True, True),
    ("1G", True, True), ("1e3", True, False), ("1E3", True, False), ("2E", True, False),
    ("+1", True, False), ("1e-3", True, False), (0, True, False), ("0", True, False),
    ("0Mi", True, False), ("0.0Gi", True, False), ("0.5Gi", True, True), ("10", True, True),
    ("007Mi", True, True),
    ("fast", False, False), ("4 GB", False, False), ("4GB", False, False),
    (" 64Mi", False, False), ("64Mi ", False, False), ("-1", False, False), (-1, False, False),
    ("1e", False, False), ("1e1.5", False, False), ("1ki", False, False), ("", False, False),
    ("1..2", False, False), ("Mi", False, False), (True, False, False), (1.5, False, False),
]


def body(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
            "metadata": {"name": "q"}, "spec": {"corpus": {"source": "c.jsonl"}, **spec}}


def verdicts(spec: dict[str, Any], field: str) -> tuple[bool, bool, str]:
    """(the CRD accepts it, the model accepts it, the model's message)."""
    crd_ok = validation_errors(CRD, body(spec)) == []
    try:
        parse_resource(body(spec))
    except ResourceError as err:
        assert field in str(err), str(err)
        return crd_ok, False, str(err)
    return crd_ok, True, ""


@pytest.mark.parametrize(("value", "valid", "_"), QUANTITIES, ids=repr)
def test_a_request_is_accepted_by_the_crd_exactly_when_by_the_model(value, valid, _):
    crd_ok, model_ok, message = verdicts({"resources": {"requests": {"cpu": value}}},
                                         "spec.resources.requests.cpu")
    assert (crd_ok, model_ok) == (valid, valid), message
    if not valid and isinstance(value, str):
        assert "such as 500m, 2 or 4Gi" in message


@pytest.mark.parametrize(("value", "_", "valid"), QUANTITIES, ids=repr)
def test_a_size_is_accepted_by_the_crd_exactly_when_by_the_model(value, _, valid):
    for spec, field in (({"cache": {"size": value}}, "spec.cache.size"),
                        ({"artifacts": {"emptyDir": {"sizeLimit": value}, "prepare": "perPod"}},
                         "spec.artifacts.emptyDir.sizeLimit")):
        crd_ok, model_ok, message = verdicts(spec, field)
        assert (crd_ok, model_ok) == (valid, valid), (spec, message)


def test_a_size_given_as_a_number_of_bytes_is_kept_as_a_quantity_string():
    spec = parse_resource(body({"cache": {"size": 1048576}})).spec
    assert isinstance(spec, EmbeddingSearchSpec) and spec.cache.size == "1048576"


@pytest.mark.parametrize(("resources", "accepted"), [
    ({"requests": {"cpu": 1, "memory": "1Gi", "ephemeral-storage": "10Gi",
                   "hugepages-2Mi": "64Mi", "example.com/fpga": 1}}, True),
    ({"limits": {"memory": "1Gi", "example.com/fpga": 1}}, True),
    ({"requests": {"cpus": 1}}, False),
    ({"limits": {"gpu": 1}}, False),
    ({"requests": {"nvidia.com/gpu": 1}}, False),
    ({"limits": {"nvidia.com/gpu": 2}}, False),
    ({"requests": {f"example.com/r{i}": 1 for i in range(17)}}, False),
])
def test_resource_names_are_checked_alike(resources, accepted):
    crd_ok, model_ok, message = verdicts({"resources": resources}, "spec.resources")
    assert (crd_ok, model_ok) == (accepted, accepted), message
