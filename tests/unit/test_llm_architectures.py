"""Every decoder architecture the engine serves, against ``transformers``' own ``generate``.

The models are tiny and random (``tests/support/decoders.py``), saved as Hugging Face
folders and loaded by the engine's own loader, in float32, where greedy output must equal
``generate``'s token for token whatever shares the batch. Prompts are longer than the
8-token sliding windows of Mistral, Gemma and Phi-3, so that a window applied wrongly (or not
at all) changes the tokens: ``test_the_windows_change_the_output`` shows that they would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.decoders import DECODERS
from tests.support.llm import decoded, run
from tests.support.triton import API
from tritonop.artifacts.prepare import prepare
from tritonop.resources import Resource, parse_resource
from tritonop_backend.artifacts import ArtifactError
from tritonop_backend.llm.architectures import UnsupportedModelError
from tritonop_backend.llm.engine import LLMEngine
from tritonop_backend.llm.loading import LoadedModel, cpu_has_native_bf16, load_causal_lm
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POLICY = GenerationPolicy(default_max_tokens=16, max_tokens_limit=64, default_temperature=0.0,
                          max_context_tokens=256)
PROMPTS = [
    "Explain why the sky is blue, step by step, with examples from daily life.",
    "What is the capital of France?",
    "Hi",
]
LATE = "Write a short poem about the sea."
CHAT = [{"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Name a package for playing music."}]
NAMES = list(DECODERS)
SLIDING = [name for name, decoder in DECODERS.items() if decoder.sliding]


@pytest.fixture(scope="module")
def models(tiny_decoders: dict[str, Path]) -> dict[str, LoadedModel]:
    """Each architecture loaded once, in float32, as the Triton model loads it."""
    return {name: load_causal_lm(path, "float32", "cpu") for name, path in tiny_decoders.items()}


def request(prompt: str, max_tokens: int = 16, **values: Any) -> GenerationRequest:
    return parse_request({"text_input": prompt, "max_tokens": max_tokens, **values}, POLICY)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template as the tokenizer applies it, tokenized once (no second BOS)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model: Any, ids: list[int], max_tokens: int = 16) -> list[int]:
    """Greedy tokens from ``generate``, the independent reference (stops where it stops)."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                max_new_tokens=max_tokens, do_sample=False)
    return list(output[0, len(ids):].tolist())


def expected(loaded: LoadedModel, prompt: str, max_tokens: int = 16) -> list[int]:
    ids = chat_ids(loaded.tokenizer, [{"role": "user", "content": prompt}])
    return generate(loaded.model, ids, max_tokens)


@pytest.mark.parametrize("name", NAMES)
def test_alone_greedy_equals_generate(models: dict[str, LoadedModel], name: str) -> None:
    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=2)
    outcome = run(engine, {"a": request(PROMPTS[0])})["a"]
    assert outcome.tokens == expected(loaded, PROMPTS[0])
    assert outcome.text == decoded(engine, outcome.tokens)
    assert len(set(outcome.tokens)) > 2, "a degenerate model would hide a broken cache"


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
@pytest.mark.parametrize("name", NAMES)
def test_mixed_lengths_together_greedy_equals_generate(
    models: dict[str, LoadedModel], name: str, static_decode: bool
) -> None:
    """Three prompts of 5 to 30 tokens, a chat with a system turn, and one joining late.

    Also with the fixed-shape decode step that a GPU records as CUDA graphs (on the CPU it
    runs eagerly), which builds its own masks: per layer type where sliding and full
    layers mix (Gemma).
    """
    loaded = models[name]
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=8,
                       static_decode=static_decode)
    assert (engine._static is not None) == static_decode
    requests = {i: request(prompt) for i, prompt in enumerate(PROMPTS)}
    requests["chat"] = request(json.dumps(CHAT), prompt_format="messages")
    outcomes = run(engine, requests, joining={3: {"late": request(LATE)}})
    for i, prompt in enumerate(PROMPTS):
        assert outcomes[i].tokens == expected(loaded, prompt), prompt
    assert outcomes["late"].tokens == expected(loaded, LATE)
    assert outcomes["chat"].tokens == generate(loaded.model, chat_ids(loaded.tokenizer, CHAT))
    for outcome in outcomes.values():
        assert outcome.text == decoded(engine, outcome.tokens)


@pytest.mark.parametrize("name", SLIDING)
def test_the_windows_change_the_output(tiny_decoders: dict[str, Path],
                                       models: dict[str, LoadedModel], name: str) -> None:
    """Without its sliding window, the same model generates other tokens for these prompts:
    so the tests above would fail on an engine that ignored or misplaced the window."""
    from transformers import AutoModelForCausalLM

    unwindowed = AutoModelForCausalLM.from_pretrained(
        str(tiny_decoders[name]), dtype=torch.float32, sliding_window=4096).eval()
    loaded = models[name]
    assert loaded.model.config.sliding_window == 8
    ids = chat_ids(loaded.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    assert len(ids) > 2 * loaded.model.config.sliding_window
    assert generate(unwindowed, ids) != generate(loaded.model, ids)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_as_served_alone_equals_generate_in_bfloat16(
    tiny_decoders: dict[str, Path], name: str
) -> None:
    """What ``dtype: auto`` serves on such a CPU: linear layers packed for oneDNN (Phi-3's
    fused projections too), grouped decode attention where the model uses SDPA; the
    reference is a stock bfloat16 copy. Alone, the two round alike (``resolve_dtype``)."""
    served = load_causal_lm(tiny_decoders[name], "bfloat16", "cpu")
    stock = load_causal_lm(tiny_decoders[name], "bfloat16", "cpu", pack=False)
    assert served.packed_layers > 0 and stock.packed_layers == 0
    engine = LLMEngine(served.model, served.tokenizer, POLICY, max_sequences=2)
    for prompt in PROMPTS[:2]:
        outcome = run(engine, {"a": request(prompt)})["a"]
        assert outcome.tokens == expected(stock, prompt), prompt


def llm_service(source: Path, **model: Any) -> Resource:
    return parse_resource({"apiVersion": API, "kind": "LLMService", "metadata": {"name": "x"},
                           "spec": {"model": {"source": str(source), **model}}})


def edit_config(folder: Path, **values: Any) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


CUSTOM_CONFIG = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
'''
CUSTOM_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''
AUTO_MAP = {"AutoConfig": "configuration_tiny.TinyCustomConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"}


@pytest.fixture
def custom_code_model(tiny_decoders: dict[str, Path], tmp_path: Path) -> Path:
    """The tiny Llama as a model that exists only as its own code (``auto_map``)."""
    folder = tmp_path / "tinycustom"
    shutil.copytree(tiny_decoders["llama"], folder)
    (folder / "configuration_tiny.py").write_text(CUSTOM_CONFIG)
    (folder / "modeling_tiny.py").write_text(CUSTOM_MODEL)
    edit_config(folder, model_type="tinycustom", auto_map=AUTO_MAP,
                architectures=["TinyCustomForCausalLM"])
    return folder


class TestWhatPrepareRefuses:
    """Refused when the service is prepared, naming model.source and the cause; the Triton
    model's loader checks the same, for a repository prepared by other means."""

    def test_a_model_type_the_engine_does_not_serve(self, tmp_path: Path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        folder = tmp_path / "gpt2"
        config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
        GPT2LMHeadModel(config).save_pretrained(str(folder))
        with pytest.raises(ArtifactError) as caught:
            prepare([llm_service(folder)], tmp_path / "artifacts")
        assert str(caught.value).startswith(
            f"model source {folder}: model_type 'gpt2' is not an architecture this engine "
            "serves; it serves mistral, llama, qwen2, qwen3, gemma2, gemma3_text, phi3")
        with pytest.raises(UnsupportedModelError, match="'gpt2'"):
            load_causal_lm(folder, "float32", "cpu")

    def test_custom_code_unless_trusted(self, custom_code_model: Path, tmp_path: Path) -> None:
        with pytest.raises(ArtifactError) as caught:
            prepare([llm_service(custom_code_model)], tmp_path / "artifacts")
        assert str(caught.value) == (
            f"model source {custom_code_model}: model_type 'tinycustom' needs the model's own "
            "Python code (config.json auto_map: modeling_tiny.TinyCustomForCausalLM), which "
            "is not run unless model.trustRemoteCode is true")
        prepare([llm_service(custom_code_model, trustRemoteCode=True)], tmp_path / "artifacts")

    def test_a_base_model_without_a_chat_template_unless_chat_template_is_off(
            self, tiny_decoders: dict[str, Path], tmp_path: Path) -> None:
        folder = tmp_path / "base"
        shutil.copytree(tiny_decoders["mistral"], folder)
        config = folder / "tokenizer_config.json"
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                      if k != "chat_template"}))
        (folder / "chat_template.jinja").unlink(missing_ok=True)
        with pytest.raises(ArtifactError) as caught:
            prepare([llm_service(folder)], tmp_path / "artifacts")
        assert str(caught.value).startswith(
            f"model source {folder}: spec.generation.chatTemplate is true, but the model's "
            "tokenizer has no chat template")
        loaded = load_causal_lm(folder, "float32", "cpu")  # what the Triton model would say
        with pytest.raises(ValueError, match="the tokenizer has none"):
            LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=1)
        off = parse_resource({"apiVersion": API, "kind": "LLMService", "metadata": {"name": "x"},
                              "spec": {"model": {"source": str(folder)},
                                       "generation": {"chatTemplate": False}}})
        prepare([off], tmp_path / "artifacts")

    def test_a_gguf_of_an_architecture_the_engine_does_not_serve(self, tmp_path: Path) -> None:
        import gguf

        path = tmp_path / "model.gguf"
        writer = gguf.GGUFWriter(str(path), "gpt2")
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with pytest.raises(ArtifactError, match=f"^model source {path}: GGUF architecture "
                           "'gpt2' is not one this engine serves; it serves llama, mistral"):
            prepare([llm_service(path)], tmp_path / "artifacts")
        assert not (tmp_path / "artifacts" / "x" / "model").exists()


def test_trusted_custom_code_runs_and_greedy_equals_generate(custom_code_model: Path) -> None:
    """What ``trustRemoteCode: true`` does: the folder's own classes are loaded and run."""
    loaded = load_causal_lm(custom_code_model, "float32", "cpu", trust_remote_code=True)
    assert type(loaded.model).__name__ == "TinyCustomForCausalLM"
    assert type(loaded.model).__module__.endswith("modeling_tiny")
    engine = LLMEngine(loaded.model, loaded.tokenizer, POLICY, max_sequences=4)
    outcomes = run(engine, {i: request(prompt) for i, prompt in enumerate(PROMPTS)})
    for i, prompt in enumerate(PROMPTS):
        assert outcomes[i].tokens == expected(loaded, prompt)


def test_a_served_model_type_with_auto_map_runs_transformers_own_code(
    tiny_decoders: dict[str, Path], tmp_path: Path
) -> None:
    """Phi-3's repositories declare their own code beside model_type phi3: that code is not
    needed, so it is neither required to be trusted nor run (here it does not even exist)."""
    folder = tmp_path / "phi3"
    shutil.copytree(tiny_decoders["phi3"], folder)
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"})
    prepare([llm_service(folder)], tmp_path / "artifacts")
    loaded = load_causal_lm(folder, "float32", "cpu")
    assert type(loaded.model).__module__ == "transformers.models.phi3.modeling_phi3"


def test_the_triton_model_is_told_to_trust_the_code_only_when_the_resource_says_so(
    custom_code_model: Path,
) -> None:
    from tritonop.render.repository import llm_models

    for trusted in (False, True):
        resource = llm_service(custom_code_model, trustRemoteCode=trusted)
        (config,) = llm_models(resource, "/artifacts")
        assert config["parameters"]["trust_remote_code"] == {
            "string_value": "true" if trusted else "false"}
