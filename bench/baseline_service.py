"""The classic Python search service that tritonop is compared with (S2's baseline (a)).

Built the way the usual FastAPI + sentence-transformers tutorial builds it, with the
tuning a careful engineer would add, so that the comparison is with a good version of
the common approach rather than a strawman:

* the model is loaded once per worker process, at import, not per request;
* the corpus embeddings are loaded once (precomputed, from the same index file Triton
  serves, so both services return the same ids) and normalized once, so a search is
  one matrix-vector product;
* top-k uses ``np.argpartition`` (linear) and sorts only the k winners;
* the endpoint is a plain ``def``: FastAPI runs it in its thread pool, so the encoder
  never blocks the event loop and concurrent requests run torch in parallel (torch
  releases the GIL inside its kernels);
* torch's intra-op threads are set explicitly per worker (``BENCH_TORCH_THREADS``),
  so that workers x threads does not oversubscribe the cores.

Run: ``uvicorn bench.baseline_service:app --workers N`` with ``BENCH_MODEL_DIR`` (a
sentence-transformers model directory) and ``BENCH_INDEX_DIR`` (a tritonop index) set.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer

from tritonop_backend.text_column import TextColumn

torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "1")))

_index = Path(os.environ["BENCH_INDEX_DIR"])
model = SentenceTransformer(os.environ["BENCH_MODEL_DIR"], device="cpu")
corpus = load_file(str(_index / "embeddings.safetensors"))["embeddings"].astype(np.float32)
corpus /= np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-12)
texts = [text.decode("utf-8") for text in TextColumn.load(_index)]  # either texts layout

app = FastAPI(title="classic semantic search")


class Query(BaseModel):
    text: str = Field(min_length=1)
    num_results: int = Field(10, ge=1, le=100)


@app.post("/search")
def search(query: Query) -> dict[str, list]:
    embedding = model.encode(query.text, normalize_embeddings=True, convert_to_numpy=True)
    scores = corpus @ embedding
    k = min(query.num_results, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top], kind="stable")]
    return {"ids": top.tolist(), "scores": scores[top].tolist(),
            "texts": [texts[i] for i in top]}


@app.get("/health")
def health() -> dict[str, int]:
    return {"pid": os.getpid()}
