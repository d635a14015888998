"""Decode tokens/s of a Mistral-7B-shaped model on a GPU, through ``LLMEngine`` directly.

The model is built from ``transformers.MistralConfig`` with Mistral-7B's shape (hidden
4096, 32 layers, 32 attention heads, 8 key/value heads, intermediate 14336, vocabulary
32000) and random weights, in bfloat16, straight on the GPU: nothing is downloaded.
Random weights cost what trained ones cost, and what is measured is the serving engine:
continuous batching, the preallocated key/value cache and per-row sampling.

Prompts are token ids (random, seeded) and the tokenizer maps ids to text and back, so
no tokenizer file is needed; end-of-sequence is disabled, so every stream generates
exactly ``--max-tokens`` tokens. For each stream count, all streams are added at once:
the first engine step prefills them (its time is the time to first token), the following
steps decode one token per stream each; decode tokens/s counts those steps only. Each
stream count runs through both decode paths of the engine: fixed-shape steps replayed as
CUDA graphs (the default on a GPU) and eager steps over the live cache window.

The baseline, in the same process and minutes: ``model.generate`` on the same model, one
request after the other (the same prompts, sampling and number of new tokens), as a user
of plain ``transformers`` would serve it. Each stream count's tokens/s (prefill included)
is reported against it as a ratio.

    python bench/llm_gpu.py                      # 1 and 32 streams
    python bench/llm_gpu.py --streams 1 8 32 64
    python bench/llm_gpu.py --tiny --device cpu --out /tmp/x.json   # check the script

First, unless ``--no-served``: the same model saved as a Hugging Face folder and served by
``tritonop serve`` (a real ``tritonserver`` and the gateway; ``bench/llm_served.py``), its
streams sent together through ``/v1/completions``, so the served figures sit beside the
engine's from the same run. ``--served-only`` skips the engine-alone part.

Figures go to ``bench/results/llm_gpu-<UTC timestamp>.json``, which ``python -m
bench.report`` shows in docs/benchmarks.md (S4, GPU). Without CUDA it says so and exits
with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too
RESULTS = Path(__file__).resolve().parent / "results"
MISTRAL_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000}
TINY = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 32000}
NO_CUDA = ("bench/llm_gpu.py needs a CUDA GPU and a CUDA build of torch; "
           "torch.cuda.is_available() is false here (torch {version}). Nothing was measured. "
           "Run it on a machine with a GPU, or add --tiny --device cpu to check the script.")


class IdTokenizer:
    """Text is token ids separated by spaces; each id decodes to `` <id>``.

    Decoding is a concatenation, so the engine's incremental detokenizer emits one piece
    per token, and there is no end-of-sequence token.
    """

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": [int(token) for token in text.split()]}

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {token}" for token in token_ids)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per stream")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3, help="runs per stream count; the "
                        "median is kept")
    parser.add_argument("--baseline-requests", type=int, default=3,
                        help="sequential model.generate calls for the baseline")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16",
                                                                "float32"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer model of the same family, to check the script")
    parser.add_argument("--no-served", action="store_true",
                        help="skip the same model served by tritonop serve (bench/llm_served.py)")
    parser.add_argument("--served-only", action="store_true",
                        help="measure only the served model, not the engine alone")
    parser.add_argument("--workdir", type=Path, help="where the served model's folder and "
                        "tritonop serve's files go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="write the figures here instead of "
                        "bench/results/llm_gpu-<timestamp>.json (--tiny writes none without it)")
    return parser.parse_args(argv)


def build_model(shape: dict[str, int], dtype: Any, device: str) -> Any:
    """A ``MistralForCausalLM`` with random weights, created directly on ``device``."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**shape, max_position_embeddings=32768, eos_token_id=None,
                           bos_token_id=None, pad_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    return model.eval()


def add_streams(engine: Any, prompts: list[str], max_tokens: int, temperature: float) -> None:
    """One request per prompt, each with its own seed, all queued before the next step."""
    from tritonop_backend.llm.params import parse_request

    for i, prompt in enumerate(prompts):
        engine.add(i, parse_request({"text_input": prompt, "max_tokens": max_tokens,
                                     "temperature": temperature, "seed": i}, engine.policy))


def measure(engine: Any, prompts: list[str], max_tokens: int, temperature: float,
            sync: Any) -> dict[str, Any]:
    """All ``prompts`` at once: prefill time, then decode tokens/s until every one is done."""
    add_streams(engine, prompts, max_tokens, temperature)
    started = time.perf_counter()
    first = engine.step()  # prefill of every prompt, and the first token of each
    sync()
    prefilled = time.perf_counter()
    tokens = sum(len(event.token_ids) for event in first)
    decoded = steps = 0
    while engine.has_work():
        decoded += sum(len(event.token_ids) for event in engine.step())
        steps += 1
    sync()
    ended = time.perf_counter()
    decode_s = max(ended - prefilled, 1e-9)
    return {"streams": len(prompts), "tokens": tokens + decoded,
            "decode_tokens_per_s": decoded / decode_s,
            "step_ms": round(decode_s / max(steps, 1) * 1000, 3),
            "prefill_ms": round((prefilled - started) * 1000, 3),
            "tokens_per_s": (tokens + decoded) / (ended - started),
            "seconds": round(ended - started, 3)}


def kernel_time(engine: Any, prompts: list[str], steps: int, temperature: float) -> float:
    """GPU time per decode step, in ms: the kernels' own time, from ``torch.profiler``.

    Set against the unprofiled step time, it says how much of a step the GPU is busy;
    the rest is the host (Python, the framework, kernel launches) keeping it waiting.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    add_streams(engine, prompts, steps + 2, temperature)
    engine.step()  # prefill, not profiled
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_work():
        engine.step()
    device_us = sum(event.self_device_time_total for event in profiler.key_averages())
    return round(device_us / 1000 / steps, 3)


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus bytes written."""
    import torch

    size = 1 << 30
    source = torch.empty(size, dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return round(2 * size * 10 / (start.elapsed_time(end) / 1000) / 1e9, 1)


def measure_generate(model: Any, prompts: list[str], max_tokens: int, temperature: float,
                     sync: Any) -> dict[str, Any]:
    """``model.generate`` on each prompt in turn, sampling as the engine does."""
    import torch

    device = next(model.parameters()).device
    tokens = 0
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        torch.manual_seed(i)
        ids = torch.tensor([[int(token) for token in prompt.split()]], device=device)
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                temperature=temperature, top_k=0, top_p=1.0,
                                max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                pad_token_id=0)
        tokens += output.shape[1] - ids.shape[1]
    sync()
    seconds = time.perf_counter() - started
    return {"requests": len(prompts), "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1)}


def measure_streams(engine: Any, prompts: list[str], args: argparse.Namespace,
                    baseline: dict[str, Any], sync: Any, cuda: bool) -> dict[str, Any]:
    """One stream count: a warm-up run, then the median of ``args.repeats`` runs."""
    # The first run at each stream count is 2-3x slower than the next ones (seen on an
    # H100, eager): the first use of these shapes. It is kept apart, as a warm-up.
    warmup = measure(engine, prompts, args.max_tokens, args.temperature, sync)
    repeats = [measure(engine, prompts, args.max_tokens, args.temperature, sync)
               for _ in range(args.repeats)]
    best = sorted(repeats, key=lambda r: r["decode_tokens_per_s"])[len(repeats) // 2]
    best["decode_tokens_per_s"] = round(best["decode_tokens_per_s"], 1)
    best["tokens_per_s"] = round(best["tokens_per_s"], 1)
    best["vs_generate"] = round(best["tokens_per_s"] / baseline["tokens_per_s"], 2)
    best["warmup_decode_tokens_per_s"] = round(warmup["decode_tokens_per_s"], 1)
    best["repeats_decode_tokens_per_s"] = [round(r["decode_tokens_per_s"], 1) for r in repeats]
    if cuda:
        best["kernel_ms_per_step"] = kernel_time(engine, prompts, 16, args.temperature)
    return best


def gpu_processes() -> list[str]:
    """What ``nvidia-smi`` says holds GPU memory: the proof that a model ran there."""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as err:
        return [f"nvidia-smi: {err}"]


def measure_served_model(model: Any, prompts: list[str], args: argparse.Namespace,
                         context: int) -> dict[str, Any]:
    """The same model, saved as a folder and served by ``tritonop serve``; its figures."""
    from bench.llm_served import llm_service, measure_served, serving, write_folder

    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        started = time.perf_counter()
        folder = write_folder(model, Path(work) / "model")
        saved = time.perf_counter()
        resource = llm_service(folder, args.dtype, args.max_tokens, context, max(args.streams))
        if not cuda:
            resource["spec"]["model"]["device"] = "cpu"
            resource["spec"]["gpus"] = 0
        try:
            with serving(resource, Path(work)) as url:
                ready = time.perf_counter()
                processes = gpu_processes() if cuda else []
                runs = measure_served(url, resource["metadata"]["name"], prompts, args.streams,
                                      args.max_tokens, args.temperature, args.repeats)
        except Exception as err:  # the engine-alone figures still count
            log = Path(work) / "serve.log"
            print(f"served: {err}", file=sys.stderr, flush=True)
            return {"served_error": str(err)[-4000:] + (log.read_text()[-4000:]
                                                        if log.exists() else "")}
    return {"served": runs, "served_gpu_processes": processes,
            "served_save_s": round(saved - started, 1), "served_start_s": round(ready - saved, 1)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(NO_CUDA.format(version=torch.__version__), file=sys.stderr)
        return 2
    from tritonop_backend.llm.engine import LLMEngine
    from tritonop_backend.llm.params import GenerationPolicy

    dtype = getattr(torch, args.dtype)
    shape = TINY if args.tiny else MISTRAL_7B
    started = datetime.now(UTC)
    model = build_model(shape, dtype, args.device)
    parameters = sum(p.numel() for p in model.parameters())
    context = args.prompt_tokens + args.max_tokens + 8
    policy = GenerationPolicy(default_max_tokens=args.max_tokens,
                              max_tokens_limit=args.max_tokens, default_temperature=0.0,
                              max_context_tokens=context, apply_chat_template=False)
    widest = max(args.streams)
    count = max(widest, args.baseline_requests)
    rng = random.Random(20240605)
    prompts = [" ".join(str(rng.randrange(100, shape["vocab_size"]))
                        for _ in range(args.prompt_tokens)) for _ in range(count)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    served = None if args.no_served else measure_served_model(model, prompts, args, context)
    # The engine's two decode paths: fixed-shape steps (replayed as CUDA graphs on a GPU)
    # and eager steps over the live window.
    modes = {} if args.served_only else {"cuda-graphs" if cuda else "fixed-shape": True,
                                         "eager": False}
    baseline = None
    if modes:
        # Its warm-up: one whole request, as the engine's runs get one per stream count.
        measure_generate(model, prompts[:1], args.max_tokens, args.temperature, sync)
        baseline = measure_generate(model, prompts[:args.baseline_requests], args.max_tokens,
                                    args.temperature, sync)
        print(f"sequential model.generate: {baseline['tokens_per_s']:9.1f} tokens/s "
              f"({baseline['requests']} requests)", flush=True)
    runs = []
    for mode, static in modes.items():
        engine = LLMEngine(model, IdTokenizer(), policy, max_sequences=widest, max_waiting=0,
                           max_prefill_tokens=widest * args.prompt_tokens,
                           static_decode=static)
        measure(engine, prompts[:widest], 4, args.temperature, sync)  # kernels, cache storage
        for streams in args.streams:
            best = measure_streams(engine, prompts[:streams], args, baseline, sync, cuda)
            best["mode"] = mode
            runs.append(best)
            busy = (f", GPU kernels {best['kernel_ms_per_step']:.1f} ms per step"
                    if cuda else "")
            print(f"{mode:>12} {streams:4d} streams: decode {best['decode_tokens_per_s']:9.1f} "
                  f"tokens/s ({best['decode_tokens_per_s'] / streams:.1f} per stream, step "
                  f"{best['step_ms']:.1f} ms), prefill {best['prefill_ms']:.0f} ms, "
                  f"{best['vs_generate']}x sequential generate{busy}", flush=True)
        del engine
        if cuda:
            torch.cuda.empty_cache()
    body = {
        "kind": "llm_gpu",
        "started": started.strftime("%Y%m%dT%H%M%SZ"),
        "model": "Mistral-7B-shaped, random weights" if not args.tiny else "tiny Mistral",
        "config": shape,
        "parameters": parameters,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else "none (CPU)",
        "copy_gb_per_s": copy_bandwidth() if cuda else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "generate": baseline,
        "runs": runs,
        **(served or {}),
    }
    out = args.out or (None if args.tiny else RESULTS / f"llm_gpu-{body['started']}.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(body, indent=1) + "\n")
        print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
