"""Tiny random-weight decoder LLMs of every architecture the engine serves, made on disk.

Each is a folder in the layout a Hub repository has (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json`` with a chat
template), so that everything from the loader to the chat path runs as it does for a real
model. Nothing is downloaded: the weights come from ``transformers``' own initialisation
(seeded), the tokenizers are trained here with the ``tokenizers`` library on a few hundred
package descriptions from the demo corpus, in the family the real model uses:

* SentencePiece-style BPE with byte fallback and ``▁`` for spaces (Mistral, Llama 2 and
  Phi-3's ``LlamaTokenizer``, Gemma): the normalizer and decoder of Mistral's own
  ``tokenizer.json``;
* byte-level BPE (Llama 3, Qwen2, Qwen3): GPT-2's byte alphabet and pre-tokenizer.

Each has its model family's special tokens and a chat template in that family's format
(shortened: no tools, no system-prompt juggling). Sizes are tiny (hidden 64, 2 layers, a
vocabulary of about 500), so a folder is made in well under a second and a forward pass
takes about a millisecond; sliding windows are 8 tokens, shorter than the tests' prompts,
so that they change the output (``test_llm_architectures`` checks that they do).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_CORPUS = ROOT / "examples" / "corpus" / "debian-packages.jsonl"

SLIDING_WINDOW = 8
"""Tokens a sliding-window layer sees; every test prompt is longer than this."""

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if system is defined else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + (message['content'] | trim) + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)


STOP_SCALE = 0.1
"""Factor on the output rows of the stop tokens. A random model picks a stop token first
about as often as any other; scaled down, greedy runs go on to ``max_tokens``, so that a
test compares 16 tokens rather than 1 (stopping itself is tested on SmolLM2)."""


@dataclass(frozen=True)
class Family:
    """A tokenizer family: how text is split, its special tokens and chat format.

    Attributes:
        style: "sentencepiece" (byte-fallback BPE over ``▁``-joined words) or "bytelevel".
        special: the special tokens, first the ones the model config refers to.
        bos, eos, pad, unk: their roles (None where the family has none).
        turn_end: the token that ends an assistant turn, listed in
            ``generation_config.json``'s ``eos_token_id`` beside ``eos``.
        template: the chat template.
        add_bos: whether the tokenizer puts ``bos`` before a plain prompt.
    """

    style: str
    special: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None
    turn_end: str | None
    template: str
    add_bos: bool


SENTENCEPIECE = ("<unk>", "<s>", "</s>")
MISTRAL = Family("sentencepiece", (*SENTENCEPIECE, "[INST]", "[/INST]"), "<s>", "</s>", None,
                 "<unk>", None, MISTRAL_TEMPLATE, True)
LLAMA3 = Family("bytelevel", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                              "<|end_header_id|>", "<|eot_id|>"),
                "<|begin_of_text|>", "<|end_of_text|>", None, None, "<|eot_id|>",
                LLAMA3_TEMPLATE, True)
QWEN = Family("bytelevel", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None,
              "<|im_end|>", "<|endoftext|>", None, "<|endoftext|>", CHATML_TEMPLATE, False)
GEMMA = Family("sentencepiece", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                 "<end_of_turn>"),
               "<bos>", "<eos>", "<pad>", "<unk>", "<end_of_turn>", GEMMA_TEMPLATE, True)
PHI3 = Family("sentencepiece", (*SENTENCEPIECE, "<|endoftext|>", "<|user|>", "<|assistant|>",
                                "<|system|>", "<|end|>"),
              "<s>", "<|endoftext|>", "<|endoftext|>", "<unk>", "<|end|>", PHI3_TEMPLATE, False)


@dataclass(frozen=True)
class Decoder:
    """One architecture: its tokenizer family, its config and how it is saved.

    Attributes:
        name: the folder's name and the tests' id.
        family: the tokenizer family.
        config: the ``transformers`` config class's name and its arguments beyond the common
            sizes (which :func:`make_decoder` adds).
        template_file: ship the chat template as ``chat_template.jinja`` (the layout of newer
            repositories such as Gemma 3's) instead of inside ``tokenizer_config.json``.
        sliding: some of its layers attend over a sliding window of :data:`SLIDING_WINDOW`.
    """

    name: str
    family: Family
    config: tuple[str, dict[str, Any]]
    template_file: bool = False
    sliding: bool = False


COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
          "initializer_range": 0.3}
"""Sizes shared by all. Weights drawn with a standard deviation of 0.3 rather than the
usual 0.02: at 0.02 a tiny model with tied embeddings repeats its input's last token
whatever came before it, which no cache or mask bug could change; at 0.3 its greedy
output depends on the whole context. Gemma multiplies its embeddings by sqrt(hidden) and
needs 0.01 for the same (measured: 4-14 distinct tokens in 16 at 0.01, 1 at 0.3)."""

DECODERS: dict[str, Decoder] = {d.name: d for d in [
    Decoder("mistral", MISTRAL, ("MistralConfig", {"sliding_window": SLIDING_WINDOW}),
            sliding=True),
    Decoder("llama", LLAMA3, ("LlamaConfig", {
        "tie_word_embeddings": True,  # as Llama 3.2 1B and 3B
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 64}})),
    Decoder("qwen2", QWEN, ("Qwen2Config", {"tie_word_embeddings": True})),
    # head_dim 32 is not hidden / heads (16), as in Qwen3-0.6B (128 against 64).
    Decoder("qwen3", QWEN, ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": True})),
    # Alternating sliding and full layers, attention and final logit soft-capping.
    Decoder("gemma2", GEMMA, ("Gemma2Config", {
        "head_dim": 16, "sliding_window": SLIDING_WINDOW, "query_pre_attn_scalar": 16,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "initializer_range": 0.01}), sliding=True),
    Decoder("gemma3", GEMMA, ("Gemma3TextConfig", {
        "head_dim": 16, "sliding_window": SLIDING_WINDOW, "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"], "initializer_range": 0.01}),
        template_file=True, sliding=True),
    # Fused qkv_proj and gate_up_proj; untied embeddings; a window as Phi-3-mini-4k's (2047).
    Decoder("phi3", PHI3, ("Phi3Config", {"tie_word_embeddings": False,
                                          "sliding_window": SLIDING_WINDOW}), sliding=True),
]}


def training_texts(count: int = 600) -> list[str]:
    """Package descriptions from the demo corpus, plus the chat words the tests use."""
    with open(DEMO_CORPUS, encoding="utf-8") as corpus:
        texts = [json.loads(line)["text"] for line in itertools.islice(corpus, count)]
    return [*texts, "What is the capital of France? Write a short poem about the sea.",
            "user assistant system model Explain why the sky is blue, step by step."]


def train_tokenizer(family: Family, vocab_size: int = 512) -> Any:
    """A ``tokenizers.Tokenizer`` of ``family``'s style, trained on :func:`training_texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing

    if family.style == "sentencepiece":
        tokenizer = Tokenizer(models.BPE(unk_token=family.unk, byte_fallback=True,
                                         fuse_unk=True))
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(" ", 1, 0)])
        byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                      special_tokens=[*family.special, *byte_tokens],
                                      show_progress=False)
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(family.special),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tokenizer.train_from_iterator(training_texts(), trainer)
    if family.add_bos and family.bos is not None:
        bos = (family.bos, tokenizer.token_to_id(family.bos))
        tokenizer.post_processor = TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[bos])
    return tokenizer


def make_decoder(decoder: Decoder, folder: Path, seed: int = 0) -> Path:
    """Write ``decoder`` as a Hugging Face model folder at ``folder``; return ``folder``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    family = decoder.family
    raw = train_tokenizer(family)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=family.bos, eos_token=family.eos,
        pad_token=family.pad, unk_token=family.unk, chat_template=family.template,
        additional_special_tokens=[t for t in family.special
                                   if t not in (family.bos, family.eos, family.pad, family.unk)])
    ids = {role: tokenizer.convert_tokens_to_ids(token) for role, token in
           (("bos", family.bos), ("eos", family.eos), ("pad", family.pad),
            ("turn_end", family.turn_end)) if token is not None}
    config_class, arguments = decoder.config
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=ids.get("bos"), eos_token_id=ids["eos"],
        pad_token_id=ids.get("pad"), **{**COMMON, **arguments})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stops = [ids["eos"], *([ids["turn_end"]] if "turn_end" in ids else [])]
    with torch.no_grad():  # see STOP_SCALE
        model.get_output_embeddings().weight[stops] *= STOP_SCALE
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get("bos"), eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=ids.get("pad"))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    _place_template(folder, family.template, as_file=decoder.template_file)
    return folder


def _place_template(folder: Path, template: str, *, as_file: bool) -> None:
    """Put the chat template where the architecture's real repositories keep it."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    jinja = folder / "chat_template.jinja"
    if as_file:
        config.pop("chat_template", None)
        jinja.write_text(template)
    else:
        config["chat_template"] = template
        jinja.unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def make_decoders(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every architecture in :data:`DECODERS` (or those named) under ``root``."""
    return {name: make_decoder(DECODERS[name], root / name)
            for name in (names or list(DECODERS))}



@pytest.fixture(scope="session")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every architecture's tiny model folder, made once per session (about 3 s in all)."""
    return make_decoders(tmp_path_factory.mktemp("decoders"))
