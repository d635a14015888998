"""The LLM model on a real tritonserver under disorderly traffic.

200 streamed requests over ``/generate_stream`` (server-sent events) from 16 client
threads, with random prompts, lengths and sampling parameters; about a third of the
clients hang up at a random point of their stream, and some requests are bad. Then:

* every accepted greedy request that was not cancelled produced exactly the text that
  the same request produces alone (sent before the storm, one at a time);
* every accepted request that was not cancelled ended with a finish reason;
* the bad ones got a 400 naming the parameter;
* the engine's running and waiting gauges are back to 0 within seconds of the last
  answer (no leaked slot or entry; clients that hung up on long answers freed theirs);
* the model's stub process holds no more memory after the storm than 10% above before.

Figures (requests, cancellations, wall time, RSS) are printed; ``pytest -s`` shows them.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import requests

from tests.support.triton import RunningTriton, running_triton
from tests.triton.test_llm import llm, seed_model
from tritonop.runtime.metrics import model_metric

pytestmark = pytest.mark.triton

MODEL = "chaos"
REQUESTS = 200
CLIENTS = 16
PROMPTS = ["What is the capital of France?", "Name three colors.",
           "Write one sentence about the sea.", "Count from 1 to 10.",
           "Give me a synonym for happy."]
GREEDY_OPTIONS = [{"max_tokens": n, "repetition_penalty": r} for n in (4, 10) for r in (1.0, 1.3)]
BAD = [({"text_input": ""}, "text_input: must not be empty"),
       ({"top_p": 5.0}, "top_p: must lie in (0, 1]"),
       ({"max_tokens": 0}, "max_tokens: must lie in [1, 256]"),
       ({"stop": ["x" * 200] * 2}, "stop: stop strings may hold at most 256 characters")]


@dataclass
class Plan:
    """One client's request and how it behaves."""

    body: dict[str, Any]
    kind: str  # "greedy", "sampled" or "bad"
    hang_up_after: int | None = None  # events read before closing the connection
    expected_error: str | None = None


@dataclass
class Result:
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    events: int = 0
    hung_up: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def chaos_triton(tmp_path_factory, smol_dir) -> Iterator[RunningTriton]:
    root = tmp_path_factory.mktemp("chaos-artifacts")
    # float32: greedy answers in the storm must equal each request's answer alone, which
    # only float32 guarantees whatever shares the batch (see tritonop_backend.llm.loading).
    resource = llm(MODEL, "float32", engine={"maxSequences": 8, "maxWaiting": 32,
                                             "threads": 2})
    seed_model(smol_dir, root, MODEL)
    with running_triton([resource], root, tmp_path_factory.mktemp("chaos-triton")) as running:
        yield running


def stream(triton: RunningTriton, body: dict[str, Any], hang_up_after: int | None) -> Result:
    """One streamed request; closes the connection after ``hang_up_after`` events."""
    result = Result()
    with requests.post(f"{triton.http}/v2/models/{MODEL}/generate_stream",
                       json={**body, "stream": True}, stream=True, timeout=300) as response:
        result.status = response.status_code
        if response.status_code != 200:  # the error as JSON or as one server-sent event
            result.error = response.text
            return result
        if hang_up_after == 0:
            result.hung_up = True
            return result
        for line in response.iter_lines(chunk_size=None):
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            result.events += 1
            if "error" in event:
                result.error = event["error"]
                return result
            result.text += event["text_output"]
            if event["finish_reason"]:
                result.finish_reason = event["finish_reason"]
                return result
            if hang_up_after is not None and result.events >= hang_up_after:
                result.hung_up = True
                return result
    return result


def plans(rng: random.Random) -> list[Plan]:
    made = []
    for index in range(REQUESTS):
        prompt = rng.choice(PROMPTS)
        hang_up = rng.randrange(0, 6) if index % 3 == 0 else None
        roll = rng.random()
        if roll < 0.08:
            values, message = rng.choice(BAD)
            made.append(Plan({"text_input": prompt, **values}, "bad", None, message))
        elif roll < 0.6:
            options = rng.choice(GREEDY_OPTIONS)
            made.append(Plan({"text_input": prompt, "temperature": 0, **options}, "greedy",
                             hang_up))
        else:
            # Half the clients that hang up ask for long answers: their slots must come
            # back when they leave, not when the answer would have ended.
            longest = 200 if hang_up is not None and rng.random() < 0.5 else 12
            made.append(Plan({"text_input": prompt, "max_tokens": rng.randrange(1, longest + 1),
                              "temperature": rng.choice([0.5, 0.9, 1.3]),
                              "top_p": rng.choice([1.0, 0.9]), "top_k": rng.choice([0, 40]),
                              "seed": rng.randrange(1000)}, "sampled", hang_up))
    return made


def gauges(triton: RunningTriton) -> tuple[float, float]:
    page = requests.get(f"http://localhost:{triton.server.ports.metrics}/metrics",
                        timeout=10).text
    return (model_metric(page, "tritonop_llm_running_sequences", MODEL),
            model_metric(page, "tritonop_llm_waiting_requests", MODEL))


def stub_rss(triton: RunningTriton) -> int:
    """Resident memory of the chaos model's Python-backend stub process."""
    assert triton.server.process is not None
    server = psutil.Process(triton.server.process.pid)
    stubs = [child for child in server.children(recursive=True)
             if any(MODEL in part for part in child.cmdline())]
    assert len(stubs) == 1, [child.cmdline() for child in server.children(recursive=True)]
    return int(stubs[0].memory_info().rss)


def test_storm_of_streams_with_hang_ups_and_bad_requests(chaos_triton):
    rng = random.Random(11)
    storm = plans(rng)
    alone: dict[str, str] = {}
    for plan in storm:  # each greedy request once on its own, before the storm
        key = json.dumps(plan.body, sort_keys=True)
        if plan.kind == "greedy" and key not in alone:
            result = stream(chaos_triton, plan.body, None)
            assert result.status == 200 and result.finish_reason, result
            alone[key] = result.text
    before = stub_rss(chaos_triton)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda plan: stream(chaos_triton, plan.body,
                                                    plan.hang_up_after), storm))
    wall = time.monotonic() - started
    deadline = time.monotonic() + 10  # cancelled sequences leave within a step or two
    while gauges(chaos_triton) != (0.0, 0.0):
        assert time.monotonic() < deadline, f"gauges stuck at {gauges(chaos_triton)}"
        time.sleep(0.2)
    after = stub_rss(chaos_triton)

    counts: Counter[str] = Counter()
    for plan, result in zip(storm, results, strict=True):
        if plan.kind == "bad":
            assert result.status == 400 and plan.expected_error in (result.error or ""), result
            counts["bad"] += 1
            continue
        assert result.status == 200 and result.error is None, (plan, result)
        if result.hung_up:
            counts["hung up"] += 1
            continue
        counts[plan.kind] += 1
        assert result.finish_reason in ("stop", "length"), (plan, result)
        if plan.kind == "greedy":
            assert result.text == alone[json.dumps(plan.body, sort_keys=True)], plan
    print(f"\nchaos: {REQUESTS} requests ({dict(counts)}), {CLIENTS} clients, "
          f"{wall:.1f} s; stub RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB "
          f"after ({(after - before) / before:+.1%})")
    assert counts["hung up"] >= 40 and counts["bad"] >= 5 and counts["greedy"] >= 40
    assert after <= before * 1.10, (before, after)
    status, answer = chaos_triton.generate(MODEL, {"text_input": PROMPTS[0], "max_tokens": 8,
                                                   "temperature": 0})
    assert status == 200 and answer["finish_reason"] in ("stop", "length")
