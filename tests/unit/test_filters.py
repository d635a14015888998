"""Search filters: the parser and the numpy evaluation against a plain-Python reading of the
filter on random records, and filtered top-k against numpy's argsort of the masked scores."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tritonop.artifacts.corpus import read_fields
from tritonop_backend.artifacts import ArtifactError, IndexManifest
from tritonop_backend.errors import RequestError
from tritonop_backend.filters import (
    MAX_DEPTH,
    MAX_VALUES,
    FieldColumns,
    canonical_text,
    field_value,
    parse_filter,
    write_columns,
)
from tritonop_backend.search import CorpusIndex, load_index, write_index
from tritonop_backend.stages import SearchStage

FIELDS = {"lang": "string", "year": "number", "draft": "boolean", "tags": "stringList"}
LANGS = ["en", "de", "fr", "ja", "Zürich"]
TAGS = ["news", "sport", "tech", "art", "food", "travel"]


def random_records(rng: random.Random, count: int) -> list[dict]:
    """Records where any field may be missing or null, numbers both ints and floats."""
    records = []
    for _ in range(count):
        record: dict = {}
        if rng.random() < 0.85:
            record["lang"] = rng.choice(LANGS)
        if rng.random() < 0.85:
            record["year"] = rng.choice([rng.randint(1990, 2025), rng.randint(1990, 2025) + 0.5])
        elif rng.random() < 0.5:
            record["year"] = None
        if rng.random() < 0.85:
            record["draft"] = rng.random() < 0.4
        if rng.random() < 0.85:
            record["tags"] = rng.sample(TAGS, rng.randint(0, 3))
        records.append(record)
    return records


def random_value(rng: random.Random, field: str):
    return {"lang": lambda: rng.choice([*LANGS, "xx"]),
            "year": lambda: rng.choice([rng.randint(1990, 2025), 2000.5, 1999]),
            "draft": lambda: rng.random() < 0.5,
            "tags": lambda: rng.choice([*TAGS, "none-such"])}[field]()


def random_filter(rng: random.Random, depth: int = 0) -> dict:
    roll = rng.random()
    if depth < 3 and roll < 0.3:
        return {rng.choice(["and", "or"]): [random_filter(rng, depth + 1)
                                            for _ in range(rng.randint(1, 3))]}
    if depth < 3 and roll < 0.4:  # several keys in one object: all must hold
        first, second = rng.sample(sorted(FIELDS), 2)
        return {**random_filter_on(rng, first), **random_filter_on(rng, second)}
    return random_filter_on(rng, rng.choice(sorted(FIELDS)))


def random_filter_on(rng: random.Random, field: str) -> dict:
    roll = rng.random()
    if roll < 0.4:
        return {field: random_value(rng, field)}
    if field == "year" and roll < 0.8:
        ops = rng.sample(["gt", "gte", "lt", "lte"], rng.randint(1, 2))
        return {field: {op: random_value(rng, field) for op in ops}}
    return {field: {"in": [random_value(rng, field) for _ in range(rng.randint(1, 4))]}}


def reference(node: dict, record: dict) -> bool:
    """The filter read literally, one record at a time."""
    results = []
    for key, value in node.items():
        if key == "and":
            results.append(all(reference(part, record) for part in value))
        elif key == "or":
            results.append(any(reference(part, record) for part in value))
        else:
            held = record.get(key)
            if not isinstance(value, dict):
                value = {"in": [value]}
            for op, operand in value.items():
                if held is None:
                    results.append(False)
                elif op == "in":
                    items = held if isinstance(held, list) else [held]
                    results.append(any(_same(item, want) for item in items for want in operand))
                else:
                    results.append({"gt": held > operand, "gte": held >= operand,
                                    "lt": held < operand, "lte": held <= operand}[op])
    return all(results)


def _same(held, wanted) -> bool:
    return isinstance(held, bool) == isinstance(wanted, bool) and held == wanted


def columns_of(tmp_path, records: list[dict]) -> FieldColumns:
    values = {name: [field_value(kind, r.get(name)) for r in records]
              for name, kind in FIELDS.items()}
    write_columns(tmp_path, FIELDS, values)
    return FieldColumns.load(tmp_path, FIELDS, len(records))


def test_masks_equal_the_plain_python_reading(tmp_path):
    rng = random.Random(20)
    records = random_records(rng, 500)
    columns = columns_of(tmp_path, records)
    kept = []
    for _ in range(400):
        spec = random_filter(rng)
        mask = columns.mask(columns.parse(canonical_text(spec, FIELDS)))
        expected = np.array([reference(spec, r) for r in records])
        np.testing.assert_array_equal(mask, expected, err_msg=json.dumps(spec))
        kept.append(expected.mean())
    # The filters range from matching nothing to matching most rows.
    assert min(kept) == 0 and max(kept) > 0.5 and 0.05 < np.mean(kept) < 0.6


@pytest.mark.parametrize("mapped", [False, True], ids=["in-memory", "mapped"])
def test_filtered_top_k_equals_argsort_of_masked_scores(tmp_path, mapped):
    """Rows in memory, or mapped as load_index maps them (few rows gathered as rows)."""
    rng = random.Random(7)
    generator = np.random.default_rng(7)
    records = random_records(rng, 600)
    vectors = generator.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if mapped:
        np.save(tmp_path / "rows.npy", vectors)
        vectors = np.load(tmp_path / "rows.npy", mmap_mode="r")
        assert isinstance(vectors, np.memmap)
    index = CorpusIndex(vectors, [f"t{i}" for i in range(600)], columns_of(tmp_path, records))
    sizes = []
    for _ in range(200):
        spec = random_filter(rng)
        queries = generator.standard_normal((2, 16)).astype(np.float32)
        k = int(rng.choice([1, 5, 10, 50]))
        rows = np.flatnonzero(index.fields.mask(parse_filter(spec, FIELDS)))
        found = index.search(queries, k, rows)
        matching = np.array([reference(spec, r) for r in records])
        scores = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ vectors.T
        masked = np.where(matching, scores, -np.inf)
        expected = np.argsort(-masked, axis=1, kind="stable")[:, :min(k, matching.sum())]
        assert found.ids.shape == expected.shape
        np.testing.assert_array_equal(found.ids, expected, err_msg=json.dumps(spec))
        np.testing.assert_allclose(found.scores, np.take_along_axis(scores, expected, 1),
                                   atol=1e-6)
        assert all(reference(spec, records[i]) for i in found.ids.reshape(-1))
        sizes.append(matching.sum())
    # Both ways of scanning ran: gathering few rows' columns, and masking a full scan.
    assert min(sizes) * 4 <= 600 < max(sizes) * 4


@pytest.mark.parametrize("spec, where, problem", [
    ({"lnag": "en"}, "filter.lnag", "no such field (fields: draft, lang, tags, year)"),
    ({"and": [{"year": 1}, {"year": {"between": [1, 2]}}]}, "filter.and[1].year.between",
     "unknown operator"),
    ({"year": "2020"}, "filter.year", "must be a number, got a string"),
    ({"lang": {"gte": 3}}, "filter.lang.gte", "compares numbers; field 'lang' holds strings"),
    ({"draft": 1}, "filter.draft", "must be true or false, got a number"),
    ({"tags": ["news"]}, "filter.tags", "must be a string"),
    ({"lang": {"in": []}}, "filter.lang.in", "must be a non-empty list of values"),
    ({"or": []}, "filter.or", "must be a non-empty list of filters"),
    ({}, "filter", "must name at least one field"),
    ([{"lang": "en"}], "filter", "must be an object, got a list"),
    ({"year": 10**400}, "filter.year", "must be a finite number"),
])
def test_bad_filters_name_the_field(spec, where, problem):
    with pytest.raises(RequestError) as caught:
        parse_filter(spec, FIELDS)
    assert caught.value.field == where
    assert problem in caught.value.problem


def test_depth_and_size_are_bounded():
    deep: dict = {"lang": "en"}
    for _ in range(MAX_DEPTH):
        deep = {"and": [deep]}
    with pytest.raises(RequestError, match="nest at most"):
        parse_filter(deep, FIELDS)
    parse_filter(deep["and"][0], FIELDS)  # one level less is fine
    with pytest.raises(RequestError, match=f"at most {MAX_VALUES} values"):
        parse_filter({"year": {"in": list(range(MAX_VALUES + 1))}}, FIELDS)
    with pytest.raises(RequestError, match="at most 64 conditions"):
        parse_filter({"or": [{"year": i} for i in range(64)]}, FIELDS)
    with pytest.raises(RequestError, match="not valid JSON"):
        FieldColumns({}, {}, 0).parse('{"year": NaN}')


def test_search_stage_answers_filters_per_request(tmp_path):
    records = [{"lang": "en", "year": 2001}, {"lang": "de", "year": 2002},
               {"lang": "en", "year": 2003}, {"lang": "fr"}]
    vectors = np.eye(4, dtype=np.float32)
    index = CorpusIndex(vectors, ["a", "b", "c", "d"], columns_of(tmp_path, records))
    stage = SearchStage.from_index(index, default_k=3, max_k=10)
    query = np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32)

    def request(text):
        return {"embedding": query, "num_results": None,
                "filter": None if text is None else np.array([[text.encode()]], dtype=object)}

    good, bad, empty, plain = stage.run([
        request('{"lang": "en"}'), request('{"lang": {"gt": 1}}'),
        request('{"year": {"gt": 2010}}'), request(None)])
    assert good["ids"].tolist() == [[2, 0]] and good["texts"].tolist() == [[b"c", b"a"]]
    assert isinstance(bad, RequestError) and bad.field == "filter.lang.gt"
    assert empty["ids"].shape == (1, 0) and empty["texts"].shape == (1, 0)
    assert plain["ids"].tolist() == [[3, 2, 1]]


def test_prepare_reads_fields_and_names_a_wrong_value(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    lines = [{"text": "one", "lang": "en", "year": 2001, "tags": ["a"]},
             "a bare string record", {"text": "three", "lang": None}]
    corpus.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    values = read_fields(corpus, {"lang": "string", "year": "number", "tags": "stringList"})
    assert values == {"lang": ["en", None, None], "year": [2001.0, None, None],
                      "tags": [["a"], None, None]}
    corpus.write_text(corpus.read_text() + json.dumps({"text": "four", "year": "2004"}) + "\n")
    with pytest.raises(ArtifactError, match=r"corpus.jsonl:5: field 'year' \(number\) must be "
                       "a number, got a string"):
        read_fields(corpus, {"year": "number"})
    with pytest.raises(ArtifactError, match="no record has field 'yaer'"):
        read_fields(corpus, {"yaer": "number"})


def test_index_round_trip_keeps_the_fields(tmp_path):
    manifest = IndexManifest("m", "f", "mean", 8, 2, 3, "sha", fields={"lang": "string"})
    write_index(tmp_path, np.eye(3, 2, dtype=np.float32), ["a", "b", "c"], manifest,
                {"lang": ["en", None, "de"]})
    index, read = load_index(tmp_path)
    assert read.fields == {"lang": "string"}
    mask = index.fields.mask(index.fields.parse('{"lang": {"in": ["de", "en"]}}'))
    assert mask.tolist() == [True, False, True]
    assert isinstance(index.fields.columns["lang"].values, np.memmap)


def _resource(corpus: dict):
    from tests.support.triton import API
    from tritonop.resources import parse_resource

    return parse_resource({"apiVersion": API, "kind": "EmbeddingSearch",
                           "metadata": {"name": "s"},
                           "spec": {"corpus": {"source": "/data/c.jsonl", **corpus}}})


def test_fields_are_part_of_the_fingerprint_and_validated():
    from tritonop.artifacts.versions import resource_fingerprint
    from tritonop.resources import ResourceError

    plain = resource_fingerprint(_resource({}))
    assert resource_fingerprint(_resource({"fields": []})) == plain  # older versions stay
    lang = resource_fingerprint(_resource({"fields": [{"name": "lang", "type": "string"}]}))
    typed = resource_fingerprint(_resource({"fields": [{"name": "lang", "type": "stringList"}]}))
    assert len({plain, lang, typed}) == 3
    for fields, problem in [
        ([{"name": "and", "type": "string"}], "combine filters"),
        ([{"name": "a-b", "type": "string"}], "pattern"),
        ([{"name": "x", "type": "number"}, {"name": "x", "type": "string"}], "repeated: x"),
        ([{"name": f"f{i}", "type": "number"} for i in range(33)], "at most 32"),
        ([{"name": "x", "type": "date"}], "'string', 'number', 'boolean' or 'stringList'"),
    ]:
        with pytest.raises(ResourceError, match=problem):
            _resource({"fields": fields})
