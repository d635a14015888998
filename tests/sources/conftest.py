"""Servers for the model-source tests: a Hub-compatible server and moto's S3, on loopback.

Both are started once per session. The model files are a sentence-transformers layout as
users upload it (configs, tokenizer files, real safetensors of random weights) plus what a
repository also holds and serving never reads (a README, an ONNX export, pickled duplicates
of the weights, training state), so that a test can see what was left out. Downloading
never parses weights; loading fetched models is tested where they are served.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from tests.support.hub import HubServer
from tests.support.s3 import S3Store, start_s3

# What fetch must bring of model_files(): the files serving reads.
SERVED = frozenset({
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "1_Pooling/config.json", "model.safetensors",
})
GOOD_TOKEN = "hf_good"
OTHER_TOKEN = "hf_other"  # known to the server, no access to the private repository


def weights(seed: int, rows: int) -> bytes:
    """A real safetensors file of random float32 weights, ``rows`` x 64."""
    rng = np.random.default_rng(seed)
    return save({"embeddings.word_embeddings.weight":
                 rng.standard_normal((rows, 64), dtype=np.float32)})


def model_files(hidden: int = 32, seed: int = 0, rows: int = 64) -> dict[str, bytes]:
    """A tiny BERT sentence-transformers repository's files, with the ones serving skips."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "storm", "europe", "climate"]
    config = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hidden,
              "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": len(vocab)}
    wordpiece = {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(vocab)}}
    as_json = {name: json.dumps(body).encode() for name, body in {
        "config.json": config,
        "tokenizer.json": {"version": "1.0", "model": wordpiece},
        "tokenizer_config.json": {"tokenizer_class": "BertTokenizer", "do_lower_case": True},
        "special_tokens_map.json": {"cls_token": "[CLS]", "sep_token": "[SEP]"},
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type":
                          "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type":
                          "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": False},
        "config_sentence_transformers.json": {"prompts": {}, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": {"word_embedding_dimension": hidden,
                                  "pooling_mode_mean_tokens": True},
    }.items()}
    blob = weights(seed, rows)
    return {**as_json, "vocab.txt": "\n".join(vocab).encode(), "model.safetensors": blob,
            "README.md": b"# tiny bert\n", "onnx/model.onnx": b"\x08\x07onnx" * 100,
            "pytorch_model.bin": pickle.dumps({"weights": blob}),
            "training_args.bin": pickle.dumps({"lr": 1e-4})}


@dataclass(frozen=True)
class Repos:
    """The repositories on the test hub and the commits the tests expect."""

    bert_v1: str  # tag v1
    bert_main: str  # branch main, one commit later
    v1_files: dict[str, bytes]
    main_files: dict[str, bytes]
    big_files: dict[str, bytes]


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    with HubServer(tmp_path_factory.mktemp("hub"), tokens=(OTHER_TOKEN,)) as server:
        yield server


@pytest.fixture(scope="session")
def repos(hub_server: HubServer) -> Repos:
    bert = hub_server.create_repo("tiny/bert")
    v1, main = model_files(32, seed=1), model_files(48, seed=2)
    first = bert.commit(v1, "v1", tag="v1")
    second = bert.commit(main, "v2: a wider model")
    hub_server.create_repo("tiny/secret", private_to=(GOOD_TOKEN,)).commit(model_files())
    pickled = {k: v for k, v in model_files().items() if k != "model.safetensors"}
    hub_server.create_repo("tiny/pickled").commit(pickled)
    # 4 MiB of weights: big enough to be cut or killed midway, small enough to be quick.
    big = {**model_files(), "model.safetensors": weights(3, rows=16384)}
    hub_server.create_repo("tiny/big").commit(big)
    hub_server.create_repo("tiny/gguf").commit({"model-q8_0.gguf": b"GGUF" + bytes(4096),
                                                "model-f16.gguf": b"GGUF" + bytes(8192)})
    return Repos(first, second, v1, main, big)


@pytest.fixture
def hub(hub_server: HubServer, repos: Repos, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Iterator[HubServer]:
    """The session's hub with its hooks cleared, and huggingface_hub allowed to go online.

    tests/conftest.py sets HF_HUB_OFFLINE for the whole run (nothing may reach the real Hub);
    here the client may go online, to the endpoint fetch passes on from ``env`` (the process's
    own HF_ENDPOINT is not set, so a request that ignored it would fail). No token of the
    machine is used.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield hub_server
    hub_server.requests.clear()
    hub_server.corrupt.clear()
    hub_server.drop_after.clear()
    hub_server.throttle = 0.0
    hub_server.claimed_sha.clear()


@pytest.fixture
def hub_env(hub: HubServer) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.endpoint}


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Store]:
    store = start_s3()
    yield store
    store.stop()
