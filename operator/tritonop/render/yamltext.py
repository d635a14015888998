"""YAML output that people read: block style for multi-line strings, keys in given order."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def dump_all(documents: Iterable[Any]) -> str:
    """Documents separated by ``---``, as ``kubectl apply -f`` takes them."""
    return yaml.dump_all(list(documents), Dumper=_Dumper, sort_keys=False, width=100)


def dump(document: Any) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=100)
