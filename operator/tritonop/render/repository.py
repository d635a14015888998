"""Rendering resources into a Triton model repository.

An ``EmbeddingSearch`` named ``news`` becomes six models:

* ``news``: ensemble ``text`` [+ ``num_results``, ``filter``] -> ``ids``, ``scores``,
  ``texts``
  (the model clients call, also through ``/v2/models/news/generate``);
* ``news_embedding``: ensemble ``text`` -> ``embedding``, ``attention_mask``;
* ``news_tokenizer``, ``news_encoder``, ``news_pooling``, ``news_search``: the
  Python-backend steps the ensembles share.

With ``spec.stages.fuse``, ``news_embed`` (``text`` -> ``embedding``, ``attention_mask``:
the tokenizer, encoder and pooling in one model) stands for the first three, and
``news_embedding`` is an ensemble of that one step: four models, the same two for clients.

With ``spec.rerank``, two more: ``news_rerank``, the cross-encoder (``query`` and
``documents`` -> ``scores``, ``tokens``), which the gateway calls for ``/v1/rerank`` and
for a search with ``rerank: true``; and ``news_reranked``, the search re-scored by it for
Triton's own clients (``news``'s inputs and outputs, plus ``search_scores``).

``_`` cannot appear in a Kubernetes name, so step names never collide with another
resource's ensemble.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from importlib import resources as package_files
from pathlib import Path, PurePosixPath

from tritonop.artifacts.llm import llm_model_dir
from tritonop.artifacts.versions import resource_fingerprint, version_dir
from tritonop.render.modelconfig import ConfigDict, ensemble, python_model, tensor, to_pbtxt
from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec
from tritonop.spec.base import quantity_bytes
from tritonop_backend.artifacts import render_prompt
from tritonop_backend.rerank import RERANK_FOLDER

DEFAULT_ARTIFACTS_ROOT = "/artifacts"
RepositoryFiles = dict[str, bytes]


def artifact_dirs(resource: Resource, artifacts_root: str) -> tuple[str, str]:
    """Model and index directories of an EmbeddingSearch's current artifacts version."""
    base = PurePosixPath(version_dir(resource, artifacts_root))
    return str(base / "model"), str(base / "index")


def _adapter_source(module: str) -> bytes:
    """The Python-backend adapter copied in as a model's ``model.py``."""
    return package_files.files("tritonop_backend.models").joinpath(f"{module}.py").read_bytes()


def _auto(value: object) -> str:
    """Unset settings reach the models as "auto", resolved against the model's own."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def embedding_search_models(resource: Resource, artifacts_root: str) -> list[ConfigDict]:
    """The model configs of one EmbeddingSearch, ensembles first."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    name, stages = resource.name, spec.stages
    model_dir, index_dir = artifact_dirs(resource, artifacts_root)
    # Every step that reads artifacts checks, before loading, that its version folder is
    # complete and was built for this fingerprint (tritonop_backend.artifacts.check_version).
    version = {"artifacts_dir": version_dir(resource, artifacts_root),
               "artifacts_fingerprint": resource_fingerprint(resource)}
    shared = {
        **version,
        "model_dir": model_dir,
        "max_sequence_length": _auto(spec.model.max_sequence_length),
        "pooling": _auto(spec.model.pooling),
    }
    text = tensor("text", "STRING", [1])
    ids, mask = tensor("input_ids", "INT64", [-1]), tensor("attention_mask", "INT64", [-1])
    ragged_mask = tensor("attention_mask", "INT64", [-1], ragged=True)
    hidden = tensor("token_embeddings", "FP32", [-1, -1])
    embedding = tensor("embedding", "FP32", [-1])
    num_results = tensor("num_results", "INT32", [1], optional=True)
    # JSON text over the corpus fields (tritonop_backend.filters), one per request.
    search_filter = tensor("filter", "STRING", [1], optional=True)
    results = [
        tensor("ids", "INT64", [-1]),
        tensor("scores", "FP32", [-1]),
        tensor("texts", "STRING", [-1]),
    ]
    tokenize = (f"{name}_tokenizer", {"text": "text"},
                {"input_ids": "input_ids", "attention_mask": "attention_mask"})
    encode = (f"{name}_encoder", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
              {"token_embeddings": "token_embeddings"})
    pool = (f"{name}_pooling",
            {"token_embeddings": "token_embeddings", "attention_mask": "attention_mask"},
            {"embedding": "embedding"})
    search = (f"{name}_search", {"embedding": "embedding", "num_results": "num_results",
                                 "filter": "filter"},
              {"ids": "ids", "scores": "scores", "texts": "texts"})
    # A client batch must fit every step it passes through.
    batch = stages.client_batch
    # The tokenizer is the one step that reads client text: it refuses a text over the
    # bound before tokenizing it, whichever ensemble the request came through.
    # Both ensembles' texts are queries (search, /v1/embeddings): the query prompt.
    reads_text = {"max_input_characters": str(spec.api.limits.max_input_characters),
                  "query_prompt": render_prompt(spec.model.query_prompt)}
    encodes = {"threads": str(stages.encoder.threads)}
    pools = {"normalize": _auto(spec.model.normalize)}
    gpu = spec.model.device == "gpu"
    if stages.fuse:
        # spec.stages.fuse: the three steps in one model, batched and scaled as the encoder.
        embed = (f"{name}_embed", {"text": "text"},
                 {"embedding": "embedding", "attention_mask": "attention_mask"})
        embedding_steps = [embed]
        search_steps = [(embed[0], embed[1], {"embedding": "embedding"}), search]
        embedding_models = [python_model(
            f"{name}_embed", stages.encoder, [text], [embedding, mask],
            {"stage": "embed", **shared, **reads_text, **encodes, **pools}, gpu=gpu)]
    else:
        embedding_steps, search_steps = [tokenize, encode, pool], [tokenize, encode, pool, search]
        embedding_models = [
            python_model(f"{name}_tokenizer", stages.tokenizer, [text], [ids, mask],
                         {"stage": "tokenizer", **shared, **reads_text}),
            python_model(
                f"{name}_encoder", stages.encoder,
                [tensor("input_ids", "INT64", [-1], ragged=True), ragged_mask], [hidden],
                {"stage": "encoder", **version, "model_dir": model_dir,
                 "max_sequence_length": shared["max_sequence_length"], **encodes}, gpu=gpu,
            ),
            python_model(
                f"{name}_pooling", stages.pooling,
                [tensor("token_embeddings", "FP32", [-1, -1], ragged=True), ragged_mask],
                [embedding], {"stage": "pooling", **pools, **shared},
            ),
        ]
    return [
        ensemble(name, batch, [text, num_results, search_filter], results, search_steps,
                 response_cache=spec.cache.enabled),
        # attention_mask too: its row sums are the token counts the gateway reports as usage.
        ensemble(f"{name}_embedding", batch, [text], [embedding, mask], embedding_steps),
        *embedding_models,
        python_model(
            f"{name}_search", stages.search, [embedding, num_results, search_filter], results,
            {"stage": "search", "index_dir": index_dir,
             "threads": str(stages.search.threads),
             "default_top_k": str(spec.search.default_top_k),
             "max_top_k": str(spec.search.max_top_k),
             # Which index it serves, for a reader of the config (exact: none, as before).
             **({"index": "hnsw", "quantization": spec.search.quantization}
                if spec.search.index == "hnsw" else {}),
             "document_prompt": render_prompt(spec.model.document_prompt), **shared},
        ),
        *rerank_models(resource, artifacts_root),
    ]


def rerank_models(resource: Resource, artifacts_root: str) -> list[ConfigDict]:
    """``<name>_rerank``, the cross-encoder of ``spec.rerank``: ``query`` and ``documents``
    (BYTES, a request's documents ragged) -> ``scores`` and ``tokens`` (each pair's token
    count), one per document; and ``<name>_reranked``, the search re-scored by it."""
    spec = resource.spec
    assert isinstance(spec, EmbeddingSearchSpec)
    if spec.rerank is None:
        return []
    rerank = spec.rerank
    base = PurePosixPath(version_dir(resource, artifacts_root))
    return [python_model(
        f"{resource.name}_rerank", rerank.stage,
        [tensor("query", "STRING", [1]), tensor("documents", "STRING", [-1], ragged=True)],
        [tensor("scores", "FP32", [-1]), tensor("tokens", "INT32", [-1])],
        {"artifacts_dir": str(base), "artifacts_fingerprint": resource_fingerprint(resource),
         "rerank_dir": str(base / RERANK_FOLDER),
         "max_sequence_length": _auto(rerank.model.max_sequence_length),
         "max_input_characters": str(spec.api.limits.max_input_characters),
         # /v1/rerank's bound, or the most candidates a reranked search sends
         "max_documents": str(max(rerank.max_documents, spec.search.max_top_k)),
         "threads": str(rerank.stage.threads)},
        gpu=spec.model.device == "gpu",  # where the encoder runs: the pod has a GPU then
    ), python_model(
        # A search re-scored by the cross-encoder, for Triton's own clients (BLS: it calls
        # the two models above; the gateway makes the same calls itself).
        f"{resource.name}_reranked", rerank.stage,
        [tensor("text", "STRING", [1]), tensor("num_results", "INT32", [1], optional=True),
         tensor("filter", "STRING", [1], optional=True)],
        [tensor("ids", "INT64", [-1]), tensor("scores", "FP32", [-1]),
         tensor("texts", "STRING", [-1]), tensor("search_scores", "FP32", [-1])],
        {"search_model": resource.name, "rerank_model": f"{resource.name}_rerank",
         "candidates": str(rerank.candidates),
         "max_input_characters": str(spec.api.limits.max_input_characters),
         "default_top_k": str(spec.search.default_top_k),
         "max_top_k": str(spec.search.max_top_k)},
    )]


LLM_INPUTS = [
    ("text_input", "STRING", [1]),
    ("max_tokens", "INT32", [1]),
    ("temperature", "FP32", [1]),
    ("top_k", "INT32", [1]),
    ("top_p", "FP32", [1]),
    ("repetition_penalty", "FP32", [1]),
    ("repeat_last_n", "INT32", [1]),
    ("seed", "UINT64", [1]),
    ("stop", "STRING", [-1]),
    ("stream", "BOOL", [1]),
    # text | raw | messages: how text_input is tokenized (the gateway's chat and completions).
    ("prompt_format", "STRING", [1]),
    # OpenAI's response_format object as JSON text: the output follows JSON or a JSON Schema.
    ("response_format", "STRING", [1]),
    # Most likely tokens listed beside each generated token's log probability; -1: none.
    ("logprobs", "INT32", [1]),
]


def llm_models(resource: Resource, artifacts_root: str) -> list[ConfigDict]:
    """The one decoupled model of an LLMService, named after the resource.

    Inputs and outputs follow Triton's TensorRT-LLM and vLLM backends (``text_input``
    in, ``text_output`` out, sampling parameters as optional scalars), so that their
    clients and ``/generate``, ``/generate_stream`` work unchanged.
    """
    spec = resource.spec
    assert isinstance(spec, LLMServiceSpec)
    model_dir = llm_model_dir(resource, artifacts_root)
    defaults, generation = spec.generation.defaults, spec.generation
    parameters = {
        "model_dir": model_dir,
        "dtype": spec.model.dtype,
        "device": spec.model.device,
        "trust_remote_code": _auto(spec.model.trust_remote_code),
        "max_context_length": str(spec.model.max_context_length),
        "max_sequences": str(spec.engine.max_sequences),
        "max_waiting": str(spec.engine.max_waiting),
        "threads": _auto(spec.engine.threads),
        "cuda_graphs": _auto(spec.engine.cuda_graphs),
        "prefix_cache_bytes": str(quantity_bytes(spec.engine.prefix_cache_size)),
        "chat_template": _auto(generation.chat_template),
        "streaming": _auto(generation.streaming),
        "max_tokens_limit": str(generation.limits.max_tokens),
        "max_input_characters": str(spec.api.limits.max_input_characters),
        "default_max_tokens": str(defaults.max_tokens),
        "default_temperature": str(defaults.temperature),
        "default_top_k": str(defaults.top_k),
        "default_top_p": str(defaults.top_p),
        "default_repetition_penalty": str(defaults.repetition_penalty),
        "default_repeat_last_n": str(defaults.repeat_last_n),
    }
    inputs = [tensor(name, dtype, dims, optional=name != "text_input")
              for name, dtype, dims in LLM_INPUTS]
    outputs = [tensor("text_output", "STRING", [1]), tensor("finish_reason", "STRING", [1]),
               tensor("prompt_tokens", "INT32", [1]), tensor("completion_tokens", "INT32", [1]),
               # JSON list of the response's tokens' log probabilities; empty when not asked.
               tensor("logprobs", "STRING", [1])]
    config = python_model(resource.name, spec.batching, inputs, outputs, parameters,
                          gpu=spec.gpus > 0 or spec.model.device == "cuda")
    # Decoupled: the model answers each request with a stream of responses, sent from
    # the engine's thread as tokens are produced.
    config["model_transaction_policy"] = {"decoupled": True}
    return [config]


def render_repository(
    resources: Iterable[Resource], artifacts_root: str = DEFAULT_ARTIFACTS_ROOT
) -> RepositoryFiles:
    """Every file of the model repository serving ``resources``, by relative path."""
    files: RepositoryFiles = {}
    for resource in resources:
        if isinstance(resource.spec, LLMServiceSpec):
            configs, adapter = llm_models(resource, artifacts_root), "llm"
        else:
            configs, adapter = embedding_search_models(resource, artifacts_root), "pipeline"
        for config in configs:
            model = config["name"]
            files[f"{model}/config.pbtxt"] = to_pbtxt(config).encode()
            if config.get("platform") == "ensemble":
                # Triton wants a version directory even for an ensemble.
                files[f"{model}/1/.gitkeep"] = b""
            else:
                # spec.rerank's two models have adapters of their own.
                own = {f"{resource.name}_{step}": step for step in ("rerank", "reranked")}
                files[f"{model}/1/model.py"] = _adapter_source(own.get(model, adapter))
    return files


def write_repository(files: RepositoryFiles, destination: Path) -> None:
    """Make ``destination`` hold exactly the rendered models.

    Model directories (those with a ``config.pbtxt``) that were not rendered are removed,
    so a renamed resource leaves no stale model behind; other files (a README) stay.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    rendered = {relative.split("/", 1)[0] for relative in files}
    for child in destination.iterdir():
        if child.is_dir() and (child.name in rendered or (child / "config.pbtxt").exists()):
            shutil.rmtree(child)
    for relative, content in sorted(files.items()):
        path = destination / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
