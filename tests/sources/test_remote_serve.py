"""Serving models from where users keep them: ``tritonop serve`` and ``tritonop prepare`` with
hf://, s3:// and https:// sources, against the test Hub, moto's S3 and a TLS file server.

One ``tritonop serve`` (one tritonserver) serves three resources whose models exist only on
those servers: a tiny BERT in the sentence-transformers layout on the Hub, a tiny Mistral
safetensors folder in a bucket (credentials checked), and a tiny Qwen2 as one GGUF file over
https with its sha256. Its answers are compared with sentence-transformers and with
transformers' greedy ``generate`` in float32 on the original folders. serve runs with
``HF_HUB_OFFLINE=1`` and no token, as a pod's containers do.

Then ``tritonop prepare`` through the CLI's ``main`` against the same Hub: a branch that
moves builds a new artifacts version beside the old one, a revision pinned in the resource
document is built as rendered and downloaded once, a private repository without a token is
one line naming it and the 401.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.support.gguf import write_gguf
from tests.support.hub import HubRepo, HubServer
from tests.support.llm import greedy_completions
from tests.support.s3 import S3Store
from tests.support.tls import https_files, self_signed
from tests.support.triton import TINY_TEXTS, free_port, serving
from tritonop.artifacts.versions import complete_versions, resource_fingerprint
from tritonop.cli import main
from tritonop.render.kubernetes import resource_document
from tritonop.resources import load_resources
from tritonop_backend.artifacts import MANIFEST_FILE, VERSION_FILE, VersionManifest

pytestmark = pytest.mark.triton

ENCODER = "hub-encoder"
S3_DECODER = "s3-mistral"
GGUF_DECODER = "https-qwen2"
PROMPTS = ["Explain why the sky is blue, step by step.", "What is the capital of France?"]
MAX_TOKENS = 12
LLM_SPEC = ("dtype: float32, maxContextLength: 256}\n"
            "  generation: {limits: {maxTokens: 64}, defaults: {maxTokens: 16}}\n"
            "  engine: {maxSequences: 2, maxWaiting: 4, threads: 1}\n")


@dataclass(frozen=True)
class Served:
    """The running serve and where its inputs live."""

    gateway: str
    root: Path
    folder: Path
    encoder_repo: HubRepo
    encoder_sha: str
    version: Path
    """The encoder's artifacts version that serve built and serves."""


@pytest.fixture(scope="module")
def served(hub_server: HubServer, s3_store: S3Store, tiny_encoders: dict[str, Path],
           tiny_decoders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("remote")
    repo = hub_server.create_repo("acme/tiny-bert")
    sha = repo.commit_folder(tiny_encoders["bert"], "tiny bert")
    s3_store.upload_folder(tiny_decoders["mistral"], "served", "tiny-mistral")
    files = folder / "files"
    files.mkdir()
    gguf = write_gguf(tiny_decoders["qwen2"], files / "qwen2-f32.gguf")
    pem = self_signed("127.0.0.1")
    (folder / "tls.crt").write_text(pem["tls.crt"])
    (folder / "tls.key").write_text(pem["tls.key"])
    (folder / "headlines.txt").write_text("\n".join(TINY_TEXTS) + "\n")
    with https_files(files, folder / "tls.crt", folder / "tls.key") as base:
        (folder / "encoder.yaml").write_text(
            f"apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
            f"metadata: {{name: {ENCODER}}}\nspec:\n"
            f"  model: {{source: hf://acme/tiny-bert}}\n  corpus: {{source: headlines.txt}}\n")
        (folder / "s3.yaml").write_text(
            f"apiVersion: serving.tritonop.dev/v1alpha1\nkind: LLMService\n"
            f"metadata: {{name: {S3_DECODER}}}\nspec:\n"
            f"  model: {{source: s3://served/tiny-mistral, s3: {{endpoint: "
            f"'{s3_store.endpoint}'}}, {LLM_SPEC}")
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (folder / "gguf.yaml").write_text(
            f"apiVersion: serving.tritonop.dev/v1alpha1\nkind: LLMService\n"
            f"metadata: {{name: {GGUF_DECODER}}}\nspec:\n"
            f"  model: {{source: '{base}/{gguf.name}', sha256: {digest}, {LLM_SPEC}")
        # As in a pod: offline for the Hub's client, no token of this machine's user, the
        # store's reader key; the test server's certificate is the one trusted.
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("HF_", "HUGGING_FACE_", "AWS_"))}
        env.update(HF_ENDPOINT=hub_server.endpoint, HF_HUB_OFFLINE="1",
                   HF_HOME=str(folder / "hf-home"), SSL_CERT_FILE=str(folder / "tls.crt"),
                   AWS_CONFIG_FILE=str(folder / "none"),
                   AWS_SHARED_CREDENTIALS_FILE=str(folder / "none"), **s3_store.reader.env)
        root, gateway = folder / "artifacts", free_port()
        args = [str(folder / f"{name}.yaml") for name in ("encoder", "s3", "gguf")]
        args += ["--artifacts-root", str(root), "--http-port", str(free_port()),
                 "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
                 "--openai-port", str(gateway), "--workdir", str(folder / "work")]
        with serving(args, env=env):
            (version,) = complete_versions(root / ENCODER)
            yield Served(f"http://127.0.0.1:{gateway}/v1", root, folder, repo, sha,
                         root / ENCODER / version)


def test_an_encoder_from_the_hub_embeds_as_sentence_transformers(
        served: Served, tiny_encoders: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [*TINY_TEXTS[:4], "Zürich, São Paulo and 北京"]
    response = requests.post(f"{served.gateway}/embeddings", timeout=120,
                             json={"model": ENCODER, "input": texts})
    assert response.status_code == 200, response.text
    got = np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)
    reference = SentenceTransformer(str(tiny_encoders["bert"]), device="cpu").encode(texts)
    cosine = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        reference, axis=1)
    assert cosine.min() >= 0.9999, cosine
    # Built from the commit the branch named, and the render named that very version.
    manifest = VersionManifest.read(served.version)
    assert manifest.inputs["model.revision"] == served.encoder_sha
    assert (served.root / ".models" / "hf" / "acme" / "tiny-bert" / served.encoder_sha
            / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def references(tiny_decoders: dict[str, Path]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {name: (AutoTokenizer.from_pretrained(str(tiny_decoders[original])),
                   AutoModelForCausalLM.from_pretrained(str(tiny_decoders[original]),
                                                        dtype=torch.float32).eval())
            for name, original in ((S3_DECODER, "mistral"), (GGUF_DECODER, "qwen2"))}


@pytest.mark.parametrize("name", [S3_DECODER, GGUF_DECODER])
def test_a_decoder_from_s3_or_a_gguf_over_https_completes_as_generate(
        served: Served, references: dict[str, Any], name: str) -> None:
    import torch

    answers = greedy_completions(served.gateway, name, PROMPTS, MAX_TOKENS)
    tokenizer, model = references[name]
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=MAX_TOKENS, do_sample=False)
        new = output[0, ids.shape[1]:].tolist()
        assert answer["choices"][0]["text"] == tokenizer.decode(new, skip_special_tokens=True)
        assert answer["usage"]["completion_tokens"] == len(new), prompt


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process as ``tritonop prepare``'s: the test Hub, no token of this machine's user.

    HF_HUB_OFFLINE stays as tests/conftest.py set it (1): prepare must go online anyway.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    hub_server.requests.clear()


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def shorter(repo: HubRepo, length: int) -> str:
    """Commit a new maximum sequence length on the branch; returns the commit."""
    config = json.loads((repo.path / "sentence_bert_config.json").read_text())
    return repo.commit({"sentence_bert_config.json": json.dumps(
        {**config, "max_seq_length": length})}, f"max_seq_length {length}")


@pytest.mark.usefixtures("hub_env")
def test_a_moved_branch_builds_a_new_version_beside_the_old(served: Served) -> None:
    old = served.version
    before = tree(old)
    moved = shorter(served.encoder_repo, 32)
    assert main(["prepare", "-f", str(served.folder / "encoder.yaml"),
                 "--artifacts-root", str(served.root)]) == 0
    versions = complete_versions(served.root / ENCODER)
    assert len(versions) == 2 and old.name in versions
    new = served.root / ENCODER / next(v for v in versions if v != old.name)
    assert VersionManifest.read(new).inputs["model.revision"] == moved
    assert json.loads((new / "model" / MANIFEST_FILE).read_text())["max_sequence_length"] == 32
    assert tree(old) == before  # the version the running server reads: untouched


@pytest.mark.usefixtures("hub_env")
def test_a_pinned_revision_is_built_as_rendered_and_downloaded_once(
        served: Served, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The pods' prepare reads the resource document the render pinned: the branch has moved
    since, and the revision rendered is the one built, into the version the render named."""
    shorter(served.encoder_repo, 24)
    (resource,) = load_resources(served.folder / "encoder.yaml")
    pinned = replace(resource, model_revision=served.encoder_sha)
    assert resource_fingerprint(pinned) == served.version.name
    monkeypatch.setenv("TRITONOP_RESOURCE", resource_document(pinned))
    cache = tmp_path / "models"
    for pod in ("first", "second"):
        hub_server.requests.clear()
        root = tmp_path / pod
        assert main(["prepare", "--resource-env", "TRITONOP_RESOURCE", "--base-dir",
                     str(served.folder), "--artifacts-root", str(root), "--models-cache",
                     str(cache), "--expect-fingerprint", served.version.name]) == 0
        assert (root / ENCODER / served.version.name / VERSION_FILE).is_file()
        if pod == "first":
            assert hub_server.downloads("acme/tiny-bert")
            assert {r.revision for r in hub_server.requests} == {served.encoder_sha}
        else:
            assert hub_server.requests == []  # the pinned revision came from the cache


@pytest.mark.usefixtures("hub_env")
def test_a_private_repository_without_a_token_is_one_line_naming_it_and_401(
        hub_server: HubServer, tiny_encoders: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    hub_server.create_repo("acme/private-bert", private_to=("hf_owner",)).commit_folder(
        tiny_encoders["bert"])
    (tmp_path / "corpus.txt").write_text("\n".join(TINY_TEXTS) + "\n")
    (tmp_path / "private.yaml").write_text(
        "apiVersion: serving.tritonop.dev/v1alpha1\nkind: EmbeddingSearch\n"
        "metadata: {name: private}\nspec:\n"
        "  model: {source: hf://acme/private-bert}\n  corpus: {source: corpus.txt}\n")
    code = main(["prepare", "-f", str(tmp_path / "private.yaml"),
                 "--artifacts-root", str(tmp_path / "artifacts")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: model source hf://acme/private-bert: repository "
                           "acme/private-bert not found, or private and no HF_TOKEN was given "
                           "(HTTP 401)"), line
    assert hub_server.downloads() == []
    assert not (tmp_path / "artifacts" / "private").exists()
