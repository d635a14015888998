"""What an encoder model folder asks of tritonop: its architecture and its modules.

A sentence-transformers model is a ``transformers`` encoder plus the modules listed in
``modules.json``. tritonop serves the encoder as an exported graph and does the rest
itself (tokenizer, pooling, normalization, prompts), so everything that changes the
embedding has to be read here, and everything it cannot reproduce has to be refused
here, at prepare, with the source named: a module left out would serve embeddings that
look plausible and are wrong.

Read from the folder:

* ``config.json``: ``model_type`` (one of :data:`SUPPORTED_MODEL_TYPES`), the hidden
  size, how many positions the model has, and ``auto_map`` (custom code);
* ``modules.json``: Transformer, then Pooling, then Normalize or nothing; any other
  module (Dense, LayerNorm, Router, ...) is refused;
* the Pooling module's ``config.json``: one mode of cls / mean / max / lasttoken, in
  either the old (``pooling_mode_mean_tokens: true``) or the new (``pooling_mode:
  "mean"``) spelling, with ``include_prompt`` true;
* ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``; sentence-
  transformers 6 writes the maximum into ``tokenizer_config.json``'s
  ``model_max_length`` instead);
* ``config_sentence_transformers.json``'s ``prompts``: the query prompt is ``query``, the
  document prompt the first non-empty of ``document``, ``passage``, ``corpus`` (e5 names
  it passage; sentence-transformers 6 saves an empty ``document`` beside it).
  ``default_prompt_name`` is not used: like ``encode_query``/``encode_document``, queries
  and documents each get their own prompt.

A folder without ``modules.json`` is a plain ``transformers`` model, which
sentence-transformers loads with mean pooling and no Normalize module: so does tritonop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonop_backend.artifacts import ArtifactError
from tritonop_backend.pooling import POOLING_MODES

# model_type -> name in the README's table. Each is exported and served in the tests
# (tests/support/encoders.py); anything else is refused at prepare.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "bert": "BERT",
    "roberta": "RoBERTa",
    "xlm-roberta": "XLM-RoBERTa",
    "mpnet": "MPNet",
    "distilbert": "DistilBERT",
    "modernbert": "ModernBERT",
}
# Architectures whose position ids start after the padding id (fairseq's convention):
# position pad_token_id + 1 is the first token's, so max_position_embeddings - pad - 1
# tokens fit (514 positions hold 512 tokens).
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "mpnet", "camembert"}
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULES = ("Transformer", "Pooling", "Normalize")
_DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
# tokenizer_config.json's model_max_length when a tokenizer declares none (int(1e30)).
_NO_LIMIT = 10**12


@dataclass(frozen=True)
class EncoderLayout:
    """What a model folder declares, as tritonop serves it.

    Attributes:
        model_type: ``config.json``'s ``model_type``.
        dimension: the embedding width (the encoder's hidden size).
        pooling: one of :data:`tritonop_backend.pooling.POOLING_MODES`.
        normalize: whether ``modules.json`` ends with a Normalize module.
        max_sequence_length: tokens per text, the model's own (special tokens included).
        max_positions: the most tokens the encoder has position embeddings for.
        lowercase: sentence-transformers lower-cases texts before its tokenizer does.
        query_prompt: put before every query ("" for none).
        document_prompt: put before every corpus text ("" for none).
        custom_code: ``config.json`` names its own Python code (``auto_map``).
    """

    model_type: str
    dimension: int
    pooling: str
    normalize: bool
    max_sequence_length: int
    max_positions: int
    lowercase: bool
    query_prompt: str
    document_prompt: str
    custom_code: bool


def _json(path: Path, source: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"model source {source}: cannot read {path.name}: {err}") from None


def _custom_code(directory: Path, config: dict[str, Any]) -> list[str]:
    """Where the folder names Python code of its own (``auto_map`` entries)."""
    found = [f"config.json auto_map {key} -> {value}"
             for key, value in (config.get("auto_map") or {}).items()]
    tokenizer_config = _json(directory / "tokenizer_config.json", "") or {}
    if isinstance(tokenizer_config, dict):
        for key, value in (tokenizer_config.get("auto_map") or {}).items():
            found.append(f"tokenizer_config.json auto_map {key} -> {value}")
    return found


def check_architecture(source: str, directory: Path, config: dict[str, Any],
                       trust_remote_code: bool) -> bool:
    """Refuse a model that needs code tritonop does not run; returns whether it has its own.

    Raises:
        ArtifactError: naming ``spec.model.source``, the ``model_type`` and what to do.
    """
    model_type = str(config.get("model_type", ""))
    custom = _custom_code(directory, config)
    if custom and not trust_remote_code:
        raise ArtifactError(
            f"model source {source}: model_type {model_type!r} comes with its own Python "
            f"code ({'; '.join(custom)}), which tritonop runs only with "
            "spec.model.trustRemoteCode: true (it then runs in the prepare step, never in "
            "Triton, which serves the exported graph)")
    if custom:
        return True
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise ArtifactError(
            f"model source {source}: model_type {model_type!r} is not an encoder tritonop "
            f"can export and serve (supported: {supported})")
    return False


def _modules(directory: Path, source: str) -> list[tuple[str, Path]]:
    """``modules.json`` as (kind, folder) pairs, refusing modules tritonop does not run."""
    listed = _json(directory / "modules.json", source)
    if listed is None:
        return [("Transformer", directory)]
    kinds = []
    for module in listed:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _MODULES:
            raise ArtifactError(
                f"model source {source}: modules.json has a {module.get('type')} module "
                f"({module.get('path') or 'the model folder'}); tritonop serves Transformer, "
                "Pooling and Normalize modules only, and leaving one out would change "
                "every embedding")
        kinds.append((kind, directory / str(module.get("path", ""))))
    order = [kind for kind, _ in kinds]
    if order not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ArtifactError(
            f"model source {source}: modules.json lists {' -> '.join(order)}; tritonop "
            "serves Transformer -> Pooling [-> Normalize]")
    return kinds


def _pooling(folder: Path | None, source: str) -> str:
    """The one pooling mode of a Pooling module's config; mean when there is none."""
    if folder is None:
        return "mean"
    path = folder / "config.json"
    config = _json(path, source) or {}
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [name for key, name in _LEGACY_POOLING_KEYS.items() if config.get(key)]
        modes = modes or ["mean"]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ArtifactError(
            f"model source {source}: {path.relative_to(folder.parent)} pools with "
            f"{' + '.join(map(str, modes))}; tritonop serves one of {', '.join(POOLING_MODES)}")
    if config.get("include_prompt", True) is False:
        raise ArtifactError(
            f"model source {source}: {path.relative_to(folder.parent)} leaves prompt tokens "
            "out of the pooling (include_prompt: false, as INSTRUCTOR models do); tritonop "
            "pools over every token")
    return modes[0]


def _positions(model_type: str, config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings") or _NO_LIMIT)
    if model_type in POSITIONS_AFTER_PADDING:
        positions -= int(config.get("pad_token_id") or 0) + 1
    return positions


def _max_sequence_length(directory: Path, source: str, positions: int) -> int:
    """As sentence-transformers decides it: its own config, else the tokenizer's maximum.

    Either way no more than the encoder has positions for: a longer text would index
    past its position embeddings.
    """
    bert_config = _json(directory / "sentence_bert_config.json", source) or {}
    value = bert_config.get("max_seq_length")
    if not isinstance(value, int):
        tokenizer_config = _json(directory / "tokenizer_config.json", source) or {}
        value = tokenizer_config.get("model_max_length")
        if not isinstance(value, int) or value >= _NO_LIMIT:
            value = positions
    return min(value, positions)


def _prompts(directory: Path, source: str) -> tuple[str, str]:
    config = _json(directory / "config_sentence_transformers.json", source) or {}
    prompts = config.get("prompts") or {}
    query = prompts.get("query") or ""
    document = next((prompts[name] for name in _DOCUMENT_PROMPT_NAMES if prompts.get(name)), "")
    return str(query), str(document)


def read_layout(source: str, directory: Path, config: dict[str, Any], *,
                trust_remote_code: bool = False) -> EncoderLayout:
    """Read and check what ``directory`` (a model folder) needs to be served.

    Raises:
        ArtifactError: the model needs something tritonop does not do; the message names
            ``source`` and the file or ``model_type`` at fault.
    """
    custom = check_architecture(source, directory, config, trust_remote_code)
    model_type = str(config.get("model_type", ""))
    modules = _modules(directory, source)
    pooling_folder = next((folder for kind, folder in modules if kind == "Pooling"), None)
    dimension = config.get("hidden_size") or config.get("dim") or config.get("d_model")
    if not isinstance(dimension, int):
        raise ArtifactError(f"model source {source}: config.json gives no hidden_size")
    positions = _positions(model_type, config)
    bert_config = _json(directory / "sentence_bert_config.json", source) or {}
    query_prompt, document_prompt = _prompts(directory, source)
    return EncoderLayout(
        model_type=model_type,
        dimension=dimension,
        pooling=_pooling(pooling_folder, source),
        normalize=any(kind == "Normalize" for kind, _ in modules),
        max_sequence_length=_max_sequence_length(directory, source, positions),
        max_positions=positions,
        lowercase=bool(bert_config.get("do_lower_case", False)),
        query_prompt=query_prompt,
        document_prompt=document_prompt,
        custom_code=custom,
    )
