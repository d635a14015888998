"""The Mistral-7B-shaped model of ``bench/llm_gpu.py``, served: ``tritonop serve`` on the GPU.

The model folder is what a user's download would be (``config.json``, safetensors,
``tokenizer.json``), written from the random-weight model; the tokenizer is word-level
over the ids' decimal spellings (``"17"`` is token 17; 0 is unknown), so the engine-alone
prompts mean the same tokens here. An LLMService over that folder (``device: cuda``, ``gpus: 1``) is
served by ``tritonop serve`` through a real ``tritonserver`` and the OpenAI gateway; every
stream count sends its streams together as ``/v1/completions`` requests with
``stream: true``, each counting its tokens from the last chunk's ``usage``.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench.servers import free_port


def write_folder(model: Any, folder: Path) -> Path:
    """``model`` as a Hugging Face folder with a word-level tokenizer over its ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = model.config.vocab_size
    words = {"<unk>": 0, **{str(i): i for i in range(1, vocab)}}
    raw = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(str(folder))
    return folder


def llm_service(folder: Path, dtype: str, max_tokens: int, context: int, streams: int) -> dict:
    return {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "LLMService",
            "metadata": {"name": "mistral-7b-shaped"}, "spec": {
                "model": {"source": str(folder), "dtype": dtype, "device": "cuda",
                          "maxContextLength": context},
                "gpus": 1,
                "generation": {"chatTemplate": False, "defaults": {"maxTokens": max_tokens},
                               "limits": {"maxTokens": max_tokens}},
                "engine": {"maxSequences": streams, "maxWaiting": 2 * streams,
                           "cudaGraphs": True},
                "batching": {"maxBatchSize": streams, "maxQueueSize": 4 * streams}}}


@contextmanager
def serving(resource: dict, workdir: Path, timeout: float = 900) -> Iterator[str]:
    """``tritonop serve`` over ``resource`` until it is ready; yields the gateway's URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "llmservice.yaml"
    path.write_text(json.dumps(resource))
    port = free_port()
    command = [sys.executable, "-m", "tritonop.cli", "serve", str(path),
               "--workdir", str(workdir / "serve"), "--artifacts-root", str(workdir / "art"),
               "--openai-port", str(port), "--http-port", str(free_port()),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    log = (workdir / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout
        while "Press Ctrl-C to stop." not in (workdir / "serve.log").read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tritonop serve did not become ready:\n"
                                   + (workdir / "serve.log").read_text()[-4000:])
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def stream(url: str, model: str, prompt: str, max_tokens: int, temperature: float,
           seed: int) -> dict[str, float]:
    """One streamed completion: when it was sent, its first text, its end, and its tokens."""
    sent = time.perf_counter()
    first = None
    tokens = 0
    with requests.post(f"{url}/v1/completions", stream=True, timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"sent": sent, "first": first or time.perf_counter(), "end": time.perf_counter(),
            "tokens": tokens}


def measure(url: str, model: str, prompts: list[str], max_tokens: int,
            temperature: float) -> dict[str, Any]:
    """All ``prompts`` sent together: time to first token, then decode tokens/s."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        done = list(pool.map(lambda item: stream(url, model, item[1], max_tokens, temperature,
                                                 item[0]), enumerate(prompts)))
    started = min(d["sent"] for d in done)
    ended = max(d["end"] for d in done)
    first = max(d["first"] for d in done)
    tokens = sum(d["tokens"] for d in done)
    decoded = sum(max(d["tokens"] - 1, 0) for d in done)
    return {"streams": len(prompts), "tokens": tokens,
            "decode_tokens_per_s": decoded / max(ended - first, 1e-9),
            "ttft_ms": round(statistics.median(d["first"] - d["sent"] for d in done) * 1000, 1),
            "tokens_per_s": tokens / (ended - started), "seconds": round(ended - started, 3)}


def measure_served(url: str, model: str, prompts: list[str], streams: list[int],
                   max_tokens: int, temperature: float, repeats: int) -> list[dict[str, Any]]:
    """Per stream count, a warm-up run then the median of ``repeats`` runs."""
    runs = []
    for count in streams:
        warmup = measure(url, model, prompts[:count], max_tokens, temperature)
        done = [measure(url, model, prompts[:count], max_tokens, temperature)
                for _ in range(repeats)]
        best = sorted(done, key=lambda r: r["decode_tokens_per_s"])[len(done) // 2]
        best.update(mode="tritonop serve", decode_tokens_per_s=round(
            best["decode_tokens_per_s"], 1), tokens_per_s=round(best["tokens_per_s"], 1),
            warmup_decode_tokens_per_s=round(warmup["decode_tokens_per_s"], 1),
            repeats_decode_tokens_per_s=[round(r["decode_tokens_per_s"], 1) for r in done])
        print(f"{'served':>12} {count:4d} streams: decode {best['decode_tokens_per_s']:9.1f} "
              f"tokens/s, TTFT p50 {best['ttft_ms']:.0f} ms", flush=True)
        runs.append(best)
    return runs
