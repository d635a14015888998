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

CHAT = "chat"
EMBEDDING = "embedding"


@dataclass(frozen=True)
class Admission:
    """How many requests one model takes at once, and how many may wait for a place.

    Attributes:
        max_in_flight: requests forwarded to Triton at the same time.
        max_waiting: requests queued in the gateway beyond that; more get 429 at once.
    """

    max_in_flight: int
    max_waiting: int


@dataclass(frozen=True)
class ModelEntry:
    """One served model as the OpenAI API names it.

    Attributes:
        name: the resource's name, which is also the ``model`` clients send.
        kind: ``chat`` (an LLMService) or ``embedding`` (an EmbeddingSearch).
        admission: the model's admission bound.
        max_tokens_limit: the most tokens a chat request may ask for (LLMService).
        streaming: whether the LLMService allows streaming.
        max_top_k: the most search results a request may ask for (EmbeddingSearch).
        default_top_k: results when a search names no count (EmbeddingSearch).
        max_batch: texts per Triton request; longer embedding lists are split.
    """

    name: str
    kind: str
    admission: Admission
    max_tokens_limit: int = 0
    streaming: bool = True
    max_top_k: int = 0
    default_top_k: int = 0
    max_batch: int = 1


@dataclass(frozen=True)
class GatewayConfig:
    """Every model the gateway serves, by name."""

    models: dict[str, ModelEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        """The document the operator ships in the ConfigMap (``gateway.json``)."""
        return json.dumps({"models": [asdict(m) for m in self.models.values()]}, indent=2,
                          sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> GatewayConfig:
        """Read :meth:`to_json`'s document back."""
        entries = []
        for item in json.loads(text)["models"]:
            item = dict(item)
            item["admission"] = Admission(**item["admission"])
            entries.append(ModelEntry(**item))
        return cls({entry.name: entry for entry in entries})

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


def model_entry(resource: Resource) -> ModelEntry:
    """The gateway's view of one resource."""
    spec = resource.spec
    api = getattr(spec, "api", None)
    admission = default_admission(spec)
    if api is not None:
        admission = Admission(
            api.max_in_flight if api.max_in_flight is not None else admission.max_in_flight,
            api.max_waiting if api.max_waiting is not None else admission.max_waiting,
        )
    if isinstance(spec, LLMServiceSpec):
        return ModelEntry(resource.name, CHAT, admission,
                          max_tokens_limit=spec.generation.limits.max_tokens,
                          streaming=spec.generation.streaming, max_batch=1)
    assert isinstance(spec, EmbeddingSearchSpec)
    stages = spec.stages
    batch = min(s.max_batch_size for s in (stages.tokenizer, stages.encoder, stages.pooling,
                                           stages.search))
    return ModelEntry(resource.name, EMBEDDING, admission, max_top_k=spec.search.max_top_k,
                      default_top_k=spec.search.default_top_k, max_batch=batch)


def openai_enabled(resource: Resource) -> bool:
    """Whether the resource asks for the gateway (``spec.api.openai.enabled``, default on)."""
    api = getattr(resource.spec, "api", None)
    return api is None or api.openai.enabled


def gateway_config(resources: list[Resource]) -> GatewayConfig:
    """The gateway's configuration for the resources that enable it."""
    return GatewayConfig({r.name: model_entry(r) for r in resources if openai_enabled(r)})
