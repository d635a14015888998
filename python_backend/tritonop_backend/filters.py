"""Metadata filters on search: the fields kept beside each vector, and the filters over them.

A corpus record's fields named in ``corpus.fields`` are stored column by column beside the
index, one numpy array per field, memory-mapped at load:

* ``number``: ``float64`` values, NaN where the record has none;
* ``boolean``: ``int8`` 1, 0, or -1 where the record has none;
* ``string``: ``int32`` codes into a sorted vocabulary (``-1``: none);
* ``stringList``: the codes of every row's strings one after another, plus ``int64``
  offsets (row ``i`` holds ``values[offsets[i]:offsets[i + 1]]``).

Dictionary codes make equality and ``in`` one integer comparison per row however long the
strings are, and keep a low-cardinality field (a language, a tenant) at 4 bytes a row.

A filter is JSON: ``{"field": value}`` (equality; for a ``stringList`` field: the list
holds the value), ``{"field": {"in": [values]}}``, ``{"field": {"gte" | "gt" | "lte" |
"lt": number}}`` (several operators in one object must all hold), and ``{"and": [...]}`` /
``{"or": [...]}`` of filters; an object naming several keys needs all of them. A record
without the field matches no condition on it. :func:`parse_filter` checks a filter against
the fields' types, with bounds on its depth and size, and errors naming the field; the
gateway runs it before a request takes any place, the search model again for clients that
call Triton directly. :meth:`FieldColumns.mask` evaluates a parsed filter with numpy, one
vectorised operation per condition, into the boolean mask of the rows to search.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from tritonop_backend.errors import RequestError

FIELD_TYPES = ("string", "number", "boolean", "stringList")
RANGES = ("gt", "gte", "lt", "lte")
OPERATORS = ("in", *RANGES)
MAX_DEPTH = 8
"""``and``/``or`` nested at most this deep (a field condition inside counts one more)."""
MAX_CONDITIONS = 64
"""Field conditions and ``and``/``or`` nodes in one filter."""
MAX_VALUES = 1024
"""Values in all ``in`` lists of one filter together."""
MAX_STRING = 1024
"""Characters of one string value."""
MAX_FILTER_BYTES = 65536
"""The filter as canonical JSON text (what the gateway sends to Triton)."""
EXACT_INTEGER = 2**53
"""Numbers are kept as float64: integers beyond this would compare inexactly."""


@dataclass(frozen=True)
class Condition:
    """``field`` holds one of ``values`` (``op == "in"``), or compares to ``values[0]``."""

    field: str
    op: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Combined:
    """All (``op == "and"``) or any (``"or"``) of ``parts``."""

    op: str
    parts: tuple[Filter, ...]


Filter = Union[Condition, Combined]


class _Budget:
    def __init__(self) -> None:
        self.conditions = 0
        self.values = 0

    def count(self, where: str, conditions: int = 0, values: int = 0) -> None:
        self.conditions += conditions
        self.values += values
        if self.conditions > MAX_CONDITIONS:
            raise RequestError(where, f"a filter may have at most {MAX_CONDITIONS} "
                               "conditions and and/or lists")
        if self.values > MAX_VALUES:
            raise RequestError(where, f"a filter may list at most {MAX_VALUES} values in all")


def parse_filter(value: object, fields: Mapping[str, str], where: str = "filter") -> Filter:
    """Check a filter (decoded JSON) against the fields' types.

    Args:
        value: the filter object.
        fields: field name -> type (one of :data:`FIELD_TYPES`).
        where: the name errors start from (``filter``); errors name the path inside it,
            such as ``filter.and[1].year.gte``.

    Raises:
        RequestError: naming where the filter is wrong and why.
    """
    return _parse(value, fields, where, 1, _Budget())


def parse_filter_text(text: str | bytes, fields: Mapping[str, str],
                      where: str = "filter") -> Filter:
    """:func:`parse_filter` of a filter sent as JSON text (the search model's input)."""
    if len(text) > MAX_FILTER_BYTES:
        raise RequestError(where, f"is {len(text)} bytes long; at most {MAX_FILTER_BYTES} "
                           "are allowed")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise RequestError(where, f"is not valid JSON ({err})") from None
    return parse_filter(value, fields, where)


def canonical_text(value: object, fields: Mapping[str, str], where: str = "filter") -> str:
    """The filter checked, as the compact JSON text the search model takes.

    Raises:
        RequestError: as :func:`parse_filter`, or when the text is longer than
            :data:`MAX_FILTER_BYTES` (so that the search model never refuses it for that).
    """
    parse_filter(value, fields, where)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode("utf-8")) > MAX_FILTER_BYTES:
        raise RequestError(where, f"is longer than {MAX_FILTER_BYTES} bytes as JSON")
    return text


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _parse(value: object, fields: Mapping[str, str], where: str, depth: int,
           budget: _Budget) -> Filter:
    if depth > MAX_DEPTH:
        raise RequestError(where, f"filters nest at most {MAX_DEPTH} deep")
    if not isinstance(value, dict):
        raise RequestError(where, f"must be an object, got {_kind(value)}")
    if not value:
        raise RequestError(where, "must name at least one field, or and/or")
    parts: list[Filter] = []
    for key, item in value.items():
        path = f"{where}.{key}"
        if key in ("and", "or"):
            if not isinstance(item, list) or not item:
                raise RequestError(path, "must be a non-empty list of filters")
            budget.count(path, conditions=1)
            parts.append(Combined(key, tuple(
                _parse(part, fields, f"{path}[{i}]", depth + 1, budget)
                for i, part in enumerate(item))))
        else:
            parts.extend(_field(key, item, fields, path, budget))
    return parts[0] if len(parts) == 1 else Combined("and", tuple(parts))


def _field(name: str, value: object, fields: Mapping[str, str], where: str,
           budget: _Budget) -> list[Filter]:
    kind = fields.get(name)
    if kind is None:
        known = ", ".join(sorted(fields)) or "none: the corpus keeps no fields (corpus.fields)"
        raise RequestError(where, f"no such field (fields: {known})")
    if not isinstance(value, dict):
        budget.count(where, conditions=1, values=1)
        return [Condition(name, "in", (_value(value, kind, where),))]
    if not value:
        raise RequestError(where, f"an operator object must name one of {', '.join(OPERATORS)}")
    conditions: list[Filter] = []
    for op, operand in value.items():
        path = f"{where}.{op}"
        if op == "in":
            if not isinstance(operand, list) or not operand:
                raise RequestError(path, "must be a non-empty list of values")
            budget.count(path, conditions=1, values=len(operand))
            conditions.append(Condition(name, "in", tuple(
                _value(v, kind, f"{path}[{i}]") for i, v in enumerate(operand))))
        elif op in RANGES:
            if kind != "number":
                raise RequestError(path, f"{op} compares numbers; field {name!r} holds "
                                   f"{_described(kind)}")
            budget.count(path, conditions=1, values=1)
            conditions.append(Condition(name, op, (_value(operand, kind, path),)))
        else:
            raise RequestError(path, f"unknown operator; use one of {', '.join(OPERATORS)}")
    return conditions


def _value(value: object, kind: str, where: str) -> Any:
    """One value compared with a field of type ``kind``, in the column's own terms."""
    if kind in ("string", "stringList"):
        if not isinstance(value, str):
            raise RequestError(where, f"must be a string (the field holds {_described(kind)}), "
                               f"got {_kind(value)}")
        if len(value) > MAX_STRING:
            raise RequestError(where, f"is {len(value)} characters long; at most "
                               f"{MAX_STRING} are allowed")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise RequestError(where, f"must be true or false, got {_kind(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(where, f"must be a number, got {_kind(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RequestError(where, "must be a finite number")
    return number


def _described(kind: str) -> str:
    return {"string": "strings", "number": "numbers", "boolean": "booleans",
            "stringList": "lists of strings"}[kind]


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


# Columns: building (prepare), writing, loading and evaluating (the search model).


def field_value(kind: str, value: object) -> Any:
    """A record's value of a field of type ``kind`` as stored; None stays None.

    Raises:
        ValueError: what is wrong with the value (the caller names the record and field).
    """
    if value is None:
        return None
    if kind == "string":
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_kind(value)}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_kind(value)}")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {_kind(value)}")
        if isinstance(value, int) and abs(value) > EXACT_INTEGER:
            raise ValueError(f"{value} is beyond +-2**53, which numbers are compared within")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be a list of strings, got {_kind(value)}"
                         + (" holding other values" if isinstance(value, list) else ""))
    return value


def _file(directory: Path, name: str, part: str) -> Path:
    return Path(directory) / f"field.{name}.{part}"


def write_columns(directory: Path, fields: Mapping[str, str],
                  values: Mapping[str, list[Any]]) -> None:
    """Write each field's values (one per record, from :func:`field_value`) as its column."""
    for name, kind in fields.items():
        rows = values[name]
        if kind == "number":
            column = np.array([math.nan if v is None else v for v in rows], dtype=np.float64)
            np.save(_file(directory, name, "values.npy"), column)
        elif kind == "boolean":
            column = np.array([-1 if v is None else int(v) for v in rows], dtype=np.int8)
            np.save(_file(directory, name, "values.npy"), column)
        else:
            lists = [[v] if isinstance(v, str) else (v or []) for v in rows]
            vocabulary = sorted({s for strings in lists for s in strings})
            code = {s: i for i, s in enumerate(vocabulary)}
            _file(directory, name, "vocabulary.json").write_text(
                json.dumps(vocabulary, ensure_ascii=False), encoding="utf-8")
            if kind == "string":
                column = np.array([-1 if v is None else code[v] for v in rows], dtype=np.int32)
                np.save(_file(directory, name, "values.npy"), column)
            else:
                flat = np.array([code[s] for strings in lists for s in strings], dtype=np.int32)
                offsets = np.zeros(len(lists) + 1, dtype=np.int64)
                np.cumsum([len(strings) for strings in lists], out=offsets[1:])
                np.save(_file(directory, name, "values.npy"), flat)
                np.save(_file(directory, name, "offsets.npy"), offsets)


class _Column:
    """One field's column; ``equals_any`` and ``compare`` give boolean row masks."""

    def __init__(self, kind: str, values: np.ndarray, count: int,
                 vocabulary: list[str] | None = None, offsets: np.ndarray | None = None) -> None:
        self.kind, self.values, self.count = kind, values, count
        self.codes = {s: i for i, s in enumerate(vocabulary or [])}
        self.rows = None
        if offsets is not None:  # the row of each value, for a scatter of value hits
            self.rows = np.repeat(np.arange(count, dtype=np.int64), np.diff(offsets))

    def equals_any(self, wanted: tuple[Any, ...]) -> np.ndarray:
        if self.kind == "number":
            targets = np.array(wanted, dtype=np.float64)
        elif self.kind == "boolean":
            targets = np.array([int(v) for v in wanted], dtype=np.int8)
        else:
            targets = np.array([self.codes[v] for v in wanted if v in self.codes],
                               dtype=np.int32)
        if self.rows is None:
            if len(targets) == 1:
                return np.asarray(self.values == targets[0])
            return np.isin(self.values, targets)
        mask = np.zeros(self.count, dtype=bool)
        mask[self.rows[np.isin(self.values, targets)]] = True
        return mask

    def compare(self, op: str, number: float) -> np.ndarray:
        compare = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less,
                   "lte": np.less_equal}[op]
        return np.asarray(compare(self.values, number))  # NaN (no value) compares false


class FieldColumns:
    """The fields kept beside an index, loaded once, and the filters evaluated over them.

    Args:
        fields: field name -> type.
        columns: each field's column.
        count: rows of the index.
    """

    def __init__(self, fields: Mapping[str, str], columns: Mapping[str, _Column],
                 count: int) -> None:
        self.fields = dict(fields)
        self.columns = dict(columns)
        self.count = count

    @classmethod
    def load(cls, directory: Path, fields: Mapping[str, str], count: int) -> FieldColumns:
        """Map the columns :func:`write_columns` wrote in ``directory`` (read-only)."""
        from tritonop_backend.artifacts import ArtifactError

        columns = {}
        for name, kind in fields.items():
            try:
                values = np.load(_file(directory, name, "values.npy"), mmap_mode="r")
                vocabulary = offsets = None
                if kind in ("string", "stringList"):
                    vocabulary = json.loads(_file(directory, name, "vocabulary.json")
                                            .read_text(encoding="utf-8"))
                if kind == "stringList":
                    offsets = np.load(_file(directory, name, "offsets.npy"))
            except (OSError, ValueError) as err:
                raise ArtifactError(f"{directory}: field {name!r} cannot be read ({err}); "
                                    "build the index again") from None
            rows = len(offsets) - 1 if offsets is not None else len(values)
            if rows != count:
                raise ArtifactError(f"{directory}: field {name!r} has {rows} rows, the index "
                                    f"{count}; build the index again")
            columns[name] = _Column(kind, values, count, vocabulary, offsets)
        return cls(fields, columns, count)

    def parse(self, text: str | bytes, where: str = "filter") -> Filter:
        """A filter sent as JSON text, checked against these fields."""
        return parse_filter_text(text, self.fields, where)

    def mask(self, node: Filter) -> np.ndarray:
        """The rows that satisfy ``node``, as a boolean array over the index."""
        if isinstance(node, Combined):  # one part at a time: never all their masks at once
            combine = np.logical_and if node.op == "and" else np.logical_or
            result = self.mask(node.parts[0])
            for part in node.parts[1:]:
                combine(result, self.mask(part), out=result)
            return result
        column = self.columns[node.field]
        if node.op == "in":
            return column.equals_any(node.values)
        return column.compare(node.op, node.values[0])

