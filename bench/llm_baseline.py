"""S4's baseline: Hugging Face's own ``model.generate``, one prompt after the other.

Run by S4 as a child process, before the server starts and after it stops (never while
it runs), with the environment the server gives its model processes (one OpenMP thread
by default, passive waits) and the LLM instance's torch thread count, so the two differ
only in what is measured: the serving stack and its continuous batching.

    python -m bench.llm_baseline --model-dir DIR --threads 2 --requests requests.json \\
        --out figures.json

``requests.json`` is a list of ``{"text_input", "max_tokens", "temperature", "top_p",
"top_k", "seed"}``; each is generated with the chat template applied, sampling with
those parameters (the server's defaults filled in by S4), seeded, and timed from the
prompt's tokenization to the last token; a streamer records when each token came.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

from transformers.generation.streamers import BaseStreamer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--requests", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="as the service's model.device: auto means CUDA when present")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-chat-template", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from tritonop_backend.llm.loading import load_causal_lm

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    loaded = load_causal_lm(args.model_dir, args.dtype, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    requests = json.loads(args.requests.read_text())

    def encode(prompt: str) -> Any:
        if args.no_chat_template:
            ids = tokenizer(prompt)["input_ids"]
        else:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], device=loaded.device)

    def generate(request: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        ids = encode(request["text_input"])
        streamer = _Clock()
        torch.manual_seed(int(request["seed"]))
        with torch.inference_mode():
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True,
                temperature=request["temperature"], top_p=request["top_p"],
                top_k=request["top_k"], max_new_tokens=request["max_tokens"],
                pad_token_id=tokenizer.eos_token_id, streamer=streamer)
        ended = time.perf_counter()
        times = [t - started for t in streamer.times]
        return {"seconds": ended - started, "prompt_tokens": int(ids.shape[1]),
                "completion_tokens": int(output.shape[1] - ids.shape[1]),
                "ttft_s": times[0] if times else None,
                "itl_s": [b - a for a, b in itertools.pairwise(times)]}

    generate({**requests[0], "max_tokens": 4})  # warm-up: lazy allocations are not timed
    runs = [generate(request) for request in requests]
    args.out.write_text(json.dumps({
        "threads": torch.get_num_threads(), "pid": os.getpid(), "dtype": str(loaded.dtype),
        "packed_layers": loaded.packed_layers,
        "device": str(loaded.device), "cuda_available": cuda,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "runs": runs,
    }) + "\n")
    return 0


class _Clock(BaseStreamer):
    """A ``generate`` streamer that notes when each new token is produced."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate hands the streamer the prompt first
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
