"""Sampling and request validation, checked against Hugging Face's logits processors.

Pure and fast: tiny tensors, no model. Reference results come from ``transformers``'
own ``RepetitionPenaltyLogitsProcessor``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.params import GenerationPolicy, parse_request
from tritonop_backend.llm.sampling import (
    RowParams,
    apply_repetition_penalty,
    make_generator,
    select_next_tokens,
)

KNOWN = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02])
"""A distribution whose top-p and top-k sets are easy to read off by hand."""


def rows(count: int, **values: float) -> RowParams:
    """The same parameters for ``count`` rows."""
    settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    settings.update(values)
    return RowParams(
        [settings["temperature"]] * count,
        [int(settings["top_k"])] * count,
        [settings["top_p"]] * count,
        [settings["repetition_penalty"]] * count,
    )


def draws(logits: torch.Tensor, count: int, first_seed: int = 0, **values: float) -> torch.Tensor:
    """One draw per row from ``count`` copies of ``logits``, each row with its own seed."""
    generators = [make_generator(first_seed + row) for row in range(count)]
    batch = logits.expand(count, -1).clone()
    return select_next_tokens(batch, rows(count, **values), generators)


def hf_allowed(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> set[int]:
    """Tokens that Hugging Face's warpers leave finite, i.e. may be sampled."""
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


class TestTopKTopP:
    def test_top_k_one_is_greedy(self) -> None:
        logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 4
        generators = [make_generator(row) for row in range(64)]
        chosen = select_next_tokens(logits, rows(64, temperature=0.7, top_k=1), generators)
        assert torch.equal(chosen, logits.argmax(dim=-1))

    def test_temperature_zero_is_greedy(self) -> None:
        logits = torch.randn(8, 50)
        chosen = select_next_tokens(logits, rows(8, temperature=0.0), [make_generator(0)] * 8)
        assert torch.equal(chosen, logits.argmax(dim=-1))

    @pytest.mark.parametrize("temperature", [1e-38, 9.9e-6])
    @pytest.mark.parametrize("top_p", [1.0, 0.9])
    def test_a_vanishing_temperature_is_greedy_as_in_vllm(
        self, temperature: float, top_p: float
    ) -> None:
        """Dividing a language model's logits by 1e-38 overflowed to infinities and NaN,
        which drew one of the last token ids instead of the most likely one."""
        logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(3)) * 8
        logits[:, -1] = -40.0  # the last id is never the most likely
        generators = [make_generator(row) for row in range(8)]
        chosen = select_next_tokens(
            logits, rows(8, temperature=temperature, top_p=top_p), generators
        )
        assert torch.equal(chosen, logits.argmax(dim=-1))
        assert parse_request({"text_input": "x", "temperature": temperature}, POLICY).params.greedy

    @pytest.mark.parametrize(
        ("values", "allowed"),
        [
            ({"top_p": 0.7}, {0, 1, 2}),
            ({"top_p": 0.39}, {0}),
            ({"top_p": 0.41}, {0, 1}),
            ({"top_k": 2}, {0, 1}),
            ({"top_k": 3, "top_p": 0.9}, {0, 1, 2}),
            ({"top_k": 5, "top_p": 0.7}, {0, 1, 2}),
        ],
    )
    def test_known_distribution_stays_in_its_set(
        self, values: dict[str, float], allowed: set[int]
    ) -> None:
        seen = draws(KNOWN.log(), 3000, **values)
        assert set(seen.tolist()) == allowed
        assert allowed == hf_allowed(
            KNOWN.log(), 1.0, int(values.get("top_k", 0)), values.get("top_p", 1.0)
        )

    def test_frequencies_follow_the_renormalised_distribution(self) -> None:
        seen = draws(KNOWN.log(), 20000, top_p=0.7).tolist()
        expected = KNOWN[:3] / KNOWN[:3].sum()
        for token in range(3):
            assert seen.count(token) / len(seen) == pytest.approx(float(expected[token]), abs=0.015)

    def test_plain_sampling_follows_the_distribution(self) -> None:
        seen = draws(KNOWN.log(), 20000).tolist()
        for token, probability in enumerate(KNOWN.tolist()):
            assert seen.count(token) / len(seen) == pytest.approx(probability, abs=0.012)

    @pytest.mark.parametrize(
        ("scale", "temperature", "top_k", "top_p"),
        [
            (4.0, 1.0, 0, 0.9),  # peaked: the nucleus fits among the first candidates
            (0.3, 1.0, 0, 0.99),  # flat: needs the full sort
            (2.0, 0.7, 40, 0.95),
            (1.0, 1.3, 600, 1.0),  # k beyond the candidate window
        ],
    )
    def test_large_vocabulary_matches_hugging_face_sets(
        self, scale: float, temperature: float, top_k: int, top_p: float
    ) -> None:
        logits = torch.randn(5000, generator=torch.Generator().manual_seed(7)) * scale
        seen = set(draws(logits, 2000, temperature=temperature, top_k=top_k, top_p=top_p).tolist())
        allowed = hf_allowed(logits, temperature, top_k, top_p)
        assert seen <= allowed
        assert len(seen) > min(len(allowed), 20) // 2

    def test_top_k_keeps_ties_like_hugging_face(self) -> None:
        logits = torch.tensor([3.0, 2.0, 2.0, 1.0, 0.0])
        seen = set(draws(logits, 2000, top_k=2).tolist())
        assert seen == {0, 1, 2} == hf_allowed(logits, 1.0, 2, 1.0)


class TestRepetitionPenalty:
    @pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
    def test_equals_hugging_face(self, penalty: float) -> None:
        generator = torch.Generator().manual_seed(3)
        logits = torch.randn(4, 100, generator=generator) * 3
        history = torch.randint(0, 100, (4, 12), generator=generator)
        history[:, 5] = history[:, 0]  # duplicates count once
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        mask = torch.ones_like(history, dtype=torch.bool)
        actual = apply_repetition_penalty(logits, history, mask, torch.full((4,), penalty))
        assert torch.equal(actual, expected)

    def test_window_ignores_older_tokens_per_row(self) -> None:
        logits = torch.randn(2, 50) * 3
        history = torch.arange(20).reshape(2, 10)
        spans = torch.tensor([3, 7])
        mask = torch.arange(10)[None, :] >= (10 - spans)[:, None]
        actual = apply_repetition_penalty(logits, history, mask, torch.full((2,), 1.5))
        for row, span in enumerate(spans.tolist()):
            recent = history[row : row + 1, 10 - span :]
            expected = RepetitionPenaltyLogitsProcessor(1.5)(recent, logits[row : row + 1].clone())
            assert torch.equal(actual[row], expected[0])

    def test_penalty_changes_the_greedy_choice(self) -> None:
        logits = torch.tensor([[2.0, 1.9, 0.0]])
        history, mask = torch.tensor([[0]]), torch.tensor([[True]])
        params = rows(1, temperature=0.0, repetition_penalty=1.2)
        chosen = select_next_tokens(logits, params, [make_generator(0)], history, mask)
        assert chosen.tolist() == [1]


class TestSeeds:
    def sequence(self, seed: int, mates: int = 0, steps: int = 30) -> list[int]:
        """Draw ``steps`` tokens for a seeded row that sits after ``mates`` other rows."""
        ours = torch.randn(steps, 1, 300, generator=torch.Generator().manual_seed(5))
        others = torch.randn(steps, mates, 300, generator=torch.Generator().manual_seed(6))
        logits = torch.cat([others, ours], dim=1)
        generators = [make_generator(100 + m) for m in range(mates)] + [make_generator(seed)]
        params = RowParams(
            temperature=[0.5] * mates + [0.9],
            top_k=[0] * mates + [50],
            top_p=[0.8] * mates + [0.95],
            repetition_penalty=[1.0] * (mates + 1),
        )
        return [int(select_next_tokens(logits[i], params, generators)[mates]) for i in range(steps)]

    def test_same_seed_same_draws(self) -> None:
        assert self.sequence(42) == self.sequence(42)

    def test_different_seeds_differ(self) -> None:
        assert self.sequence(42) != self.sequence(43)

    def test_batch_mates_do_not_change_the_draws(self) -> None:
        assert self.sequence(42) == self.sequence(42, mates=5)

    def test_unseeded_rows_differ(self) -> None:
        logits = torch.zeros(1, 10000)
        first = [
            int(select_next_tokens(logits, rows(1), [make_generator(None)])[0]) for _ in range(5)
        ]
        second = [
            int(select_next_tokens(logits, rows(1), [make_generator(None)])[0]) for _ in range(5)
        ]
        assert first != second


POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=64)


class TestParseRequest:
    def test_defaults_come_from_the_policy(self) -> None:
        request = parse_request({"text_input": b"Hello"}, POLICY)
        assert request.prompt == "Hello"
        assert request.params.max_tokens == 16
        assert request.params.temperature == POLICY.default_temperature
        assert request.params.seed is None
        assert request.params.stop == ()
        assert request.stream is False

    def test_numpy_scalars_and_stop_lists(self) -> None:
        values = {
            "text_input": np.array([b"Hi \xc3\xa9"], dtype=object),
            "max_tokens": np.int32(8),
            "temperature": np.float32(0.5),
            "seed": np.uint64(2**63),
            "stop": np.array([b"\n", b"END"], dtype=object),
            "stream": np.bool_(True),
            "top_k": None,
        }
        request = parse_request(values, POLICY)
        assert request.prompt == "Hi é"
        assert (request.params.max_tokens, request.params.temperature) == (8, 0.5)
        assert request.params.seed == 2**63
        assert request.params.stop == ("\n", "END")
        assert request.stream is True

    def test_single_stop_string(self) -> None:
        assert parse_request({"text_input": "x", "stop": "###"}, POLICY).params.stop == ("###",)

    @pytest.mark.parametrize(
        ("values", "field"),
        [
            ({}, "text_input"),
            ({"text_input": ""}, "text_input"),
            ({"text_input": "  \n\t"}, "text_input"),
            ({"text_input": b"caf\xc3"}, "text_input"),
            ({"text_input": b"\xff\xfe"}, "text_input"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"max_tokens": -3}, "max_tokens"),
            ({"max_tokens": 65}, "max_tokens"),
            ({"max_tokens": 2.5}, "max_tokens"),
            ({"max_tokens": True}, "max_tokens"),
            ({"temperature": -0.1}, "temperature"),
            ({"temperature": math.nan}, "temperature"),
            ({"temperature": math.inf}, "temperature"),
            ({"temperature": "hot"}, "temperature"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_p": 1.01}, "top_p"),
            ({"top_p": -0.5}, "top_p"),
            ({"top_p": math.nan}, "top_p"),
            ({"top_k": -1}, "top_k"),
            ({"repetition_penalty": 0.0}, "repetition_penalty"),
            ({"repetition_penalty": -1.0}, "repetition_penalty"),
            ({"repetition_penalty": math.inf}, "repetition_penalty"),
            ({"repeat_last_n": -1}, "repeat_last_n"),
            ({"seed": -1}, "seed"),
            ({"seed": 2**64}, "seed"),
            ({"stop": ""}, "stop"),
            ({"stop": [b"ok", b"\xff"]}, "stop"),
            ({"stop": ["s"] * 17}, "stop"),
            ({"stream": "yes"}, "stream"),
        ],
    )
    def test_bad_input_names_the_parameter(self, values: dict[str, object], field: str) -> None:
        request = {"text_input": "Hello", **values}
        if not values:
            request = {}
        with pytest.raises(RequestError) as caught:
            parse_request(request, POLICY)
        assert caught.value.field == field
        assert str(caught.value).startswith(f"{field}: ")

    def test_long_stop_strings_are_refused_naming_the_limit(self) -> None:
        allowed = parse_request({"text_input": "x", "stop": ["a" * 200, "b" * 56]}, POLICY)
        assert len("".join(allowed.params.stop)) == 256
        with pytest.raises(RequestError) as caught:
            parse_request({"text_input": "x", "stop": ["s" * 1000] * 16}, POLICY)
        assert str(caught.value) == (
            "stop: stop strings may hold at most 256 characters in all, got 16000")

    @pytest.mark.parametrize(
        ("values", "message"),
        [
            ({"text_input": "é" * 41},
             "text_input: the prompt is 41 characters long; at most 40 are allowed"),
            ({"text_input": "a" * 41, "prompt_format": "raw"},
             "text_input: the prompt is 41 characters long; at most 40 are allowed"),
            ({"text_input": json.dumps([{"role": "system", "content": "s" * 20},
                                        {"role": "user", "content": "u" * 21}]),
              "prompt_format": "messages"},
             "messages: the contents are 41 characters long together; at most 40 are allowed"),
        ],
        ids=["text", "raw", "messages"],
    )
    def test_prompt_over_the_character_bound_is_refused(
        self, values: dict[str, object], message: str
    ) -> None:
        policy = GenerationPolicy(max_prompt_characters=40)
        with pytest.raises(RequestError) as caught:
            parse_request(values, policy)
        assert str(caught.value) == message

    def test_prompt_at_the_character_bound_is_taken(self) -> None:
        policy = GenerationPolicy(max_prompt_characters=40)
        turns = [{"role": "user", "content": "u" * 40}]
        chat = parse_request(
            {"text_input": json.dumps(turns), "prompt_format": "messages"}, policy
        )  # the JSON around the contents does not count
        assert chat.messages == (("user", "u" * 40),)
        assert parse_request({"text_input": "é" * 40}, policy).prompt == "é" * 40

    def test_limits_are_inclusive(self) -> None:
        request = parse_request(
            {"text_input": "x", "max_tokens": 64, "top_p": 1.0, "top_k": 0}, POLICY
        )
        assert request.params.max_tokens == 64

    def test_policy_rejects_impossible_defaults(self) -> None:
        with pytest.raises(ValueError, match="top_p"):
            GenerationPolicy(default_top_p=0.0).validate()
        with pytest.raises(ValueError, match="default_max_tokens"):
            GenerationPolicy(default_max_tokens=10, max_tokens_limit=5).validate()
