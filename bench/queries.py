"""Query texts that no one wrote by hand: word chunks sampled from the corpus with a seed.

Each query is 2 to 4 consecutive words of a corpus text chosen at random, so queries
look like what people type into a search box ("library for XML", "strategy game of")
and every run, on every machine, sends the same ones. The LLM's prompts (S4) are whole
corpus texts in one template: "Describe: Real-time strategy game of ancient warfare".
"""

from __future__ import annotations

import random
from pathlib import Path

from tritonop.artifacts.corpus import read_corpus

SEED = 20240605


def query_texts(corpus: Path, count: int, *, text_field: str = "text",
                seed: int = SEED) -> list[str]:
    """``count`` queries of 2-4 consecutive words from texts of ``corpus``."""
    texts = read_corpus(corpus, text_field)
    rng = random.Random(seed)
    queries: list[str] = []
    while len(queries) < count:
        words = rng.choice(texts).split()
        if len(words) < 2:
            continue
        length = rng.randint(2, min(4, len(words)))
        start = rng.randint(0, len(words) - length)
        queries.append(" ".join(words[start : start + length]))
    return queries


PROMPT_TEMPLATE = "Describe: {text}"


def describe_prompts(corpus: Path, count: int, *, text_field: str = "text",
                     seed: int = SEED) -> list[str]:
    """``count`` distinct corpus texts chosen with ``seed``, each as "Describe: <text>"."""
    texts = sorted(set(read_corpus(corpus, text_field)))
    chosen = random.Random(seed).sample(texts, min(count, len(texts)))
    return [PROMPT_TEMPLATE.format(text=text) for text in chosen]
