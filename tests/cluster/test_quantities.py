"""Quantities on the real API server: the CRD's pattern is kube-apiserver's own grammar.

A quantity the CRD let through and the API server could not parse was answered with a 500
on the operator's Deployment (``cpu: fast``), retried in silence. Here each value goes to
kube-apiserver twice in one server-side dry run: as a ResourceQuota's hard limit (parsed by
resource.Quantity itself, the independent reference) and as an EmbeddingSearch's cpu
request (checked by our CRD). The CRD must take exactly the non-negative quantities the
server parses, and refuse the rest naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.cluster.conftest import NAMESPACE
from tests.cluster.helpers import EXAMPLES
from tests.support.cluster import ControlPlane
from tests.unit.test_quantities import QUANTITIES

# Beyond tests/unit's values: what the server's own parser has to say about edge cases.
EDGES: list[Any] = ["0", "1m", "1n", "1u", "1k", "1K", "1Ki", "1Ei", "1P", "1T", "1e+3",
                    "1E-2", "0.000001", "12345678901234567890", "1.2.3", "1mi", "1Mi1",
                    "--1", "1 ", "e3", ".", "+.5", "1e03"]
TYPOS = [" 64Mi", "64Mi ", "1 ", ".", "Mi", "e3"]
# JSON numbers other than integers are left out: the server parses 1.5 as a quantity, which
# the CRD (int-or-string, as the operator's spec model) refuses on purpose ("1.5" is taken).
VALUES = [value for value, _, _ in QUANTITIES if not isinstance(value, float)] + EDGES


def dry_run(cluster: ControlPlane, objects: list[dict[str, Any]]):
    """A server-side dry run of ``kubectl create``, sent as JSON (YAML would turn 1e3 into
    a number before the server saw the text)."""
    items = {"apiVersion": "v1", "kind": "List", "items": objects}
    return cluster.kubectl("create", "--dry-run=server", "-n", NAMESPACE, "-f", "-",
                           input=json.dumps(items), check=False)


def accepted(cluster: ControlPlane, objects: list[dict[str, Any]]) -> set[str]:
    """Names of the objects a server-side dry run of ``kubectl create`` accepts."""
    result = dry_run(cluster, objects)
    return set(re.findall(r"^\S+/(\S+) created", result.stdout, re.MULTILINE))


def quota(index: int, value: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": f"q{index}"},
            "spec": {"hard": {"cpu": value}}}


def search(index: int, value: Any) -> dict[str, Any]:
    return {"apiVersion": EXAMPLES["EmbeddingSearch"]["apiVersion"], "kind": "EmbeddingSearch",
            "metadata": {"name": f"q{index}"},
            "spec": {"corpus": {"source": "c.jsonl"}, "resources": {"requests": {"cpu": value}}}}


def test_the_crd_takes_exactly_the_quantities_the_server_parses(cluster):
    parsed = accepted(cluster, [quota(i, v) for i, v in enumerate(VALUES)])
    taken = accepted(cluster, [search(i, v) for i, v in enumerate(VALUES)])
    assert parsed and taken, "the dry runs accepted nothing: check the test"
    value = {f"q{i}": v for i, v in enumerate(VALUES)}
    # Never a quantity the server cannot parse (that was the 500 on the Deployment).
    assert sorted(repr(value[name]) for name in taken - parsed) == []
    # Stricter only where the text is most likely a typo: the server's parser trims spaces
    # and reads a missing number as 0 ("Mi", "e3", "."); the CRD, like controller-gen's
    # quantity pattern, wants a number.
    assert sorted(value[name] for name in parsed - taken) == sorted(TYPOS)


@pytest.mark.parametrize("value", ["fast", "4 GB", "-1"])
def test_an_invalid_request_is_refused_naming_the_field(cluster, value):
    result = dry_run(cluster, [search(0, value)])
    assert result.returncode != 0
    assert f'spec.resources.requests.cpu: Invalid value: "{value}"' in result.stderr


def test_every_size_the_crd_takes_is_a_quantity_the_server_parses(cluster):
    sized = [{**search(i, "1"), "spec": {"corpus": {"source": "c.jsonl"},
                                         "cache": {"enabled": True, "size": v}}}
             for i, v in enumerate(VALUES)]
    taken = accepted(cluster, sized)
    parsed = accepted(cluster, [quota(i, v) for i, v in enumerate(VALUES)])
    assert taken and sorted(repr(VALUES[int(name[1:])]) for name in taken - parsed) == []
