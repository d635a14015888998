"""The status schema in the CRDs, as a real API server and server-side apply read it."""

from __future__ import annotations

import pytest

from tritonop.crd import KINDS, custom_resource_definition


def status_schema(kind: str) -> dict:
    version = custom_resource_definition(kind)["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]["properties"]["status"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conditions_are_a_map_keyed_by_type(kind):
    conditions = status_schema(kind)["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    # A map key must be required (or defaulted), or the API server refuses the CRD.
    assert "type" in conditions["items"]["required"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_last_transition_time_is_a_date_time(kind):
    item = status_schema(kind)["properties"]["conditions"]["items"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
