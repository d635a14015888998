"""Every encoder architecture tritonop serves, exported both ways, equals sentence-transformers.

The models are tiny random-weight ones (tests/support/encoders.py) saved by
sentence-transformers itself; the reference is ``SentenceTransformer(folder)``:
``encode_query`` for what Triton serves (search queries, /v1/embeddings), and
``encode_document`` (or the declared passage prompt) for what the corpus index holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.encoders import (
    MAX_SEQ_LENGTH,
    TINY_ENCODERS,
    make_custom_code_encoder,
    make_decoder_only_model,
    reference_documents,
)
from tritonop.artifacts.encoders import read_layout
from tritonop.artifacts.export import export_model
from tritonop.artifacts.index import embed_texts
from tritonop.artifacts.sources import inspect
from tritonop.cli import main
from tritonop_backend.artifacts import ArtifactError, ModelManifest
from tritonop_backend.stages import EncoderStage, PoolingStage, TokenizerStage

TEXTS = [
    "europe climate change storm",
    "Zürich, São Paulo and 北京: non-ASCII text is tokenized too",
    "The Quick Brown FOX",
    "a text longer than the tiny models' maximum length " * 12,  # truncated to 48 tokens
]
SPECS = {spec.name: spec for spec in TINY_ENCODERS}
API = "serving.tritonop.dev/v1alpha1"


def served_embeddings(model_dir: Path, texts: list[str], **parameters: str) -> np.ndarray:
    """Texts through the tokenizer, encoder and pooling stages, as Triton runs them."""
    params = {"model_dir": str(model_dir), "max_sequence_length": "auto", "pooling": "auto",
              "max_input_characters": "100000", "query_prompt": "auto", "normalize": "auto",
              "threads": "1", **parameters}
    text = np.array([[t.encode()] for t in texts], dtype=object)
    (tokens,) = TokenizerStage(params).run([{"text": text}])
    (hidden,) = EncoderStage(params).run([tokens])
    (pooled,) = PoolingStage(params).run([{**hidden, "attention_mask": tokens["attention_mask"]}])
    return pooled["embedding"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def references(tiny_encoders):  # -> dict[str, SentenceTransformer]
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(path), device="cpu")
            for name, path in tiny_encoders.items()}


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", list(SPECS))
def test_export_serves_what_sentence_transformers_computes(
        name, fmt, tiny_encoders, references, tmp_path):
    spec = SPECS[name]
    source = inspect(str(tiny_encoders[name]))
    manifest = export_model(source, fmt, tmp_path / "model").manifest
    # The model's own settings, read from the files sentence-transformers wrote.
    assert (manifest.model_type, manifest.pooling, manifest.normalize,
            manifest.max_sequence_length) == (spec.model_type, spec.pooling, spec.normalize,
                                              MAX_SEQ_LENGTH)
    assert manifest.query_prompt == spec.prompts.get("query", "")
    # Packed (several texts to a row) where the architecture takes prepared masks.
    assert manifest.packed == (spec.model_type != "modernbert")
    reference = references[name]

    queries = served_embeddings(tmp_path / "model", TEXTS)
    expected = reference.encode_query(TEXTS)
    assert np.all(cosine(queries, expected) >= 0.9999), cosine(queries, expected)
    # Normalized exactly where the model has a Normalize module.
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1),
                               np.linalg.norm(expected, axis=1), rtol=1e-4)

    documents = embed_texts(TEXTS, tmp_path / "model", manifest.pooling,
                            manifest.max_sequence_length, prompt=manifest.document_prompt)
    expected_documents = reference_documents(reference, spec, TEXTS)
    assert np.all(cosine(documents, expected_documents) >= 0.9999)


@pytest.mark.parametrize("name", [s.name for s in TINY_ENCODERS if s.prompts])
def test_prompts_change_queries_and_documents(name, tiny_encoders, references, tmp_path):
    """Without its prompts a prompted model embeds differently: the prompts are applied."""
    source = inspect(str(tiny_encoders[name]))
    export_model(source, "onnx", tmp_path / "model")
    plain = references[name].encode(TEXTS, prompt="", normalize_embeddings=True)
    queries = served_embeddings(tmp_path / "model", TEXTS)
    assert np.all(cosine(queries, plain) < 0.999)
    documents = embed_texts(TEXTS, tmp_path / "model", source.pooling,
                            source.max_sequence_length, prompt=source.document_prompt)
    assert np.all(cosine(documents, plain) < 0.999)
    # A spec's queryPrompt replaces the model's; "" means none.
    none = served_embeddings(tmp_path / "model", TEXTS, query_prompt=json.dumps(""))
    assert np.all(cosine(none, plain) >= 0.9999)


def write_folder(folder: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    return folder


BERT_CONFIG = {"model_type": "bert", "hidden_size": 32, "max_position_embeddings": 512,
               "pad_token_id": 0}
MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
           {"idx": 1, "name": "1", "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling"}]


@pytest.mark.parametrize(("files", "expected"), [
    # sentence-transformers 2's spelling (most models on the Hub)
    ({"1_Pooling/config.json": {"pooling_mode_cls_token": True,
                                "pooling_mode_mean_tokens": False},
      "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": True}},
     ("cls", False, 128, True)),
    ({"1_Pooling/config.json": {"pooling_mode_lasttoken": True}}, ("lasttoken", False, 512, False)),
    # no modules.json: a plain transformers model, which sentence-transformers mean-pools
    ({"modules.json": None, "tokenizer_config.json": {"model_max_length": int(1e30)}},
     ("mean", False, 512, False)),
])
def test_layout_read_as_sentence_transformers_reads_it(tmp_path, files, expected):
    listed = {"config.json": BERT_CONFIG, "modules.json": MODULES, **files}
    write_folder(tmp_path, {k: v for k, v in listed.items() if v is not None})
    layout = read_layout("m", tmp_path, BERT_CONFIG)
    assert (layout.pooling, layout.normalize, layout.max_sequence_length,
            layout.lowercase) == expected


def test_roberta_positions_start_after_the_padding_id(tmp_path):
    config = {"model_type": "xlm-roberta", "hidden_size": 32, "max_position_embeddings": 514,
              "pad_token_id": 1}
    write_folder(tmp_path, {"tokenizer_config.json": {"model_max_length": 100000}})
    assert read_layout("m", tmp_path, config).max_sequence_length == 512


@pytest.mark.parametrize(("files", "message"), [
    ({"1_Pooling/config.json": {"pooling_mode": ["cls", "mean"]}},
     r"1_Pooling/config.json pools with cls \+ mean; tritonop serves one of mean, max, cls"),
    ({"1_Pooling/config.json": {"pooling_mode": "weightedmean"}}, "pools with weightedmean"),
    ({"1_Pooling/config.json": {"pooling_mode": "mean", "include_prompt": False}},
     r"leaves prompt tokens out of the pooling \(include_prompt: false"),
    ({"modules.json": [*MODULES, {"idx": 2, "name": "2", "path": "2_Dense",
                                  "type": "sentence_transformers.models.Dense"}]},
     r"modules.json has a sentence_transformers.models.Dense module \(2_Dense\)"),
])
def test_layout_refuses_what_it_would_serve_wrongly(tmp_path, files, message):
    write_folder(tmp_path, {"modules.json": MODULES, **files})
    with pytest.raises(ArtifactError, match=rf"^model source hf://org/m: .*{message}"):
        read_layout("hf://org/m", tmp_path, BERT_CONFIG)


def prepare_cli(tmp_path: Path, model: Path, **model_spec: object) -> int:
    (tmp_path / "corpus.txt").write_text("storm over europe\nfootball final tonight\n")
    resource = {"apiVersion": API, "kind": "EmbeddingSearch", "metadata": {"name": "news"},
                "spec": {"corpus": {"source": "corpus.txt"},
                         "model": {"source": str(model), **model_spec}}}
    (tmp_path / "news.yaml").write_text(yaml.safe_dump(resource))
    return main(["prepare", "-f", str(tmp_path / "news.yaml"),
                 "--artifacts-root", str(tmp_path / "artifacts")])


def test_prepare_refuses_a_model_type_it_cannot_serve(tmp_path, capsys):
    model = make_decoder_only_model(tmp_path / "gpt2")
    assert prepare_cli(tmp_path, model) == 2
    assert (f"error: model source {model}: model_type 'gpt2' is not an encoder tritonop can "
            "export and serve (supported: bert, roberta, xlm-roberta, mpnet, distilbert, "
            "modernbert)") in capsys.readouterr().err
    assert not list((tmp_path / "artifacts" / "news").glob("*/version.json"))


def test_custom_code_needs_trust_remote_code(tmp_path, tiny_encoders, capsys):
    from sentence_transformers import SentenceTransformer

    model = make_custom_code_encoder(tiny_encoders["bert"], tmp_path / "custom")
    assert prepare_cli(tmp_path, model) == 2
    err = capsys.readouterr().err
    assert (f"error: model source {model}: model_type 'tiny-custom-bert' comes with its own "
            "Python code (config.json auto_map AutoConfig -> custom_bert.TinyCustomConfig; "
            "config.json auto_map AutoModel -> custom_bert.TinyCustomModel), which tritonop "
            "runs only with spec.model.trustRemoteCode: true") in err

    # Allowed, the model's own code is what gets exported (and checked against).
    assert prepare_cli(tmp_path, model, trustRemoteCode=True) == 0
    (version,) = (tmp_path / "artifacts" / "news").glob("*/version.json")
    served = served_embeddings(version.parent / "model", TEXTS)
    expected = SentenceTransformer(str(model), device="cpu",
                                   trust_remote_code=True).encode_query(TEXTS)
    assert np.all(cosine(served, expected) >= 0.9999)
    assert ModelManifest.read(version.parent / "model").model_type == "tiny-custom-bert"


def test_prepare_refuses_more_tokens_than_the_model_has_positions(tmp_path, tiny_encoders,
                                                                    capsys):
    model = tiny_encoders["roberta"]  # 66 positions, the first two taken by <s>'s offset
    assert prepare_cli(tmp_path, model, maxSequenceLength=100) == 2
    assert (f"error: news: spec.model.maxSequenceLength 100 is more than model source {model} "
            "has positions for (64 tokens)") in capsys.readouterr().err
