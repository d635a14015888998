"""RERANK: ``/v1/rerank`` of 50 documents against Infinity's ``/rerank``, same model, same run.

The cross-encoder: all-MiniLM-L6-v2's BERT (6 layers, 384 wide: the architecture of
cross-encoder/ms-marco-MiniLM-L-6-v2, the reranker most pipelines start from) with a
seeded one-label classification head, saved by sentence-transformers' ``CrossEncoder``.
No cross-encoder ships in a package here and model hubs cannot be reached, so its scores
mean nothing; what it costs per pair is the real model's, which is what is measured.

Ours: the example resource with ``spec.rerank.model`` set to that folder (TorchScript, its
default; batches of up to 8 requests; one instance with two threads), served by
``tritonserver`` behind the gateway,
which sends each request's pairs to the ``<name>_rerank`` model. Theirs: Infinity (the
environment S2 installs) serving the same folder with its torch engine, its default for
cross-encoders. Each request: one query text and the same 50 corpus texts, all scored
(``top_n`` 50). One client (p50), then 4 (throughput), each side started, measured and
stopped in turn (bench/alternation.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import baselines, servers
from bench.alternation import alternate, p, ratio
from bench.context import Context, log
from bench.loadgen import BAD_PAYLOAD, OK, _HttpSession
from bench.scenarios.s2 import closed_loops
from bench.scenarios.s6 import gateway
from bench.targets import at_least, at_most, held
from tritonop.artifacts.corpus import read_corpus
from tritonop.artifacts.sources import locate

DOCUMENTS = 50
LEVELS = ("1", "4")
QPS = "throughput_qps"
SEED = 50
# One instance computing with both cores: a request of 50 pairs is enough work to share.
# Two one-thread instances, as the example runs its encoder, answered one client 1.47x
# slower than Infinity (and four 1.33x faster): 20261207T033108Z.json.
STAGE = {"instances": 1, "threads": 2}
WARMUP_S = 2.0  # a request of 50 pairs takes ~0.6 s on one core


class RerankClient(_HttpSession):
    """One query and the fixed documents per request, to ours or Infinity's rerank."""

    def __init__(self, url: str, model: str, documents: list[str], name: str) -> None:
        self.url, self.model, self.documents, self.name = url, model, documents, name

    async def send(self, text: str) -> int:
        body = {"model": self.model, "query": text, "documents": self.documents,
                "top_n": len(self.documents), "return_documents": False}
        async with self._session.post(self.url, json=body) as response:
            if response.status != OK:
                await response.read()
                return response.status
            answer = await response.json(content_type=None)
        return OK if len(answer.get("results", ())) == len(self.documents) else BAD_PAYLOAD


def cross_encoder(source_dir: Path, target: Path) -> Path:
    """The benchmark's cross-encoder (see the module), built once into ``target``."""
    if (target / ".ready").exists():
        return target
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(SEED)
    hf_dir = staging / "transformers"
    model = AutoModelForSequenceClassification.from_pretrained(source_dir, num_labels=1)
    model.save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(hf_dir)
    CrossEncoder(str(hf_dir), device="cpu").save(str(staging / "model"))
    shutil.rmtree(hf_dir)
    (staging / ".ready").touch()
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def run(ctx: Context) -> dict[str, Any]:
    example = ctx.resource()
    spec = example.spec
    source_dir = locate(spec.model.source, example.base_dir)  # type: ignore[union-attr]
    model_dir = cross_encoder(source_dir, ctx.artifacts_root.parent / "bench-cross-encoder"
                              ) / "model"
    resource = ctx.resource({"spec": {"rerank": {"model": {"source": str(model_dir)},
                                                 "stage": STAGE}}})
    corpus = read_corpus(example.resolve_path(spec.corpus.source),  # type: ignore[union-attr]
                         spec.corpus.text_field)  # type: ignore[union-attr]
    documents = corpus[:DOCUMENTS]
    texts = ctx.queries()
    scratch = ctx.scratch("rerank")
    infinity: dict[str, Any] = {}

    @contextmanager
    def ours() -> Iterator[dict[str, Callable[[], Any]]]:
        with servers.triton([resource], ctx.artifacts_root, scratch) as server, \
                gateway(resource, server, scratch / "gateway") as process:
            yield {"tritonop": lambda: RerankClient(f"{process.url}/v1/rerank", resource.name,
                                                    documents, "tritonop")}

    @contextmanager
    def theirs() -> Iterator[dict[str, Callable[[], Any]]]:
        with baselines.infinity_rerank(model_dir, scratch) as info:
            infinity.update(info)
            yield {"infinity": lambda: RerankClient(str(info["url"]), str(info["model"]),
                                                    documents, "infinity")}

    sides: dict[str, Any] = {"tritonop": ours}
    unavailable: dict[str, str] = {}
    if ctx.baselines:
        sides["infinity"] = theirs
    else:
        unavailable["infinity"] = baselines.TURNED_OFF
    seconds = ctx.sizes.rerank_seconds / ctx.sizes.alternations
    series, quiet = alternate(sides, LEVELS, ctx.sizes.alternations,
                              closed_loops(texts, seconds, WARMUP_S), key=QPS,
                              settle_s=ctx.sizes.settle_seconds, unavailable=unavailable)
    if "infinity" in unavailable:
        log.warning("RERANK: Infinity not measured: %s", unavailable["infinity"])
        infinity = {"error": unavailable["infinity"]}
    p50 = ratio(series, "tritonop", "infinity", LEVELS[0], p("p50"))
    qps = ratio(series, "tritonop", "infinity", LEVELS[-1], lambda f: f[QPS])
    comparisons = [{"ours": "tritonop", "theirs": "infinity", "what": what, "level": level,
                    **found} for what, level, found in (("p50", LEVELS[0], p50),
                                                         ("requests/s", LEVELS[-1], qps))
                   if found]
    return {
        "documents": DOCUMENTS, "cross_encoder": str(model_dir), "levels": list(LEVELS),
        "stage": STAGE,
        "series": series, "quiet": quiet, "comparisons": comparisons, "infinity": infinity,
        "cpu_count": os.cpu_count(),
        "targets": [
            held(at_most, "RERANK.p50_vs_infinity", f"/v1/rerank of {DOCUMENTS} documents, "
                 "p50 at 1 client / Infinity's /rerank", p50, 1.0, quiet),
            held(at_least, "RERANK.qps_vs_infinity", f"/v1/rerank of {DOCUMENTS} documents, "
                 f"requests/s at {LEVELS[-1]} clients / Infinity's", qps, 1.0, quiet),
        ],
    }

