"""Checking resources against our CRDs the way an API server would, without one.

The emulator validates nothing, so these helpers stand in for the API server's three
steps: structural defaulting, OpenAPI schema validation (with strict field
validation, as ``kubectl apply`` does by default), and CEL ``x-kubernetes-validations``
rules, evaluated with the cel-python interpreter.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import jsonschema

Schema = dict[str, Any]


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Structural defaulting: fill absent fields that have a ``default``, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _closed(schema: Schema) -> Schema:
    """A copy where objects with listed properties reject unknown fields."""
    schema = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-validations")}
    if schema.get("x-kubernetes-int-or-string"):
        schema["type"] = ["integer", "string"]  # as the API server reads it: no float, no bool
    if "properties" in schema:
        schema["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    if "items" in schema:
        schema["items"] = _closed(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _closed(schema["additionalProperties"])
    return schema


def cel_errors(schema: Schema, value: Any, path: str = "") -> list[str]:
    """Messages of every CEL rule that ``value`` breaks, with the field path."""
    errors = []
    environment = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = environment.program(environment.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{path or '.'}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], f"{path}.{key}")
    return errors


def validation_errors(crd: Schema, resource: Schema) -> list[str]:
    """What the API server would answer to creating ``resource`` (empty: accepted)."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    resource = apply_defaults(schema, copy.deepcopy(resource))
    validator = jsonschema.Draft4Validator(_closed(schema))
    errors = [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
              for e in validator.iter_errors(resource)]
    return errors or cel_errors(schema, resource)
