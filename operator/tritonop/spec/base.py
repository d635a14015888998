"""Shared building blocks of the custom resources' spec models.

The spec models are the single source of truth for a resource's shape: the CRD's
OpenAPI schema is generated from them, the renderers consume them, and the CLI
validates YAML with them. Hence: camelCase field names as Kubernetes users expect,
``extra="forbid"`` so that a typo is an error rather than a silently ignored field,
and frozen instances so that rendering can never mutate its input.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """Base of every spec object: camelCase aliases, no unknown fields, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )


_QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$"
_QUANTITY = re.compile(_QUANTITY_PATTERN)
# A size above zero: a zero-byte claim, volume or cache is refused on the child, or useless.
_SIZE_PATTERN = (r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)"
                 r"(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_SIZE = re.compile(_SIZE_PATTERN)
_FACTORS = {
    None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}


def quantity_bytes(value: str | int) -> int:
    """Bytes in a Kubernetes memory quantity such as ``"64Mi"`` or ``"1G"``."""
    if isinstance(value, int):
        return value
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a quantity such as 512Mi or 2Gi")
    return int(float(match[1]) * _FACTORS[match[3]])


def _check_quantity(value: Any) -> Any:
    """A size in bytes (``512Mi``, ``2Gi``, 1000000), as the CRD's pattern takes it: no
    spaces, no other suffix (an ``m`` suffix or an exponent means nothing for bytes here)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a quantity such as 512Mi or 2Gi")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value} is not a size above zero such as 512Mi or 2Gi")
        return str(value)
    if not _SIZE.match(value):
        raise ValueError(f"{value!r} is not a quantity such as 512Mi or 2Gi (a number above "
                         "zero, then Ki, Mi, Gi, Ti, k, M, G or T)")
    return value


MemoryQuantity = Annotated[
    Union[str, int],
    BeforeValidator(_check_quantity),
    Field(json_schema_extra={"pattern": _SIZE_PATTERN, "minimum": 1}),
]


# A resource amount as the API server parses it (resource.Quantity, whose parse error quotes
# the looser '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'): a decimal number with an
# optional binary (Ki..Ei) or decimal (n, u, m, k, M..E) suffix or an integer exponent.
# No minus sign: a container's requests and limits must not be negative (the API server
# would refuse the Deployment with a 422). tests/cluster/test_quantities.py checks this
# pattern against the API server's own parser.
_K8S_QUANTITY_PATTERN = (r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
                         r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$")
_K8S_QUANTITY = re.compile(_K8S_QUANTITY_PATTERN)


_SCALES = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
           "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
           "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
           "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60)}


def resource_amount(value: str | int) -> Decimal:
    """A container resource quantity (``500m``, ``2``, ``4Gi``, ``1e3``) as a number, to
    compare a request with a limit as the API server does."""
    text = str(value).strip().lstrip("+")
    match = re.fullmatch(r"([0-9]*\.?[0-9]*)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?", text)
    if not match or not match[1].strip("."):
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    suffix = match[2] or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(match[1]) * Decimal(10) ** int(suffix[1:])
    return Decimal(match[1]) * _SCALES[suffix]


def _check_resource_quantity(value: Any) -> Any:
    """A resource amount as a container's requests and limits take it (``500m``, ``4Gi``, 2).

    Checked here and by the CRD's pattern: the API server cannot convert ``cpu: fast`` into
    a Deployment, and would answer the operator's apply with a 500, not the user.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a quantity such as 500m, 2 or 4Gi")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{value} is negative: requests and limits are >= 0")
    if isinstance(value, str) and not _K8S_QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 500m, 2 or 4Gi "
                         "(a number >= 0, then an optional suffix: m, k, M, G, Ki, Mi, Gi...)")
    return value


ResourceQuantity = Annotated[
    Union[str, int],
    BeforeValidator(_check_resource_quantity),
    Field(json_schema_extra={"pattern": _K8S_QUANTITY_PATTERN, "minimum": 0}),
]


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """``x-kubernetes-validations`` for a model's CRD schema.

    Cross-field rules are enforced twice: by a pydantic validator (CLI, operator) and by
    the API server through these CEL rules, with the same message; the tests evaluate
    both on the same invalid resources.
    """
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}
                                         for rule, message in rules]}


def describe_errors(error: ValidationError, prefix: str = "spec") -> str:
    """One line per problem, each naming the field path the user wrote in YAML.

    Example: ``spec.search.defaultTopK: must be <= spec.search.maxTopK (100)``.
    """
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join([prefix, *(str(part) for part in item["loc"])])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; fields are camelCase)"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)
