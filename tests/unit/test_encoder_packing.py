"""Several texts to a row: a packed encoder gives each text what it gives that text alone.

The reference is the source model in ``transformers``, run on one text at a time (no
padding at all); the served path is :func:`encode_ragged` over requests of different
row counts and lengths, packed into rows small enough that texts share and spill over.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.support.encoders import MAX_SEQ_LENGTH
from tritonop.artifacts.export import export_model, serves
from tritonop.artifacts.sources import inspect
from tritonop_backend import encoder as encoder_module
from tritonop_backend.artifacts import ModelManifest
from tritonop_backend.encoder import encode_ragged, load_encoder, pack
from tritonop_backend.errors import RequestError
from tritonop_backend.stages import EncoderStage, TokenizerStage
from tritonop_backend.tokenizer import TextTokenizer

TEXTS = [
    ["storm over the north sea", "a"],
    ["Zürich, São Paulo and 北京: non-ASCII text is tokenized too"],
    ["the quick brown fox jumps over the lazy dog " * 8, "x y", "markets fall"],
]


@pytest.mark.parametrize("lengths", [
    [3, 3, 3, 3],
    [10, 1, 7, 7, 2, 9, 4],
    [300, 5, 5],  # longer than a row's tokens: a row of its own
    [256] * 3,
    list(range(1, 40)),
])
def test_pack_places_every_text_once_in_rows_of_about_the_budget(lengths):
    packs = pack(lengths, tokens=64)
    assert sorted(i for members in packs for i in members) == list(range(len(lengths)))
    fills = [sum(lengths[i] for i in members) for members in packs]
    # No row beyond the budget unless one text alone is longer; no more rows than the
    # budget needs plus one (first-fit decreasing into rows of the average fill).
    assert max(fills) <= max(64, max(lengths))
    assert len(packs) <= -(-sum(lengths) // 64) + 1


def test_short_texts_share_one_row():
    assert pack([9, 6, 7, 12, 5, 8, 6, 10]) == [[3, 7, 0, 5, 2, 1, 6, 4]]


def assert_each_text_as_alone(model_dir, source_folder, dimension, packed: bool) -> None:
    """Served :data:`TEXTS` equal the source model on each text alone (packed: zeros
    past each text; padded rows carry what the model computes there)."""
    import torch
    from transformers import AutoModel

    tokenizer = TextTokenizer(model_dir / "tokenizer.json", MAX_SEQ_LENGTH)
    requests = [tokenizer.encode(texts) for texts in TEXTS]
    served = encode_ragged(load_encoder(model_dir), requests)
    model = AutoModel.from_pretrained(str(source_folder)).eval()
    for (ids, mask), hidden in zip(requests, served, strict=True):
        assert hidden.shape == (*ids.shape, dimension)
        for row, length in enumerate(mask.sum(axis=1)):
            alone = torch.from_numpy(ids[row : row + 1, :length])
            with torch.no_grad():
                expected = model(input_ids=alone,
                                 attention_mask=torch.ones_like(alone)).last_hidden_state[0]
            np.testing.assert_allclose(hidden[row, :length], expected.numpy(), atol=1e-4)
            if packed:
                assert not hidden[row, length:].any()  # padding: zeros, not another text


@pytest.mark.parametrize("name", ["bert", "roberta", "mpnet"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_packed_requests_equal_each_text_alone(name, fmt, tiny_encoders, tmp_path,
                                               monkeypatch):
    source = inspect(str(tiny_encoders[name]))
    manifest = export_model(source, fmt, tmp_path / "model").manifest
    assert manifest.packed
    monkeypatch.setattr(encoder_module, "PACK_TOKENS", 24)  # texts share rows, and spill
    assert_each_text_as_alone(tmp_path / "model", tiny_encoders[name], manifest.dimension,
                              packed=True)


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_padding_of_rows_wider_than_the_position_table_is_served(name, tiny_encoders,
                                                                  tmp_path):
    """Rows of the default budget are wider than these models' 64 positions: their padding
    must not be given positions past the table (each text's own restart at its start)."""
    source = inspect(str(tiny_encoders[name]))
    export_model(source, "onnx", tmp_path / "model")
    tokenizer = TextTokenizer(tmp_path / "model" / "tokenizer.json", MAX_SEQ_LENGTH)
    long = [f"text {i} " + "the quick brown fox jumps over the lazy dog " * 5 for i in range(7)]
    requests = [tokenizer.encode([text]) for text in [*long, "a"]]
    lengths = [int(mask.sum()) for _, mask in requests]
    assert sum(lengths) > encoder_module.PACK_TOKENS and max(lengths) <= MAX_SEQ_LENGTH
    packs = encoder_module.pack(lengths)
    assert max(sum(lengths[i] for i in row) for row in packs) > 66  # wider than the table
    served = encode_ragged(load_encoder(tmp_path / "model"), requests)
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_encoders[name])).eval()
    for (ids, _), hidden, length in zip(requests, served, lengths, strict=True):
        with torch.no_grad():
            alone = model(input_ids=torch.from_numpy(ids[:, :length])).last_hidden_state[0]
        np.testing.assert_allclose(hidden[0, :length], alone.numpy(), atol=1e-4)


def tokenized(tiny_encoders, tmp_path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The stage parameters of a tiny BERT exported here, and its tokenizer stage's output
    for one text (what the ensemble hands the encoder)."""
    export_model(inspect(str(tiny_encoders["bert"])), "onnx", tmp_path / "model")
    parameters = {"model_dir": str(tmp_path / "model"), "max_sequence_length": "auto",
                  "pooling": "mean", "max_input_characters": "1000", "threads": "1"}
    (tokens,) = TokenizerStage(parameters).run([{"text": np.array([[b"a b c d"]],
                                                                  dtype=object)}])
    return parameters, tokens


def test_a_mask_with_holes_is_refused_by_name(tiny_encoders, tmp_path):
    parameters, tokens = tokenized(tiny_encoders, tmp_path)
    holes = tokens["attention_mask"].copy()
    holes[0, 1] = 0
    twos = tokens["attention_mask"] * 2
    good, *bad = EncoderStage(parameters).run([
        tokens, {**tokens, "attention_mask": holes}, {**tokens, "attention_mask": twos}])
    assert "token_embeddings" in good
    for error in bad:
        assert isinstance(error, RequestError)
        assert "attention_mask" in str(error) and "1s" in str(error)


def test_direct_calls_the_ensemble_never_makes_are_refused_alone(tiny_encoders, tmp_path):
    """Triton's clients may call the encoder and pooling models themselves: rows longer
    than the tokenizer's bound (past BERT's positions: a fault for the whole batch), and
    pooling inputs of another width, with no token, or a mask of 2s, are each refused by
    name while the request batched with them is answered."""
    from tritonop_backend.stages import PoolingStage

    parameters, tokens = tokenized(tiny_encoders, tmp_path)
    too_long = np.ones((1, MAX_SEQ_LENGTH + 1), dtype=np.int64)
    good, bad = EncoderStage(parameters).run([
        tokens, {"input_ids": too_long, "attention_mask": too_long}])
    assert "token_embeddings" in good
    assert isinstance(bad, RequestError) and bad.field == "input_ids"
    hidden, mask = good["token_embeddings"], tokens["attention_mask"]
    answers = PoolingStage(parameters).run([
        {"token_embeddings": hidden, "attention_mask": mask},
        {"token_embeddings": hidden[:, :, :4], "attention_mask": mask},
        {"token_embeddings": hidden, "attention_mask": np.zeros_like(mask)},
        {"token_embeddings": hidden, "attention_mask": mask * 2}])
    assert "embedding" in answers[0]
    assert [a.field for a in answers[1:]] == ["token_embeddings", "attention_mask",
                                              "attention_mask"]


def test_an_unpacked_export_of_an_architecture_that_packs_is_exported_again(
        tiny_encoders, tmp_path):
    source = inspect(str(tiny_encoders["bert"]))
    manifest = export_model(source, "onnx", tmp_path / "model").manifest
    assert serves(manifest, source.fingerprint, "onnx", "float32")
    assert manifest.packing_checked
    # As tritonop wrote it before packing: exported again. One whose packed graph failed
    # its check (packing_checked, not packed) is kept (the fallback test below).
    older = dataclasses.replace(manifest, packed=False, packing_checked=False)
    assert not serves(older, source.fingerprint, "onnx", "float32")
    modern = dataclasses.replace(older, model_type="modernbert")  # never packed: kept
    assert serves(modern, source.fingerprint, "onnx", "float32")


def test_exporting_again_over_hard_links_leaves_the_linked_version_as_it_was(
        tiny_encoders, tmp_path):
    """Prepare links a seeded or torn version's model into staging; exporting there again
    (here: an unpacked export from before packing) writes new files, never through the
    links into the version they came from, which a server may be reading."""
    from tritonop.artifacts.resolve import link_tree

    source = inspect(str(tiny_encoders["bert"]))
    served = export_model(source, "onnx", tmp_path / "served").manifest
    contents = {path.name: path.read_bytes() for path in (tmp_path / "served").iterdir()}
    link_tree(tmp_path / "served", tmp_path / "staging")
    assert all(path.stat().st_nlink == 2 for path in (tmp_path / "served").iterdir())
    dataclasses.replace(served, packed=False, packing_checked=False).write(tmp_path / "staging")
    assert not export_model(source, "onnx", tmp_path / "staging").skipped
    assert {path.name: path.read_bytes() for path in (tmp_path / "served").iterdir()} == contents
    assert all(path.stat().st_nlink == 1 for path in (tmp_path / "served").iterdir())
    assert ModelManifest.read(tmp_path / "served").packed


def test_a_packed_graph_that_differs_from_the_source_is_written_again_unpacked(
        tiny_encoders, tmp_path, monkeypatch, caplog):
    """ModernBERT unpads by itself and ignores a prepared mask: told to pack anyway, the
    export's check against the source catches it and the plain graph is what is served,
    said in a warning, and reused by later versions rather than exported again."""
    from tritonop.artifacts import export

    monkeypatch.setattr(export, "_PACKABLE", export._PACKABLE | {"modernbert"})
    source = inspect(str(tiny_encoders["modernbert"]))
    manifest = export_model(source, "onnx", tmp_path / "model").manifest
    assert not manifest.packed and manifest.max_abs_diff <= export.TOLERANCE
    assert "packed modernbert encoder failed its check" in caplog.text
    assert manifest.packing_checked and serves(manifest, source.fingerprint, "onnx", "float32")
    assert export_model(source, "onnx", tmp_path / "model").skipped
    assert_each_text_as_alone(tmp_path / "model", tiny_encoders["modernbert"],
                              manifest.dimension, packed=False)
