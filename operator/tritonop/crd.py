"""CustomResourceDefinitions generated from the spec and status models.

One source of truth: the OpenAPI v3 schema of each CRD is derived from the same
pydantic models that the CLI and the operator validate with. ``make crds`` writes
``crds/``; a test fails when the files drift from this generator.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0
schema. The conversion inlines ``$ref``, turns ``Optional[X]`` into a non-required
``X``, ``str | int`` into ``x-kubernetes-int-or-string``, free-form objects into
``x-kubernetes-preserve-unknown-fields``, numeric exclusive bounds into v3.0's boolean
form, and keeps only the part of an object default that its fields do not already
default, so that the API server applies the same defaults as pydantic.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tritonop import API_GROUP, API_VERSION
from tritonop.render.yamltext import dump
from tritonop.resources import max_name_length
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec
from tritonop.status import ResourceStatus

Schema = dict[str, Any]
_KEPT = ("description", "minimum", "maximum", "minLength", "maxLength", "pattern", "enum",
         "minItems", "maxItems", "maxProperties", "format", "x-kubernetes-validations",
         "x-kubernetes-list-type", "x-kubernetes-list-map-keys")


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Inline a ``$ref`` (keeping the referrer's own description and default)."""
    if "$ref" in node:
        target = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return {**target, **extra}
    return node


def _minimal_default(value: Any, schema: Schema) -> Any:
    """Drop from an object default what the object's own field defaults give anyway."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    minimal = {}
    for key, item in value.items():
        field = schema["properties"].get(key, {})
        if field.get("default", None if item in (None, {}, []) else item) == item:
            continue  # the field's own default, or an empty value pydantic fills anyway
        minimal[key] = item
    return minimal


def to_structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Convert one pydantic JSON Schema node into a structural OpenAPI v3.0 node."""
    node = _resolve(node, defs)
    variants = node.get("anyOf")
    if variants is not None:
        concrete = [v for v in variants if v.get("type") != "null"]
        if {v.get("type") for v in concrete} == {"string", "integer"}:
            out: Schema = {"x-kubernetes-int-or-string": True}
            default = {"default": node["default"]} if node.get("default") is not None else {}
            return {**out, **{k: node[k] for k in _KEPT if k in node}, **default}
        if len(concrete) != 1:
            raise ValueError(f"cannot express a union of {concrete} in a structural schema")
        merged = {**_resolve(concrete[0], defs),
                  **{k: v for k, v in node.items() if k not in ("anyOf", "default")}}
        if node.get("default") is not None:
            merged["default"] = node["default"]
        return to_structural(merged, defs)
    out = {k: node[k] for k in _KEPT if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind is not None:
        out["type"] = kind
    for bound, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            out[inclusive] = node[bound]
            out[bound] = True
    if kind == "array":
        out["items"] = to_structural(node.get("items", {}), defs)
    if kind == "object":
        _object(node, defs, out)
    if "default" in node and node["default"] is not None:
        # The API server checks an object's CEL rules against its default as written,
        # before the fields' own defaults fill it in: such a default must be complete.
        out["default"] = _without_nulls(node["default"]) if "x-kubernetes-validations" in out \
            else _minimal_default(node["default"], out)
    return out


def _without_nulls(value: Any) -> Any:
    """A default without ``None`` values, which a structural schema cannot hold."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def _object(node: Schema, defs: dict[str, Schema], out: Schema) -> None:
    properties = node.get("properties")
    additional = node.get("additionalProperties")
    if properties:
        out["properties"] = {k: to_structural(v, defs) for k, v in properties.items()}
        required = [k for k in node.get("required", [])]
        if required:
            out["required"] = required
    elif isinstance(additional, dict):
        out["additionalProperties"] = to_structural(additional, defs)
    else:
        # Free-form Kubernetes objects (tolerations, affinity, peers): passed through.
        out["x-kubernetes-preserve-unknown-fields"] = True


def model_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of a pydantic model."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(schema, schema.pop("$defs", {}))


def _printer_columns() -> list[Schema]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


KINDS: dict[str, tuple[type[BaseModel], str, str, str]] = {
    # kind: (spec model, plural, singular, short name)
    "EmbeddingSearch": (EmbeddingSearchSpec, "embeddingsearches", "embeddingsearch", "esearch"),
    "LLMService": (LLMServiceSpec, "llmservices", "llmservice", "llm"),
}


def _name_rule(kind: str) -> Schema:
    """CEL at the root: names whose child names or labels would pass 63 characters."""
    limit = max_name_length(kind)
    return {"x-kubernetes-validations": [{
        "rule": f"self.metadata.name.size() <= {limit}",
        "message": f"metadata.name: at most {limit} characters for a {kind} (its child "
                   "objects' names and labels are derived from it and stop at 63)",
    }]}


def custom_resource_definition(kind: str) -> Schema:
    """The full CRD of one kind."""
    spec_model, plural, singular, short = KINDS[kind]
    spec_schema = model_schema(spec_model)
    spec_schema.pop("default", None)
    status_schema = model_schema(ResourceStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "tritonop"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": singular, "shortNames": [short], "categories": ["tritonop"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    **_name_rule(kind),
                    "description": spec_model.__doc__.strip().splitlines()[0]
                    if spec_model.__doc__ else kind,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas",
                              "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": _printer_columns(),
            }],
        },
    }


def crd_files() -> dict[str, str]:
    """File name -> YAML text for every CRD, as checked in under ``crds/``."""
    files = {}
    for kind, (_, plural, _, _) in KINDS.items():
        body = dump(custom_resource_definition(kind))
        files[f"{plural}.{API_GROUP}.yaml"] = "# Generated by `make crds` from the spec models.\n" \
            + body
    return files
