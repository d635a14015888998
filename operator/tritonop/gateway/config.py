"""What the gateway serves: one entry per resource, derived from the resources' specs.

The gateway needs only a little of each spec (names, limits, admission bounds), so the
operator renders it as a small JSON document next to the model repository; locally
``tritonop serve`` builds the same document from the resource files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tritonop.resources import Resource
from tritonop.spec import EmbeddingSearchSpec, LLMServiceSpec
from tritonop.spec.common import ApiAuthSpec, GatewayLimits, KeyLimits

CHAT = "chat"
EMBEDDING = "embedding"
# Where the gateway container mounts the Secret of API keys (spec.api.auth.secretName).
API_KEYS_PATH = "/etc/tritonop/api-keys"


@dataclass(frozen=True)
class Admission:
    """How many requests one model takes at once, and how many may wait for a place.

    Attributes:
        max_in_flight: requests forwarded to Triton at the same time.
        max_waiting: requests queued in the gateway beyond that; more get 429 at once.
    """

    max_in_flight: int
    max_waiting: int


_LIMITS = GatewayLimits()


@dataclass(frozen=True)
class InputLimits:
    """Bounds checked before work is spent on a request (``spec.api.limits``).

    Attributes:
        max_embedding_inputs: texts in one ``/v1/embeddings`` request.
        max_input_characters: characters of one text (embeddings, search) or one prompt
            (chat: all message contents together).
        stream_stall_seconds: a stream whose client takes no data for this long is ended.
        triton_timeout_seconds: the most one call to Triton may take (a stream: the longest
            gap between two responses).
    """

    max_embedding_inputs: int = _LIMITS.max_embedding_inputs
    max_input_characters: int = _LIMITS.max_input_characters
    stream_stall_seconds: float = _LIMITS.stream_stall_seconds
    triton_timeout_seconds: float = _LIMITS.triton_timeout_seconds

    @classmethod
    def of(cls, limits: GatewayLimits) -> InputLimits:
        return cls(limits.max_embedding_inputs, limits.max_input_characters,
                   limits.stream_stall_seconds, limits.triton_timeout_seconds)


@dataclass(frozen=True)
class ClientLimits:
    """What one API client may use of one model (``spec.api.auth.limits``); None: no limit.

    Attributes:
        requests_per_minute: requests admitted in any 60 seconds.
        tokens_per_minute: prompt and generated tokens answered in any 60 seconds.
        max_in_flight_share: the share of the model's in-flight places one client holds.
    """

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_in_flight_share: float | None = None


@dataclass(frozen=True)
class ModelEntry:
    """One served model as the OpenAI API names it.

    Attributes:
        name: the resource's name, which is also the ``model`` clients send.
        kind: ``chat`` (an LLMService) or ``embedding`` (an EmbeddingSearch).
        admission: the model's admission bound.
        max_tokens_limit: the most tokens a chat request may ask for (LLMService).
        max_choices: the most choices (``n``) a chat request may ask for (LLMService).
        streaming: whether the LLMService allows streaming.
        max_top_k: the most search results a request may ask for (EmbeddingSearch).
        default_top_k: results when a search names no count (EmbeddingSearch).
        max_batch: texts per Triton request; longer embedding lists are split.
        limits: bounds on inputs, stalled streams and calls to Triton.
        client_limits: limits of every API client on this model.
        named_limits: limits of named clients, replacing ``client_limits`` for them.
        fields: the corpus fields searches may filter on, name -> type (EmbeddingSearch).
        rerank_candidates: search results a reranked search re-scores; 0: the model has
            no reranker (EmbeddingSearch without ``spec.rerank``).
        max_rerank_documents: documents one ``/v1/rerank`` request may send.
        search_index: the search index the spec asks for (``exact``, ``hnsw`` or
            ``hnsw+int8``/``hnsw+binary``), shown on ``/v1/models``; "" for chat models.
    """

    name: str
    kind: str
    admission: Admission
    max_tokens_limit: int = 0
    max_choices: int = 1
    streaming: bool = True
    max_top_k: int = 0
    default_top_k: int = 0
    max_batch: int = 1
    limits: InputLimits = InputLimits()
    client_limits: ClientLimits = ClientLimits()
    named_limits: dict[str, ClientLimits] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    rerank_candidates: int = 0
    max_rerank_documents: int = 0
    search_index: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    """Every model the gateway serves, by name, and where its API keys are.

    Attributes:
        models: the served models.
        api_keys: a folder of keys laid out as a Secret volume (one file per client), or
            None. Only the path: the keys themselves never enter this document.
        protect_metrics: whether ``/metrics`` needs a key too.
    """

    models: dict[str, ModelEntry] = field(default_factory=dict)
    api_keys: str | None = None
    protect_metrics: bool = False

    def to_json(self) -> str:
        """The document the operator ships in the ConfigMap (``gateway.json``)."""
        return json.dumps({"models": [asdict(m) for m in self.models.values()],
                           "api_keys": self.api_keys, "protect_metrics": self.protect_metrics},
                          indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> GatewayConfig:
        """Read :meth:`to_json`'s document back."""
        document = json.loads(text)
        entries = []
        for item in document["models"]:
            item = dict(item)
            item["admission"] = Admission(**item["admission"])
            item["limits"] = InputLimits(**item.get("limits", {}))
            item["client_limits"] = ClientLimits(**item.get("client_limits", {}))
            item["named_limits"] = {name: ClientLimits(**limits)
                                    for name, limits in item.get("named_limits", {}).items()}
            entries.append(ModelEntry(**item))
        return cls({entry.name: entry for entry in entries}, document.get("api_keys"),
                   bool(document.get("protect_metrics", False)))

    @classmethod
    def load(cls, path: Path) -> GatewayConfig:
        return cls.from_json(path.read_text())


def default_admission(spec: EmbeddingSearchSpec | LLMServiceSpec) -> Admission:
    """Admission bounds derived from the batching settings when ``spec.api`` names none.

    An LLM takes as many requests as its engine decodes together; the engine's waiting
    places move into the gateway, so that a full engine is a quick 429 here instead of a
    queue inside Triton. A search pipeline takes one encoder batch per encoder instance,
    and as many again may wait: more in the pipeline only lengthens every step's queue
    (the overload tail measured in S5), it does not raise throughput.
    """
    if isinstance(spec, LLMServiceSpec):
        return Admission(spec.engine.max_sequences, spec.engine.max_waiting)
    encoder = spec.stages.encoder
    bound = max(1, encoder.max_batch_size * encoder.instances)
    return Admission(bound, bound)


def _client_limits(limits: KeyLimits) -> ClientLimits:
    return ClientLimits(limits.requests_per_minute, limits.tokens_per_minute,
                        limits.max_in_flight_share)


def model_entry(resource: Resource) -> ModelEntry:
    """The gateway's view of one resource."""
    spec = resource.spec
    api = getattr(spec, "api", None)
    admission = default_admission(spec)
    limits = InputLimits() if api is None else InputLimits.of(api.limits)
    every, named = ClientLimits(), {}
    if api is not None:
        admission = Admission(
            api.max_in_flight if api.max_in_flight is not None else admission.max_in_flight,
            api.max_waiting if api.max_waiting is not None else admission.max_waiting,
        )
        if api.auth is not None:
            every = _client_limits(api.auth.limits)
            named = {name: _client_limits(each) for name, each in sorted(api.auth.keys.items())}
    if isinstance(spec, LLMServiceSpec):
        return ModelEntry(resource.name, CHAT, admission,
                          max_tokens_limit=spec.generation.limits.max_tokens,
                          max_choices=spec.generation.limits.max_choices,
                          streaming=spec.generation.streaming, max_batch=1, limits=limits,
                          client_limits=every, named_limits=named)
    assert isinstance(spec, EmbeddingSearchSpec)
    return ModelEntry(resource.name, EMBEDDING, admission, max_top_k=spec.search.max_top_k,
                      default_top_k=spec.search.default_top_k,
                      max_batch=spec.stages.client_batch, limits=limits,
                      client_limits=every, named_limits=named,
                      fields={f.name: f.type for f in spec.corpus.fields},
                      rerank_candidates=spec.rerank.candidates if spec.rerank else 0,
                      max_rerank_documents=spec.rerank.max_documents if spec.rerank else 0,
                      search_index=spec.search.index + (
                          f"+{spec.search.quantization}"
                          if spec.search.quantization != "none" else ""))


def openai_enabled(resource: Resource) -> bool:
    """Whether the resource asks for the gateway (``spec.api.openai.enabled``, default on)."""
    api = getattr(resource.spec, "api", None)
    return api is None or api.openai.enabled


def _auth(resource: Resource) -> ApiAuthSpec | None:
    api = getattr(resource.spec, "api", None)
    return None if api is None else api.auth


def gateway_config(resources: list[Resource]) -> GatewayConfig:
    """The gateway's configuration for the resources that enable it.

    With ``spec.api.auth``, the keys are read from :data:`API_KEYS_PATH`, where the pod
    mounts the Secret; the operator never reads the keys.
    """
    served = [r for r in resources if openai_enabled(r)]
    auth = [a for a in map(_auth, served) if a is not None]
    return GatewayConfig({r.name: model_entry(r) for r in served},
                         api_keys=API_KEYS_PATH if auth else None,
                         protect_metrics=any(a.protect_metrics for a in auth))
