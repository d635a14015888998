"""Tiny random-weight encoders of every architecture tritonop serves, in the layout users have.

Each model is made with ``transformers`` (hidden size 32, 2 layers) and saved by
``sentence_transformers.SentenceTransformer(modules=[Transformer, Pooling, Normalize?])``,
so the files (``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``, ``tokenizer.json``, ``model.safetensors``) are the
ones the real library writes, not our idea of them.

Tokenizers are of the architecture's real type, trained with the ``tokenizers`` library
on :data:`TRAINING_TEXTS` into a small vocabulary and then handed to the architecture's
``transformers`` tokenizer class (WordPiece for BERT, DistilBERT and MPNet, byte-level
BPE for RoBERTa and ModernBERT, Unigram with SentencePiece's metaspace for XLM-RoBERTa),
so the saved ``tokenizer.json`` is what ``transformers`` itself builds for that class.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.triton import TINY_TEXTS

# What the tiny tokenizers learn their vocabulary from: the texts the tests embed and
# search, a few more, and non-ASCII letters, so few words end up as the unknown token.
TRAINING_TEXTS = [
    *TINY_TEXTS,
    "europe climate change storm", "the quick brown fox jumps over the lazy dog",
    "Zürich, São Paulo and 北京: non-ASCII text is tokenized too",
    "query: passage: Represent this sentence for searching relevant passages:",
    "a compiler for a small language", "rain and snow in the mountains tonight",
    "the library opens a new reading room", "an election result surprises markets",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ éèàçüöäßñ",
]
HIDDEN = 32
LAYERS = 2
MAX_SEQ_LENGTH = 48  # short, so a long text in the tests is truncated
# Larger than transformers' 0.02, so random texts get clearly different embeddings and
# a top-5 has no near-ties that float rounding could reorder.
INITIALIZER_RANGE = 0.3


@dataclass(frozen=True)
class TinyEncoder:
    """One tiny model to make: its architecture and its sentence-transformers modules."""

    name: str
    model_type: str
    pooling: str = "mean"
    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)


TINY_ENCODERS = [
    TinyEncoder("bert", "bert"),
    TinyEncoder("roberta", "roberta", pooling="cls"),
    TinyEncoder("xlmr", "xlm-roberta", normalize=False),
    TinyEncoder("mpnet", "mpnet", prompts={"query": "query: ", "document": "passage: "}),
    TinyEncoder("distilbert", "distilbert", pooling="lasttoken"),
    # e5's prompt names (query / passage) and bge's query instruction.
    TinyEncoder("modernbert", "modernbert", prompts={
        "query": "Represent this sentence for searching relevant passages: ",
        "passage": "passage: "}),
]


def _train(model: Any, pre_tokenizer: Any, trainer: Any, normalizer: Any = None) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.train_from_iterator(TRAINING_TEXTS * 4, trainer)
    return json.loads(tokenizer.to_str())["model"]


def _wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    trained = _train(models.WordPiece(unk_token="[UNK]"), pre_tokenizers.BertPreTokenizer(),
                     trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials),
                     normalizers.BertNormalizer(lowercase=True))
    return dict(trained["vocab"])


def _bpe_vocab(specials: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import models, pre_tokenizers, trainers

    trained = _train(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                     trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return dict(trained["vocab"]), merges  # type: ignore[return-value]


def _unigram_vocab(specials: list[str]) -> list[tuple[str, float]]:
    from tokenizers import models, pre_tokenizers, trainers

    trained = _train(models.Unigram(), pre_tokenizers.Metaspace(),
                     trainers.UnigramTrainer(vocab_size=300, special_tokens=specials,
                                             unk_token="<unk>"))
    return [(piece, float(score)) for piece, score in trained["vocab"]]


def _tokenizer_and_config(model_type: str) -> tuple[Any, Any]:
    """The architecture's own tokenizer class over a small trained vocabulary, and a config."""
    import transformers as tf

    common = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
              "intermediate_size": 64, "initializer_range": INITIALIZER_RANGE}
    if model_type in ("bert", "distilbert"):
        vocab = _wordpiece_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        if model_type == "bert":
            return (tf.BertTokenizer(vocab=vocab),
                    tf.BertConfig(vocab_size=len(vocab), max_position_embeddings=64,
                                  pad_token_id=0, **common))
        return (tf.DistilBertTokenizer(vocab=vocab),
                tf.DistilBertConfig(vocab_size=len(vocab), dim=HIDDEN, n_layers=LAYERS,
                                    n_heads=2, hidden_dim=64, max_position_embeddings=64,
                                    pad_token_id=0, initializer_range=INITIALIZER_RANGE))
    if model_type == "mpnet":
        vocab = _wordpiece_vocab(["<s>", "<pad>", "</s>", "[UNK]", "<mask>"])
        return (tf.MPNetTokenizer(vocab=vocab),
                tf.MPNetConfig(vocab_size=len(vocab), max_position_embeddings=66,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2,
                               **common))
    if model_type == "roberta":
        vocab, merges = _bpe_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return (tf.RobertaTokenizer(vocab=vocab, merges=merges),
                tf.RobertaConfig(vocab_size=len(vocab), max_position_embeddings=66,
                                 pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                 type_vocab_size=1, **common))
    if model_type == "xlm-roberta":
        pieces = [*_unigram_vocab(["<s>", "<pad>", "</s>", "<unk>"]), ("<mask>", 0.0)]
        return (tf.XLMRobertaTokenizer(vocab=pieces),
                tf.XLMRobertaConfig(vocab_size=len(pieces), max_position_embeddings=66,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                    type_vocab_size=1, **common))
    if model_type == "modernbert":
        return _modernbert(common)
    raise ValueError(f"no tiny {model_type}")


def _modernbert(common: dict[str, Any]) -> tuple[Any, Any]:
    """ModernBERT: byte-level BPE with BERT's special tokens, as answerdotai's tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab, merges = _bpe_vocab(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]")
    config = tf.ModernBertConfig(
        vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=vocab["[PAD]"],
        bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"], cls_token_id=vocab["[CLS]"],
        sep_token_id=vocab["[SEP]"], global_attn_every_n_layers=2, local_attention=16,
        **{**common, "initializer_range": INITIALIZER_RANGE})
    return tokenizer, config


def make_tiny_encoder(spec: TinyEncoder, target: Path, seed: int = 0) -> Path:
    """Make ``spec`` with random weights and save it in the sentence-transformers layout."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoModel

    tokenizer, config = _tokenizer_and_config(spec.model_type)
    torch.manual_seed(seed)
    hf_dir = target.parent / f"{target.name}-transformers"
    AutoModel.from_config(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=MAX_SEQ_LENGTH)
    modules: list[Any] = [transformer, models.Pooling(HIDDEN, pooling_mode=spec.pooling)]
    if spec.normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, prompts=spec.prompts or None,
                        device="cpu").save(str(target))
    return target


def reference_documents(model: Any, spec: TinyEncoder, texts: list[str]) -> Any:
    """sentence-transformers' document embeddings, with the prompt tritonop gives documents.

    sentence-transformers 6 saves an empty "document" prompt beside e5's "passage", and its
    ``encode_document`` then takes the empty one; tritonop takes the declared passage
    prompt (what the model's authors meant for documents), so that one is asked for by name.
    """
    if "document" in spec.prompts:
        return model.encode_document(texts, normalize_embeddings=True)
    name = next((n for n in ("passage", "corpus") if n in spec.prompts), None)
    return model.encode(texts, prompt_name=name, normalize_embeddings=True)


def make_tiny_encoders(root: Path) -> dict[str, Path]:
    """Every model of :data:`TINY_ENCODERS` under ``root``, by name."""
    return {spec.name: make_tiny_encoder(spec, root / spec.name) for spec in TINY_ENCODERS}


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every architecture's tiny sentence-transformers folder, made once (a few seconds)."""
    return make_tiny_encoders(tmp_path_factory.mktemp("encoders"))


# A model's own code, as a Hub repository ships it beside config.json: a BERT under
# another name, which transformers reaches only through auto_map and trust_remote_code.
CUSTOM_CODE = """from transformers import BertConfig, BertModel


class TinyCustomConfig(BertConfig):
    model_type = "tiny-custom-bert"


class TinyCustomModel(BertModel):
    config_class = TinyCustomConfig
"""


def make_custom_code_encoder(bert: Path, target: Path) -> Path:
    """A copy of a tiny BERT whose config names its own code (``auto_map``)."""
    shutil.copytree(bert, target)
    (target / "custom_bert.py").write_text(CUSTOM_CODE)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="tiny-custom-bert", architectures=["TinyCustomModel"],
                  auto_map={"AutoConfig": "custom_bert.TinyCustomConfig",
                            "AutoModel": "custom_bert.TinyCustomModel"})
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return target


def make_decoder_only_model(target: Path) -> Path:
    """A tiny GPT-2: a real model type, but a decoder, which the encoder path refuses."""
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=64, n_embd=HIDDEN, n_layer=1, n_head=2,
                         n_positions=32)).save_pretrained(target)
    return target


def make_cross_encoder(target: Path, model_type: str = "bert", seed: int = 0,
                       activation: str | None = None) -> Path:
    """A tiny random cross-encoder (one-label sequence classifier) saved by
    sentence-transformers' ``CrossEncoder``, in the layout it writes (``modules.json`` of
    one Transformer, ``config_sentence_transformers.json`` with its ``activation_fn``).

    ``activation``: a torch activation class path to save instead of the default sigmoid.
    """
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification

    tokenizer, config = _tokenizer_and_config(model_type)
    config.num_labels = 1
    torch.manual_seed(seed)
    hf_dir = target.parent / f"{target.name}-transformers"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    kwargs: dict[str, Any] = {}
    if activation is not None:
        from sentence_transformers.util import import_from_string

        kwargs["activation_fn"] = import_from_string(activation)()
    CrossEncoder(str(hf_dir), max_length=MAX_SEQ_LENGTH, device="cpu", **kwargs).save(
        str(target))
    return target
