"""Structured outputs (``response_format``) in the engine, on tiny random decoders.

A random model wanders, so everything it writes under a grammar is checked by an
independent validator (``jsonschema``) on the parsed text. The schemas come from a seeded
generator: nested objects with required and optional fields, arrays with bounds on their
items, enums, bounded integers and numbers (multiples of 0.25), strings with a
``maxLength``, booleans; all of them bounded (``additionalProperties: false``, ``maxItems``,
``maxLength``), so the grammar itself forces the answer to end. Constrained requests share
the batch with unconstrained greedy ones, whose tokens must equal a run without them.

The byte-level families (Llama 3, Qwen) are used: the tiny SentencePiece tokenizers of
``tests/support/decoders.py`` declare their byte pieces special tokens, which llguidance
cannot match; such a model refuses ``response_format`` (tested below).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

from tests.support.llm import Outcome, decoded, run
from tritonop_backend.errors import RequestError
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.grammar import MAX_RESPONSE_FORMAT_BYTES
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request
from tritonop_backend.llm.sampling import RowParams, make_generator, select_next_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=512, default_temperature=0.0,
                          max_context_tokens=512)
NAMES = ["llama", "qwen2"]
PROMPTS = ["Describe a package for playing music, as JSON.", "What is the capital of France?",
           "Explain why the sky is blue, step by step."]
SCHEMAS = 60
MAX_TOKENS = 400
"""Generous: every generated schema bounds its output well below this."""


@pytest.fixture(scope="module")
def models(tiny_decoders: dict[str, Path]) -> dict[str, LoadedModel]:
    return {name: load_causal_lm(tiny_decoders[name], "float32", "cpu") for name in NAMES}


def schema_format(schema: dict[str, Any], name: str = "answer") -> str:
    return json.dumps({"type": "json_schema",
                       "json_schema": {"name": name, "schema": schema, "strict": True}})


def request(prompt: str, max_tokens: int = MAX_TOKENS, **values: Any) -> GenerationRequest:
    return parse_request({"text_input": prompt, "max_tokens": max_tokens, **values}, POLICY)


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """One bounded JSON Schema; objects and arrays nest up to two levels deep."""
    kinds = ["integer", "number", "string", "boolean", "enum"]
    if depth < 2:
        kinds += ["object", "array"] * (2 - depth)
    kind = rng.choice(kinds)
    if kind == "integer":
        low = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 5000)}
    if kind == "number":
        # A multiple of a binary fraction: free decimals would let a random model write
        # digits for ever, and 0.25 is exact for the validator's float division.
        low = rng.uniform(-100, 100)
        return {"type": "number", "minimum": round(low, 2),
                "maximum": round(low + rng.uniform(0.5, 500), 2), "multipleOf": 0.25}
    if kind == "string":
        low = rng.randint(0, 3)
        return {"type": "string", "minLength": low, "maxLength": low + rng.randint(1, 8)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        values = rng.sample(["red", "green", "blue", "amber", 1, 2, 42, "x y", True, None], 3)
        return {"enum": values}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 2)}
    names = rng.sample(["name", "id", "size", "tags", "owner", "score", "kind", "meta"],
                       rng.randint(1, 4))
    required = [name for name in names if rng.random() < 0.6]
    return {"type": "object", "properties": {name: random_schema(rng, depth + 1)
                                             for name in names},
            "required": required, "additionalProperties": False}


def generated_schemas(count: int = SCHEMAS, seed: int = 23) -> list[dict[str, Any]]:
    """``count`` schemas, the top level an object as OpenAI's json_schema asks."""
    rng = random.Random(seed)
    schemas = []
    while len(schemas) < count:
        schema = random_schema(rng)
        if schema.get("type") != "object":
            schema = {"type": "object", "properties": {"value": schema},
                      "required": ["value"], "additionalProperties": False}
        schemas.append(schema)
    return schemas


def assert_valid(outcome: Outcome, schema: dict[str, Any]) -> Any:
    """The output is complete JSON that validates against the schema, ended by the grammar."""
    assert outcome.last.finish_reason == "stop", (outcome.last, outcome.text)
    value = json.loads(outcome.text)
    jsonschema.validate(value, schema)
    return value


def test_the_generator_makes_varied_schemas() -> None:
    text = json.dumps(generated_schemas())
    for keyword in ("minItems", "maxItems", "enum", "minimum", "maximum", "maxLength",
                    '"required": []', '"type": "boolean"', '"type": "number"'):
        assert keyword in text, keyword
    for schema in generated_schemas():
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", NAMES)
def test_generated_schemas_validate_greedy_and_sampled_beside_unconstrained(
        models: dict[str, LoadedModel], name: str) -> None:
    """Each schema greedy and sampled (plain, top-k, top-p), six at a time in a batch of
    eight with two unconstrained greedy requests that must produce exactly what they
    produce alone. (A seeded draw is not compared with its run alone: the batch's size
    moves float32 logits by ~1e-5, enough to cross a boundary of the draw; that the mask
    leaves other rows' draws alone is tested on the sampler, below.)"""
    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8)
    plain = {"greedy": request(PROMPTS[1], 24), "other": request(PROMPTS[2], 24)}
    alone = run(engine, dict(plain))
    samplers = [{"temperature": 1.0}, {"temperature": 0.8, "top_k": 20},
                {"temperature": 1.2, "top_p": 0.9}]
    schemas = generated_schemas()
    shapes = set()
    for first in range(0, len(schemas), 3):
        batch: dict[Any, GenerationRequest] = dict(plain)
        chosen = {}
        for offset, schema in enumerate(schemas[first:first + 3]):
            index = first + offset
            chosen[index] = schema
            batch[("greedy", index)] = request(PROMPTS[index % 3],
                                               response_format=schema_format(schema))
            batch[("sampled", index)] = request(PROMPTS[index % 3], seed=index,
                                                response_format=schema_format(schema),
                                                **samplers[index % 3])
        outcomes = run(engine, batch)
        for key in plain:
            assert outcomes[key].tokens == alone[key].tokens, key
        for index, schema in chosen.items():
            for mode in ("greedy", "sampled"):
                outcome = outcomes[(mode, index)]
                value = assert_valid(outcome, schema)
                assert outcome.text == decoded(engine, outcome.tokens)
                shapes.add(json.dumps(value)[:12])
    assert len(shapes) > 20, "the answers should differ from schema to schema"


def test_the_fixed_shape_step_gives_the_same_constrained_answers(
        models: dict[str, LoadedModel]) -> None:
    """The mask is applied to the logits after the fixed-shape decode step (a CUDA graph's
    output buffer on a GPU; eager here), never inside it: the same tokens as eager decoding."""
    loaded = models["llama"]
    schemas = generated_schemas(6, seed=5)
    tokens = []
    for static_decode in (False, True):
        engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8,
                           static_decode=static_decode)
        batch = {i: request(PROMPTS[i % 3], response_format=schema_format(schema))
                 for i, schema in enumerate(schemas)}
        batch["plain"] = request(PROMPTS[1], 24)
        outcomes = run(engine, batch)
        for i, schema in enumerate(schemas):
            assert_valid(outcomes[i], schema)
        tokens.append({key: outcome.tokens for key, outcome in outcomes.items()})
    assert tokens[0] == tokens[1]


def test_the_mask_changes_only_the_constrained_rows() -> None:
    """Rows without a grammar get the same tokens, drawn or greedy, bit for bit; a
    constrained row draws only allowed tokens, at any temperature."""
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 4
    params = RowParams([1.0, 0.0, 1.5, 0.7, 0.0, 2.0], [0, 0, 10, 0, 0, 0],
                       [1.0, 1.0, 1.0, 0.9, 1.0, 1.0], [1.0] * 6)
    allowed = torch.zeros(2, 300, dtype=torch.bool)
    allowed[0, [5, 17, 250]] = True
    allowed[1, 299] = True
    for draw in range(20):
        free = select_next_tokens(logits, params, [make_generator(draw + row)
                                                   for row in range(6)])
        masked = select_next_tokens(logits, params, [make_generator(draw + row)
                                                     for row in range(6)],
                                    allowed=([2, 4], allowed))
        assert masked[[0, 1, 3, 5]].tolist() == free[[0, 1, 3, 5]].tolist()
        assert int(masked[2]) in (5, 17, 250) and int(masked[4]) == 299


@pytest.mark.parametrize("name", NAMES)
def test_greedy_under_a_schema_is_the_best_allowed_token(
        models: dict[str, LoadedModel], name: str) -> None:
    """Greedy decoding under a grammar takes, at every step, the most likely token that the
    grammar allows (checked against the model's own logits and a mask that llguidance
    computes by itself, outside the engine)."""
    import llguidance

    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2)
    schema = {"type": "object", "properties": {"size": {"type": "integer", "minimum": 0,
                                                        "maximum": 999},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"enum": ["a", "bc"]}}},
              "required": ["size", "tags"], "additionalProperties": False}
    outcome = run(engine, {"a": request(PROMPTS[0], response_format=schema_format(schema))})["a"]
    assert_valid(outcome, schema)
    constraint = parse_request({"text_input": "x", "response_format": schema_format(schema)},
                               POLICY).response_format
    assert constraint is not None
    matcher = llguidance.LLMatcher(engine._grammar.tokens(), constraint.grammar, log_level=0)
    ids = engine.encode_prompt(PROMPTS[0])
    for token in outcome.tokens:
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids])).logits[0, -1]
        bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8),
                             bitorder="little")
        allowed = np.flatnonzero(bits[: logits.shape[0]])
        assert token == int(allowed[logits[allowed].argmax()])
        assert matcher.consume_token(token)
        ids.append(token)
    assert matcher.is_stopped()


def test_json_object_gives_a_json_object(models: dict[str, LoadedModel]) -> None:
    """Any object: unbounded, so a random model may wander in it for ever; these greedy
    runs end (the tiny Llama closes at once, the tiny Qwen writes a key and a number)."""
    runs = {"llama": PROMPTS, "qwen2": ["Name a package for playing music."]}
    for name, prompts in runs.items():
        loaded = models[name]
        engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
        requests = {i: request(prompt, response_format='{"type": "json_object"}')
                    for i, prompt in enumerate(prompts)}
        requests["text"] = request(prompts[0], 8, response_format='{"type": "text"}')
        outcomes = run(engine, requests)
        for i in range(len(prompts)):
            assert outcomes[i].last.finish_reason == "stop"
            assert isinstance(json.loads(outcomes[i].text), dict)
        assert outcomes["text"].last.finish_reason == "length"  # text is no constraint
    assert json.loads(outcomes[0].text) != {}


def test_a_length_cut_ends_with_length_and_the_engine_goes_on(
        models: dict[str, LoadedModel]) -> None:
    loaded = models["llama"]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}},
              "required": ["name"], "additionalProperties": False}
    cut = run(engine, {"a": request(PROMPTS[0], 4, response_format=schema_format(schema),
                                    temperature=1.0, seed=1)})["a"]
    assert cut.last.finish_reason == "length" and len(cut.tokens) == 4
    assert cut.text == '{"name'  # the forced tokens, one per step
    whole = run(engine, {"b": request(PROMPTS[0], response_format=schema_format(schema))})["b"]
    assert_valid(whole, schema)


@pytest.mark.parametrize(("response_format", "field", "problem"), [
    ("{not json", "response_format", "must be a JSON object"),
    ('["json_object"]', "response_format", "must be an object with a type"),
    ('{"type": "xml"}', "response_format.type", "must be one of text, json_object"),
    ('{"type": "json_schema"}', "response_format.json_schema", "is required"),
    ('{"type": "json_schema", "json_schema": {"schema": {}}}',
     "response_format.json_schema.name", "letters, digits"),
    ('{"type": "json_schema", "json_schema": {"name": "a"}}',
     "response_format.json_schema.schema", "is required"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": 5}}',
     "response_format.json_schema.schema", "must be a JSON Schema"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "thing"}}}',
     "response_format.json_schema.schema", "Invalid type: thing"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": '
     '{"type": "string", "pattern": "(("}}}',
     "response_format.json_schema.schema", "unclosed group"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": '
     '{"$ref": "#/$defs/missing"}}}', "response_format.json_schema.schema", "missing"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "strict": "yes", "schema": {}}}',
     "response_format.json_schema.strict", "must be a boolean"),
    ('{"type": "json_object", "json_schema": {}}', "response_format.json_schema",
     "only allowed with type json_schema"),
    ('{"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}',
     "response_format.json_schema.extra", "is not a recognised field"),
])
def test_bad_response_formats_are_refused_naming_the_field(
        response_format: str, field: str, problem: str) -> None:
    with pytest.raises(RequestError) as caught:
        request("hi", response_format=response_format)
    assert caught.value.field == field
    assert problem in caught.value.problem


def test_a_response_format_over_the_bound_is_refused() -> None:
    properties = {f"field_{i}": {"type": "string", "description": "x" * 200}
                  for i in range(MAX_RESPONSE_FORMAT_BYTES // 200)}
    with pytest.raises(RequestError, match=r"response_format: is \d+ bytes of JSON; at most "
                       f"{MAX_RESPONSE_FORMAT_BYTES}"):
        request("hi", response_format=schema_format({"type": "object",
                                                     "properties": properties}))


def test_a_model_whose_vocabulary_llguidance_cannot_match_refuses_and_serves_on(
        tiny_decoders: dict[str, Path]) -> None:
    """The tiny Mistral's byte pieces are special tokens: a clear 400 on response_format at
    ``add``, its place given back, and the next request (with none) served."""
    loaded = load_causal_lm(tiny_decoders["mistral"], "float32", "cpu")
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=1, max_waiting=0)
    for _ in range(2):  # the second refusal comes from the remembered verdict
        with pytest.raises(RequestError) as caught:
            engine.add("a", request(PROMPTS[0], response_format='{"type": "json_object"}'))
        assert caught.value.field == "response_format"
        assert "byte pieces" in caught.value.problem
    assert not engine.has_work()
    outcome = run(engine, {"b": request(PROMPTS[0], 8)})["b"]
    assert outcome.last.finish_reason == "length" and len(outcome.tokens) == 8


def test_the_mask_costs_little_per_token(models: dict[str, LoadedModel]) -> None:
    """Eight sequences of 64 tokens, with and without a schema that allows long output,
    in the same process: prints both rates (the report's figure) and bounds the cost."""
    loaded = models["qwen2"]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8)
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 500,
                                                         "maxLength": 2000}},
              "required": ["text"], "additionalProperties": False}

    def rate(**values: Any) -> float:
        batch = {i: request(PROMPTS[i % 3], 64, temperature=1.0, seed=i, **values)
                 for i in range(8)}
        started = time.perf_counter()
        outcomes = run(engine, batch)
        elapsed = time.perf_counter() - started
        assert all(len(o.tokens) == 64 for o in outcomes.values())
        return 8 * 64 / elapsed

    rate()  # warm up
    free = max(rate(), rate())
    masked = max(rate(response_format=schema_format(schema)),
                 rate(response_format=schema_format(schema)))
    print(f"\ntokens/s without a schema {free:.0f}, with {masked:.0f}")
    assert masked > free / 4
