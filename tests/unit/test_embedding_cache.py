"""The embedding cache: a changed corpus embeds only its new texts, with the same vectors.

The reference is a full re-embedding of the new corpus with ``embed_texts``. Vectors equal
it within 1e-6, not bitwise: the cache embeds only the missing texts, so they are batched
(sorted by length, padded to the longest of their batch) with other texts than in a full
run, and TorchScript's matrix products then round differently in the last bits (up to
~2e-7 for the tiny BERT; its ONNX export happens to give bitwise-equal rows). Vectors taken
from the cache are bitwise those the earlier build wrote.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

import tritonop.artifacts.embedding_cache as embedding_cache
import tritonop.artifacts.index as index_module
from tests.support.encoders import TRAINING_TEXTS
from tritonop.artifacts.embedding_cache import (
    CACHE_DIR,
    MANIFEST_FILE,
    TABLE_DTYPE,
    cache_key,
    cached_embeddings,
)
from tritonop.artifacts.export import export_model
from tritonop.artifacts.index import build_index, embed_texts
from tritonop.artifacts.prepare import prepare
from tritonop.artifacts.sources import inspect
from tritonop.resources import parse_resource
from tritonop_backend.artifacts import ModelManifest
from tritonop_backend.search import load_index

WORDS = sorted({word for text in TRAINING_TEXTS for word in text.split()})
TOLERANCE = 1e-6


def random_texts(count: int, seed: int) -> list[str]:
    """Distinct texts of 2 to 30 words the tiny tokenizers know, so no two embed alike."""
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < count:
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 30)))
        if text not in texts:
            texts.append(text)
    return texts


def flat(calls: list[list[str]]) -> list[str]:
    return [text for call in calls for text in call]


def changed(texts: list[str], seed: int, *, replace: int, delete: int = 0,
            add: int = 0) -> tuple[list[str], list[str]]:
    """``texts`` with ``replace`` texts changed, ``delete`` gone and ``add`` new ones.

    Returns the new corpus and the texts in it that were not in ``texts``.
    """
    rng = random.Random(seed)
    fresh = [text for text in random_texts(len(texts) + replace + add, seed + 1000)
             if text not in texts][: replace + add]
    out = list(texts)
    for position, text in zip(rng.sample(range(len(out)), replace), fresh, strict=False):
        out[position] = text
    for position in sorted(rng.sample(range(len(out)), delete), reverse=True):
        del out[position]
    for text in fresh[replace:]:
        out.insert(rng.randrange(len(out) + 1), text)
    return out, fresh


@pytest.fixture(scope="module")
def models(tiny_encoders, tmp_path_factory) -> dict[str, Path]:
    """The tiny BERT exported to both formats, and the tiny RoBERTa (another model)."""
    root = tmp_path_factory.mktemp("cache-models")
    bert = inspect(str(tiny_encoders["bert"]))
    out = {fmt: export_model(bert, fmt, root / fmt).directory for fmt in ("torchscript", "onnx")}
    out["other"] = export_model(inspect(str(tiny_encoders["roberta"])), "torchscript",
                                root / "other").directory
    return out


@pytest.fixture
def counted(monkeypatch) -> list[list[str]]:
    """Every list of texts the encoder is run on, through ``build_index``'s one seam."""
    calls: list[list[str]] = []
    real = index_module.embed_texts

    def counting(texts, *args, **kwargs):
        calls.append(list(texts))
        return real(texts, *args, **kwargs)

    monkeypatch.setattr(index_module, "embed_texts", counting)
    return calls


def build(texts: list[str], model: Path, folder: Path, cache: Path, **settings):
    corpus = folder.parent / f"{folder.name}.txt"
    corpus.write_text("\n".join(texts) + "\n", encoding="utf-8")
    build_index(corpus, model, folder, embedding_cache=cache, progress=False, **settings)
    return load_index(folder)[0]


def texts_of(index) -> list[str]:
    return [text.decode("utf-8") for text in index.texts]


def full_embedding(texts: list[str], model: Path) -> np.ndarray:
    manifest = ModelManifest.read(model)
    return embed_texts(texts, model, manifest.pooling, manifest.max_sequence_length,
                       prompt=manifest.document_prompt)


def embedder(model: Path, calls: list[list[str]] | None = None):
    manifest = ModelManifest.read(model)

    def embed(texts: list[str]) -> np.ndarray:
        if calls is not None:
            calls.append(list(texts))
        return embed_texts(texts, model, manifest.pooling, manifest.max_sequence_length)

    return embed, cache_key(manifest, manifest.pooling, manifest.max_sequence_length, "")


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_one_percent_changed_embeds_only_those_and_equals_a_full_re_embedding(
        fmt, models, counted, tmp_path):
    cache = tmp_path / CACHE_DIR
    first = random_texts(400, seed=1)
    old = build(first, models[fmt], tmp_path / "v1", cache)
    assert sorted(flat(counted)) == sorted(first)

    # 1% changed, 3 texts deleted, 2 added, and one text twice.
    second, new = changed(first, seed=2, replace=4, delete=3, add=2)
    second.append(second[0])
    counted.clear()
    index = build(second, models[fmt], tmp_path / "v2", cache)
    assert sorted(flat(counted)) == sorted(new)  # each new text once, nothing else

    assert texts_of(index) == second
    reference = full_embedding(second, models[fmt])
    assert np.abs(index.embeddings - reference).max() <= TOLERANCE
    before = {text: row for text, row in zip(texts_of(old), old.embeddings, strict=True)}
    reused = [i for i, text in enumerate(second) if text in before]
    assert len(reused) == len(second) - len(new)
    assert np.array_equal(index.embeddings[reused],
                          np.stack([before[second[i]] for i in reused]))


def test_deleted_texts_are_gone_from_the_index_and_the_cache(models, counted, tmp_path):
    cache = tmp_path / CACHE_DIR
    first = random_texts(200, seed=3)
    build(first, models["onnx"], tmp_path / "v1", cache)
    second = first[20:]
    counted.clear()
    index = build(second, models["onnx"], tmp_path / "v2", cache)
    assert counted == [] and texts_of(index) == second and len(index.embeddings) == 180
    assert not set(first[:20]) & set(texts_of(index))
    manifest = json.loads((cache / only_key(cache) / MANIFEST_FILE).read_text())
    assert manifest["count"] == 180
    # A deleted text that comes back is embedded again: the cache did not keep it.
    counted.clear()
    build(first[:1] + second, models["onnx"], tmp_path / "v3", cache)
    assert counted == [first[:1]]


def test_the_cache_stays_within_twice_the_corpus_as_the_corpus_keeps_changing(models,
                                                                             tmp_path):
    embed, key = embedder(models["onnx"])
    texts = random_texts(100, seed=4)
    for step in range(6):
        result = cached_embeddings(texts, embed, tmp_path, key)
        assert result.embedded == (100 if step == 0 else 40)
        manifest = json.loads((tmp_path / key / MANIFEST_FILE).read_text())
        stored = sum(shard["rows"] for shard in manifest["shards"])
        assert manifest["count"] == 100 and 100 <= stored <= 200, (step, stored)
        on_disk = {path.name for path in (tmp_path / key).iterdir()}
        assert on_disk == {MANIFEST_FILE, manifest["table"]["file"],
                           *(shard["file"] for shard in manifest["shards"])}
        texts, _ = changed(texts, seed=10 + step, replace=40)


@pytest.mark.parametrize("settings", [
    {"pooling": "cls"},
    {"max_length": 8},
    {"document_prompt": "passage: "},
    {"model": "other"},
    {"model": "onnx"},  # the same model in another export format
], ids=["pooling", "max-length", "document-prompt", "other-model", "other-format"])
def test_another_model_or_setting_never_reuses_a_vector(settings, models, counted, tmp_path):
    cache = tmp_path / CACHE_DIR
    texts = random_texts(60, seed=5)
    build(texts, models["torchscript"], tmp_path / "v1", cache)
    counted.clear()
    model = models[settings.pop("model", "torchscript")]
    index = build(texts, model, tmp_path / "v2", cache, **settings)
    assert sorted(flat(counted)) == sorted(texts)
    manifest = ModelManifest.read(model)
    reference = embed_texts(texts, model, settings.get("pooling", manifest.pooling),
                            settings.get("max_length", manifest.max_sequence_length),
                            prompt=settings.get("document_prompt", manifest.document_prompt))
    assert np.abs(index.embeddings - reference).max() <= TOLERANCE
    assert len(list(cache.iterdir())) == 1  # only the latest settings' cache is kept


def only_key(cache: Path) -> str:
    (key,) = [path.name for path in cache.iterdir()]
    return key


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # one float's top byte: a wrong vector of the right size
    path.write_bytes(bytes(data))


def newest_shard(manifest: dict) -> str:
    return manifest["shards"][-1]["file"]


DAMAGE = {  # what is damaged -> (how, which texts must be embedded again)
    "truncated-shard": (lambda d, m: truncate(d / newest_shard(m)), "new"),
    "flipped-byte-in-shard": (lambda d, m: flip_last_byte(d / newest_shard(m)), "new"),
    "missing-shard": (lambda d, m: (d / newest_shard(m)).unlink(), "new"),
    "truncated-table": (lambda d, m: truncate(d / m["table"]["file"]), "all"),
    "flipped-byte-in-table": (lambda d, m: flip_last_byte(d / m["table"]["file"]), "all"),
    "torn-manifest": (lambda d, m: (d / MANIFEST_FILE).write_text('{"format": "1", "sh'),
                      "all"),
    "manifest-not-an-object": (lambda d, m: (d / MANIFEST_FILE).write_text("[]"), "all"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_is_detected_and_rebuilt_never_read(damage, models, tmp_path):
    model = models["onnx"]
    calls: list[list[str]] = []
    embed, key = embedder(model, calls)
    first = random_texts(120, seed=6)
    second, new = changed(first, seed=7, replace=12)
    cached_embeddings(first, embed, tmp_path, key)
    cached_embeddings(second, embed, tmp_path, key)  # a second shard, holding ``new``
    manifest = json.loads((tmp_path / key / MANIFEST_FILE).read_text())
    assert len(manifest["shards"]) == 2
    how, again = DAMAGE[damage]
    how(tmp_path / key, manifest)

    calls.clear()
    result = cached_embeddings(second, embed, tmp_path, key)
    assert result.damaged
    assert sorted(flat(calls)) == sorted(new if again == "new" else second)
    assert np.abs(result.vectors - full_embedding(second, model)).max() <= TOLERANCE
    # Rebuilt: the next build finds every text, and the vectors are the same.
    calls.clear()
    healed = cached_embeddings(second, embed, tmp_path, key)
    assert calls == [] and not healed.damaged
    assert np.array_equal(healed.vectors, result.vectors)


def test_a_build_killed_before_its_manifest_is_renamed_leaves_the_previous_cache(
        models, monkeypatch, tmp_path):
    model = models["onnx"]
    calls: list[list[str]] = []
    embed, key = embedder(model, calls)
    first = random_texts(100, seed=8)
    cached_embeddings(first, embed, tmp_path, key)
    second, new = changed(first, seed=9, replace=10)

    class Killed(BaseException):
        pass

    def killed(path, data):
        raise Killed

    with monkeypatch.context() as patched:  # the new shard and table are written, then death
        patched.setattr(embedding_cache, "_write_atomically", killed)
        with pytest.raises(Killed):
            cached_embeddings(second, embed, tmp_path, key)
    leftovers = len(list((tmp_path / key).iterdir()))
    assert leftovers == 5  # manifest, table, shard, and the dead build's table and shard

    calls.clear()
    result = cached_embeddings(second, embed, tmp_path, key)
    assert sorted(flat(calls)) == sorted(new) and not result.damaged
    assert np.abs(result.vectors - full_embedding(second, model)).max() <= TOLERANCE
    assert len(list((tmp_path / key).iterdir())) == 4  # the dead build's files are gone


def test_a_cache_that_cannot_be_written_still_gives_the_right_vectors(models, tmp_path,
                                                                      caplog):
    model = models["onnx"]
    embed, key = embedder(model)
    (tmp_path / key).write_text("not a folder")
    texts = random_texts(30, seed=11)
    with caplog.at_level(logging.WARNING):
        result = cached_embeddings(texts, embed, tmp_path, key)
    assert result.embedded == 30 and "not updated" in caplog.text
    assert np.abs(result.vectors - full_embedding(texts, model)).max() <= TOLERANCE


def test_the_table_is_a_sorted_hash_table_of_plain_numpy(models, tmp_path):
    embed, key = embedder(models["onnx"])
    texts = random_texts(50, seed=12)
    cached_embeddings(texts, embed, tmp_path, key)
    manifest = json.loads((tmp_path / key / MANIFEST_FILE).read_text())
    table = np.load(tmp_path / key / manifest["table"]["file"], allow_pickle=False)
    assert table.dtype == TABLE_DTYPE and len(table) == 50
    assert np.all(table["sha256"][1:] > table["sha256"][:-1])


def test_prepare_reuses_the_vectors_of_the_version_before(tiny_encoders, tmp_path, caplog):
    """Through `prepare`: a new corpus version, its new texts embedded, the cache kept."""
    texts = random_texts(50, seed=13)
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    body = {"apiVersion": "serving.tritonop.dev/v1alpha1", "kind": "EmbeddingSearch",
            "metadata": {"name": "news"},
            "spec": {"model": {"source": str(tiny_encoders["bert"])},
                     "corpus": {"source": "corpus.txt"}}}
    root = tmp_path / "artifacts"
    prepare([parse_resource(body, tmp_path)], root, progress=False)
    second, _ = changed(texts, seed=14, replace=2, delete=1)
    (tmp_path / "corpus.txt").write_text("\n".join(second) + "\n")
    with caplog.at_level(logging.INFO, logger="tritonop"):
        prepare([parse_resource(body, tmp_path)], root, progress=False, keep_only=True)
    assert "embedded 2 texts, reused 47 (49 texts in the corpus)" in caplog.text
    (version,) = [p for p in (root / "news").iterdir() if not p.name.startswith(".")]
    assert texts_of(load_index(version / "index")[0]) == second
    assert (root / "news" / CACHE_DIR).is_dir()  # --keep-only keeps the cache
