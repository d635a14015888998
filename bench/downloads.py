"""How fast ``fetch`` brings a model from each kind of remote source into its cache.

A model folder of about ``--megabytes`` MB is built (config, generation config, tokenizer
files, and a ``model.safetensors`` of random bytes in a valid safetensors layout: its header
names one float16 tensor) and served, each on loopback, from

* the project's Hugging Face Hub-compatible server (``hf://bench/model``, the branch ``main``),
* moto's S3 server (``s3://bench/model``, uploaded as ``aws s3 sync`` would, in 5 MiB parts),
* an https file server with a self-signed certificate, as one file: the same weights under
  a ``.gguf`` name, with its sha256 (``fetch`` checks the hash, never the format).

The servers are the tests' own (``tests.support.hub``, ``tests.support.s3``,
``tests.support.tls``), imported here rather than copied; they run
in a child process, so the measuring process holds only the client. For each source:
``fetch`` into an empty cache (cold: listing, download, hash check, rename into place) and
then again into the same cache (cached: a branch or an S3 prefix costs one metadata call, an
https sha256 none).

    python -m bench.downloads                  # 500 MB
    python -m bench.downloads --megabytes 4 --out /tmp/downloads.json   # check the script
    python -m bench.report                     # put the figures on docs/benchmarks.md

Figures go to ``bench/results/downloads-<UTC timestamp>.json``; the model, the servers'
copies and the caches live in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, too
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("huggingface_hub", "boto3", "botocore", "moto")
HIDDEN = 4096  # the weights: one float16 tensor of HIDDEN columns
GGUF_NAME = "model-f16.gguf"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.downloads",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=500,
                        help="size of the weights in MB of 10^6 bytes (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="write the figures here instead of "
                        "bench/results/downloads-<timestamp>.json")
    return parser.parse_args(argv)


def build_model(folder: Path, megabytes: float) -> None:
    """A model folder as users upload it, its weights random bytes in a safetensors layout."""
    rows = max(1, int(megabytes * 1e6) // (HIDDEN * 2))
    vocab = {f"tok{i}": i for i in range(32000)}
    small = {
        "config.json": {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                        "hidden_size": HIDDEN, "vocab_size": rows, "torch_dtype": "float16"},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
        "tokenizer.json": {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab,
                                                       "unk_token": "tok0"}},
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"},
        "special_tokens_map.json": {"unk_token": "tok0"},
    }
    folder.mkdir(parents=True)
    for name, body in small.items():
        (folder / name).write_text(json.dumps(body))
    size = rows * HIDDEN * 2
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "F16", "shape": [rows, HIDDEN], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with open(folder / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for start in range(0, size, 16 << 20):
            out.write(os.urandom(min(16 << 20, size - start)))


def serve(folder: Path, work: Path, conn: Connection) -> None:
    """In a child process: put ``folder`` on the three servers, send the sources, serve
    until told to stop."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    from tests.support.hub import HubServer
    from tests.support.s3 import start_s3
    from tests.support.tls import https_files, self_signed

    with ExitStack() as stack:
        hub = stack.enter_context(HubServer(work / "hub", tokens=("hf_bench",)))
        hub.create_repo("bench/model").commit_folder(folder)
        store = start_s3()
        stack.callback(store.stop)
        store.upload_folder(folder, "bench", "model")
        files = work / "https"
        files.mkdir()
        (files / GGUF_NAME).hardlink_to(folder / "model.safetensors")
        pem = self_signed("127.0.0.1")
        for name, text in pem.items():
            (work / name).write_text(text)
        base = stack.enter_context(https_files(files, work / "tls.crt", work / "tls.key"))
        with open(files / GGUF_NAME, "rb") as data:
            sha256 = hashlib.file_digest(data, "sha256").hexdigest()
        conn.send({
            "hf": ("hf://bench/model", {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_bench"},
                   {}),
            "s3": ("s3://bench/model", store.reader.env, {"s3_endpoint": store.endpoint}),
            "https": (f"{base}/{GGUF_NAME}", {}, {"sha256": sha256}),
            "certificate": str(work / "tls.crt"),
        })
        conn.recv()  # stop


def measure(text: str, env: dict[str, str], options: dict[str, Any], cache: Path,
            ) -> dict[str, Any]:
    """Cold (empty cache) and cached (the same cache again) fetches of one source."""
    from tritonop.artifacts.fetch import ModelSource, fetch

    source = ModelSource.parse(text, **options)
    started = time.perf_counter()
    fetched = fetch(source, cache, env=env)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    again = fetch(source, cache, env=env)
    cached = time.perf_counter() - started
    assert again.directory == fetched.directory, (fetched, again)
    size = sum((fetched.directory / name).stat().st_size for name in fetched.files)
    return {"source": text.split("://")[0], "url": text, "files": len(fetched.files),
            "bytes": size, "cold_s": round(cold, 3), "mb_per_s": round(size / cold / 1e6, 1),
            "cached_s": round(cached, 4),
            "cached_calls": {"hf": "one model_info call (the branch's commit)",
                             "s3": "one listing (the objects' ETags)",
                             "https": "none (the sha256 names the revision)"}[source.scheme]}


def machine() -> dict[str, Any]:
    from bench.run import machine as bench_machine

    described = bench_machine()
    described["packages"] = {p: metadata.version(p) for p in PACKAGES}
    return described


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC)
    load_start = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="tritonop-downloads-") as temp:
        work = Path(temp)
        build_model(work / "model", args.megabytes)
        built = {p.name: p.stat().st_size for p in sorted((work / "model").iterdir())}
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("spawn").Process(
            target=serve, args=(work / "model", work, theirs), daemon=True)
        child.start()
        saved = os.environ.get("SSL_CERT_FILE")
        try:
            if ours not in wait([ours, child.sentinel], timeout=600):
                raise RuntimeError(f"the servers did not start (child exit code "
                                   f"{child.exitcode})")
            sources = ours.recv()
            os.environ["SSL_CERT_FILE"] = sources.pop("certificate")  # trust the test server
            for key, (text, env, options) in sources.items():
                runs.append(measure(text, env, options, work / "cache" / key))
                print(f"{key:>6}: {runs[-1]['bytes'] / 1e6:.0f} MB cold "
                      f"{runs[-1]['cold_s']:.2f} s ({runs[-1]['mb_per_s']:.0f} MB/s), cached "
                      f"{runs[-1]['cached_s'] * 1000:.1f} ms", flush=True)
                shutil.rmtree(work / "cache" / key)
        finally:
            if saved is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = saved
            ours.send("stop")
            child.join(60)
    body = {
        "kind": "downloads",
        "started": started.strftime("%Y%m%dT%H%M%SZ"),
        "megabytes": args.megabytes,
        "model": built,
        "runs": runs,
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    out = args.out or RESULTS / f"downloads-{body['started']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
