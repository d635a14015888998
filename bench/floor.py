"""The floor of S2: the same model and search in this process, batched by 32, no server.

It runs the very code Triton's models run (tokenizer, exported encoder, pooling,
search from ``tritonop_backend``), in a plain loop over batches of 32 queries. No
server can do the same work faster on the same cores, so Triton's throughput as a
fraction of this is what the server machinery costs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritonop_backend.artifacts import TOKENIZER_FILE, ModelManifest
from tritonop_backend.encoder import encode_ragged, load_encoder
from tritonop_backend.pooling import l2_normalize, pool
from tritonop_backend.search import load_index
from tritonop_backend.tokenizer import TextTokenizer


def floor_throughput(model_dir: Path, index_dir: Path, texts: Sequence[str], *,
                     threads: int, batch_size: int = 32, k: int = 10,
                     min_seconds: float = 5.0) -> dict[str, Any]:
    """Queries per second of the in-process pipeline over ``texts``, in batches.

    Goes over ``texts`` once (after one warm-up batch), and again while less than
    ``min_seconds`` have passed, so that a short query list still gives a stable rate.
    """
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    manifest = ModelManifest.read(model_dir)
    tokenizer = TextTokenizer(model_dir / TOKENIZER_FILE, manifest.max_sequence_length)
    encoder = load_encoder(model_dir, threads)
    index, _ = load_index(index_dir)

    def search(batch: Sequence[str]) -> None:
        ids, mask = tokenizer.encode(list(batch))
        (hidden,) = encode_ragged(encoder, [(ids, mask)])  # packed, as the encoder model runs
        vectors = l2_normalize(pool(hidden, mask, manifest.pooling))
        index.search(vectors, k)

    with threadpool_limits(limits=threads, user_api="blas"):
        search(texts[:batch_size])
        done = 0
        started = time.perf_counter()
        while True:
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                search(batch)
                done += len(batch)
            if time.perf_counter() - started >= min_seconds:
                break
        seconds = time.perf_counter() - started
    return {"threads": threads, "batch_size": batch_size, "queries": done,
            "seconds": round(seconds, 3), "throughput_qps": round(done / seconds, 2)}
