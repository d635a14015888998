"""Typed, validated, frozen spec models of tritonop's custom resources."""

from tritonop.spec.base import SpecModel, describe_errors, quantity_bytes
from tritonop.spec.embedding import EmbeddingSearchSpec
from tritonop.spec.llm import LLMServiceSpec

__all__ = [
    "EmbeddingSearchSpec",
    "LLMServiceSpec",
    "SpecModel",
    "describe_errors",
    "quantity_bytes",
]
