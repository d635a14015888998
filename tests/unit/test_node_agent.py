"""The node agent's pure parts: quantities and the pod fields it refuses by name."""

from __future__ import annotations

import copy

import pytest

from tests.support.cluster import ROOT
from tests.support.node_agent import quantity, unsupported_fields
from tritonop.render.kubernetes import render_children
from tritonop.resources import iter_resources


@pytest.mark.parametrize(("text", "value"), [
    ("500m", 0.5), ("2", 2.0), ("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1k", 1000.0),
    ("64Mi", 64 * 2**20), (3, 3.0)])
def test_quantity(text, value):
    assert quantity(text) == value


def rendered_pod() -> dict:
    (news,) = iter_resources([ROOT / "examples" / "news-search.yaml"])
    deployment = next(c for c in render_children(news) if c["kind"] == "Deployment")
    return {"spec": deployment["spec"]["template"]["spec"]}


def test_the_rendered_pod_is_supported():
    assert unsupported_fields(rendered_pod()) is None


@pytest.mark.parametrize(("change", "named"), [
    (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    (lambda s: s.update(readinessGates=[{"conditionType": "x"}]), "readinessGates"),
    (lambda s: s["containers"][0].update(tty=True), "tty"),
    (lambda s: s["containers"][0].update(lifecycle={"postStart": {"exec": {}}}), "postStart"),
    (lambda s: s["containers"][0]["resources"].update(limits={"nvidia.com/gpu": 1}),
     "nvidia.com/gpu"),
    (lambda s: s["containers"][0].update(lifecycle={"preStop": {"tcpSocket": {}}}),
     "tcpSocket"),
])
def test_a_field_it_cannot_honour_is_named(change, named):
    pod = copy.deepcopy(rendered_pod())
    change(pod["spec"])
    message = unsupported_fields(pod)
    assert message is not None and named in message


def test_pre_stop_exec_is_supported():
    pod = rendered_pod()
    pod["spec"]["containers"][1]["lifecycle"] = {"preStop": {"exec": {"command": ["true"]}}}
    assert unsupported_fields(pod) is None
