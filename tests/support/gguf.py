"""Writing a Hugging Face model folder as a GGUF file, the way llama.cpp's converter does.

``transformers`` reads GGUF files but does not write them, and nothing may be downloaded, so
the GGUF tests write their own with the ``gguf`` package (llama.cpp's own Python library):
tensors renamed by its ``TensorNameMap``, Llama's query and key rows permuted as
``convert_hf_to_gguf.py`` permutes them, Llama 3's RoPE scaling as a ``rope_freqs`` tensor,
the byte-level BPE vocabulary and merges as ``tokenizer.ggml.*`` metadata. Weights are
stored as float32, so reading them back is exact. Byte-level tokenizers only (Llama 3,
Qwen2, Qwen3), which is what the tiny models of those architectures have.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ARCHITECTURES = {"llama": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
"""``model_type`` -> ``gguf.MODEL_ARCH`` member."""


def write_gguf(folder: Path, path: Path) -> Path:
    """Write the model in ``folder`` (safetensors, ``tokenizer.json``) to ``path``."""
    import gguf
    import torch
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    arch = gguf.MODEL_ARCH[ARCHITECTURES[config["model_type"]]]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(folder.name)
    _hyperparameters(writer, config)
    _tokenizer(writer, folder)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # no output.weight: the reader ties it back
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, f"no GGUF name for {name}"
        if config["model_type"] == "llama" and name.endswith("q_proj.weight"):
            tensor = _permute(tensor, heads, heads)
        elif config["model_type"] == "llama" and name.endswith("k_proj.weight"):
            tensor = _permute(tensor, heads, kv_heads)
        writer.add_tensor(target, tensor.to(torch.float32).numpy())
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(config, rope))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hyperparameters(writer: Any, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(0)  # all float32


def _tokenizer(writer: Any, folder: Path) -> None:
    """The byte-level BPE of ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer metadata."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text())
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    special = {token["content"] for token in spec["added_tokens"] if token["special"]}
    vocab.update({token["content"]: token["id"] for token in spec["added_tokens"]})
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "ids must be dense"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair
                             for pair in spec["model"]["merges"]])
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token = settings.get(f"{role}_token")
        if token is not None:
            add(vocab[token])
    # llama.cpp stores the end of a chat turn apart from eos (Llama 3's <|eot_id|>).
    stops = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    eos = vocab.get(settings.get("eos_token") or "")
    for stop in stops if isinstance(stops, list) else []:
        if stop != eos:
            writer.add_eot_token_id(stop)
            break
    bos = settings.get("bos_token")
    processor = json.dumps(spec.get("post_processor"))
    writer.add_add_bos_token(bos is not None and bos in processor)
    template = settings.get("chat_template")
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def _permute(weights: Any, heads: int, kv_heads: int) -> Any:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute`` (rotary halves interleaved)."""
    if kv_heads != heads:
        heads = kv_heads
    shape = weights.shape
    return (weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> Any:
    """Llama 3's per-frequency RoPE factors, as ``convert_hf_to_gguf.py`` stores them."""
    import numpy as np

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = float(rope.get("rope_theta", 10000.0))
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for index in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (index / head_dim)
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
