"""Reading a corpus file: JSONL, CSV or plain lines, one text per record, and the record
fields kept beside each vector (JSONL only)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonop_backend.artifacts import ArtifactError
from tritonop_backend.filters import field_value

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def read_corpus(path: Path, text_field: str = "text") -> list[str]:
    """All texts of a corpus file, in file order; the format follows the extension.

    ``.jsonl``/``.ndjson``: one JSON object per line, text in ``text_field`` (a line that
    is a bare JSON string is also accepted). ``.csv``: a header row naming
    ``text_field``. Anything else: one text per non-empty line.

    Raises:
        ArtifactError: naming the file, line and problem.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"corpus {path} does not exist")
    fmt = FORMATS.get(path.suffix.lower(), "lines")
    texts: list[str] = []
    with open(path, encoding="utf-8", newline="") as data:
        if fmt == "csv":
            texts = _csv_texts(path, data, text_field)
        else:
            number = 0
            try:
                for number, line in enumerate(data, start=1):
                    if line.strip():
                        text = (_json_text(path, number, line, text_field) if fmt == "jsonl"
                                else line)
                        texts.append(text.strip())
            except UnicodeDecodeError as err:  # decoded a block at a time: past this line
                raise ArtifactError(f"corpus {path}: is not UTF-8 text ({err.reason}"
                                    f"{f', past line {number}' if number else ''})") from None
    empty = [i for i, text in enumerate(texts) if not text]
    if empty:
        raise ArtifactError(f"corpus {path}: record {empty[0] + 1} has an empty text")
    if not texts:
        raise ArtifactError(f"corpus {path} has no texts")
    return texts


def read_fields(path: Path, fields: Mapping[str, str]) -> dict[str, list[Any]]:
    """Each named field's value in every record, in the order of :func:`read_corpus`.

    A record without the field (or a bare JSON string record) has None there.

    Args:
        fields: field name -> type (``string``, ``number``, ``boolean``, ``stringList``).

    Raises:
        ArtifactError: naming the file and line of a record whose value has another type,
            a field that no record has, or a corpus that is not JSONL.
    """
    path = Path(path)
    if FORMATS.get(path.suffix.lower()) != "jsonl":
        raise ArtifactError(f"corpus {path}: corpus.fields needs a JSONL corpus (.jsonl or "
                            ".ndjson), whose records have fields")
    values: dict[str, list[Any]] = {name: [] for name in fields}
    with open(path, encoding="utf-8") as data:
        for number, line in enumerate(data, start=1):
            if not line.strip():
                continue
            record = json.loads(line)  # read_corpus has already refused lines that are not
            for name, kind in fields.items():
                value = record.get(name) if isinstance(record, dict) else None
                try:
                    values[name].append(field_value(kind, value))
                except ValueError as err:
                    raise ArtifactError(f"corpus {path}:{number}: field {name!r} ({kind}) "
                                        f"{err}") from None
    for name, column in values.items():
        if all(value is None for value in column):
            raise ArtifactError(f"corpus {path}: no record has field {name!r} "
                                "(corpus.fields); check its spelling")
    return values


def _json_text(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"corpus {path}:{number}: not JSON ({err.msg})") from None
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ArtifactError(f"corpus {path}:{number}: no string field {field!r}")
    return record[field]


def _csv_texts(path: Path, data, field: str) -> list[str]:  # type: ignore[no-untyped-def]
    reader = csv.DictReader(data)
    try:
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise ArtifactError(f"corpus {path}: the header has no column {field!r} "
                                f"(columns: {reader.fieldnames})")
        return [row[field] or "" for row in reader]
    except csv.Error as err:  # a field over csv's limit, a stray NUL, ...
        raise ArtifactError(f"corpus {path}: line {reader.line_num + 1}: {err}") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"corpus {path}: is not UTF-8 text ({err.reason}, past line "
                            f"{reader.line_num})") from None
