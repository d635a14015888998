"""Decode step time of the fixed-shape (CUDA-graph) step: columns in use vs the whole cache.

The key/value cache is allocated whole at load, for the full context. A fixed-shape step
that read every column would pay for the whole context at every step, however short the
sequences; the engine's step reads a width bucket just past the newest token instead.
This script measures one decode step with N sequences of ``--prompt-tokens`` tokens in a
cache sized for ``--context`` tokens, both ways: ``used`` (the engine as it is) and
``all`` (the width bucket forced to the whole capacity, which is what a step reading
every column costs).

Random-weight Mistral-shaped models, nothing downloaded: ``--shape small`` (4 layers,
hidden 512) for the CPU, ``--shape 7b`` (Mistral-7B) for a GPU, where the step is
replayed as a CUDA graph. Prompts are random token ids; end-of-sequence is off.

    python bench/llm_columns.py --device cpu --rows 8 64
    python bench/llm_columns.py --device cuda --shape 7b --dtype bfloat16 --rows 8 64

Measured (context 2,048: 2,560 columns with headroom; 96-token prompts; ms per step):

    device, model                    rows   columns in use   all columns   before*
    CPU (2 cores, 1 thread), small      8        15.0            28.4        19.8
    CPU (2 cores, 1 thread), small     64        50.7           156.2        96.5
    H200, 7B shape, bf16, graphs        8         8.6            21.9         9.3
    H200, 7B shape, bf16, graphs       64        15.3           115.6        20.3

    * the engine before the cache was allocated at load: the buffer grew on demand
      (256 columns here) and the step read all of it. "all columns" is what reading the
      whole preallocated context would cost; "columns in use" reads 128 here.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too
from bench.llm_gpu import IdTokenizer, build_model

SHAPES = {
    "small": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 4, "intermediate_size": 1024, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--columns", nargs="+", default=["used", "all"], choices=("used", "all"))
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per run")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def step_ms(model: Any, rows: int, columns: str, args: argparse.Namespace) -> dict[str, Any]:
    """Median milliseconds of one decode step with ``rows`` sequences running."""
    import torch

    from tritonop_backend.llm import graphs
    from tritonop_backend.llm.engine import LLMEngine
    from tritonop_backend.llm.params import GenerationPolicy, parse_request

    policy = GenerationPolicy(default_max_tokens=512, max_tokens_limit=512,
                              default_temperature=0.0, max_context_tokens=args.context,
                              apply_chat_template=False)
    engine = LLMEngine(model, IdTokenizer(), policy, max_sequences=rows, max_waiting=0,
                       max_prefill_tokens=rows * args.prompt_tokens, static_decode=True)
    original = getattr(graphs, "width_bucket", None)
    if columns == "all":
        if original is None:
            raise SystemExit("this tritonop_backend has no width buckets: --columns used only")
        graphs.width_bucket = lambda used, capacity: capacity  # type: ignore[assignment]
    rng = random.Random(rows)
    try:
        for i in range(rows):
            prompt = " ".join(str(rng.randrange(100, 32000)) for _ in range(args.prompt_tokens))
            engine.add(i, parse_request({"text_input": prompt}, policy))
        engine.step()  # prefill
        for _ in range(3):  # warm-up (and graph recording on a GPU)
            engine.step()
        times = []
        for _ in range(args.steps):
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            engine.step()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        if original is not None:
            graphs.width_bucket = original  # type: ignore[assignment]
    static = engine._static
    width = (sorted({w for _, w in static._inputs})[-1] if static is not None
             and isinstance(next(iter(static._inputs), None), tuple) else engine._kv.capacity)
    return {"rows": rows, "columns": columns, "step_ms": round(statistics.median(times), 2),
            "width_read": width, "capacity": engine._kv.capacity,
            "graphs": bool(static is not None and static.graphs)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU; none here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model = build_model(SHAPES[args.shape], getattr(torch, args.dtype), args.device)
    results = []
    for rows in args.rows:
        for columns in args.columns:
            result = step_ms(model, rows, columns, args)
            results.append(result)
            print(f"{rows:3d} rows, columns {columns:>4}: {result['step_ms']:8.2f} ms per step "
                  f"(reads {result['width_read']} of {result['capacity']} columns)", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump({"device": args.device, "shape": args.shape, "dtype": args.dtype,
                       "context": args.context, "prompt_tokens": args.prompt_tokens,
                       "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                       "runs": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
