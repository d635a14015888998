"""Next-token selection for a batch in which every row has its own sampling parameters.

The order and semantics follow Hugging Face's ``generate``: repetition penalty, then
temperature, top-k and top-p, then a draw. Everything is vectorised over rows and the
vocabulary. The only per-row Python work is drawing one uniform number from each
sequence's own generator, which is what makes a seeded sequence reproduce the same
text whoever its batch-mates are: which path a row takes depends on its own
parameters and logits only.

Sorting a 50k vocabulary per row costs more than a small model's decode step on a CPU,
so filtered rows first look at their ``CANDIDATES`` best tokens and fall back to a full
sort only when the filter could reach beyond them.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from tritonop_backend.llm.params import GREEDY_BELOW

CANDIDATES = 256
"""Tokens examined before a full sort; nucleus sets of chat models are usually smaller."""


class RowParams:
    """Per-row sampling parameters, as Python values for branching and as tensors for math.

    Branch decisions (greedy or not, filtered or not) come from the Python values, so
    choosing a path never waits for the device.

    Attributes:
        sampled: rows that draw (temperature at least ``GREEDY_BELOW``); the others take the
            argmax, as a temperature that small would overflow the scaled logits.
        filtered: sampled rows with top-k or top-p active.
        plain: sampled rows with neither, which need no sorting at all.
        penalised: whether any row has a repetition penalty other than 1.
    """

    def __init__(
        self,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        repetition_penalty: Sequence[float],
        device: torch.device | str = "cpu",
    ) -> None:
        """Record the values of each row and copy the tensors each group needs, once."""
        self.device = torch.device(device)
        self.temperature = tuple(float(t) for t in temperature)
        self.top_k = tuple(int(k) for k in top_k)
        self.top_p = tuple(float(p) for p in top_p)
        self.repetition_penalty = tuple(float(r) for r in repetition_penalty)
        self.sampled = [row for row, t in enumerate(self.temperature) if t >= GREEDY_BELOW]
        self.filtered = [r for r in self.sampled if self.top_k[r] > 0 or self.top_p[r] < 1]
        self.plain = [r for r in self.sampled if self.top_k[r] == 0 and self.top_p[r] == 1]
        self.penalised = any(r != 1.0 for r in self.repetition_penalty)
        self.penalty = self._tensor(self.repetition_penalty, torch.float32)

    def tensor(self, values: Sequence[float] | Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """The given rows of one parameter, as a tensor on the device."""
        dtype = torch.long if values and isinstance(values[0], int) else torch.float32
        return self._tensor([values[row] for row in rows], dtype)

    def _tensor(self, values: Sequence[float] | Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(list(values), dtype=dtype, device=self.device)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one sequence; a missing seed is drawn from the OS.

    The generator lives on the CPU even when the model runs on CUDA: it only yields
    one uniform number per step, and a CPU stream of numbers is the same everywhere.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def draw_uniforms(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform number in [0, 1) per row, each from that row's own generator."""
    values = [torch.rand((), dtype=torch.float64, generator=g) for g in generators]
    return torch.stack(values).to(device)


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Penalise tokens that occur in each row's recent history, as Hugging Face does.

    ``RepetitionPenaltyLogitsProcessor`` multiplies a negative logit by the penalty and
    divides a non-negative one by it, once per distinct token. Marking the seen tokens
    with a scatter-add (not a scatter) keeps masked history entries from racing with
    real ones for the same vocabulary slot.

    Args:
        logits: ``(rows, vocab)`` float scores.
        history: ``(rows, window)`` token ids; entries where ``history_mask`` is False are ignored.
        history_mask: ``(rows, window)`` bool, True for tokens inside the row's window.
        penalty: ``(rows,)``; 1.0 leaves the row unchanged.

    Returns:
        New ``(rows, vocab)`` logits.
    """
    if history.shape[1] == 0:
        return logits
    seen = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    seen.scatter_add_(1, history, history_mask.to(torch.int32))
    scale = penalty.to(logits.dtype)[:, None]
    penalised = torch.where(logits < 0, logits * scale, logits / scale)
    return torch.where(seen > 0, penalised, logits)


def filter_sorted(
    values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, full_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply top-k and top-p to the best tokens of each row, sorted in descending order.

    Top-k keeps every token whose logit is at least the k-th largest (Hugging Face's
    ``TopKLogitsWarper`` keeps ties too). Top-p keeps a token while the probability of
    the tokens ranked above it is below ``top_p``: ``TopPLogitsWarper``'s rule read
    from the other end, so the most likely token always survives.

    ``values`` may be only a prefix of the sorted vocabulary. Probabilities are then
    normalised over the row's top-k set when it lies inside the prefix, else over the
    whole vocabulary (``full_lse``), and the second result says for which rows the
    prefix provably contains every token that the full computation would keep.

    Returns:
        Filtered logits (``-inf`` where removed) and a bool per row: "the prefix sufficed".
    """
    kth = (top_k.clamp(1, values.shape[1]) - 1)[:, None]
    threshold = values.gather(1, kth)
    use_k = top_k > 0
    masked = values.masked_fill(use_k[:, None] & (values < threshold), float("-inf"))
    normaliser = torch.where(use_k, masked.logsumexp(dim=-1), full_lse)
    probs = (masked - normaliser[:, None]).exp()
    mass_above = probs.cumsum(dim=-1) - probs
    drop = mass_above >= top_p[:, None]
    drop[:, 0] = False
    k_inside = values[:, -1] < threshold[:, 0]
    p_inside = probs.sum(dim=-1) >= top_p
    return masked.masked_fill(drop, float("-inf")), torch.where(use_k, k_inside, p_inside)


def sample_sorted(filtered: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one position per row by inverting the cumulative distribution of its logits.

    Inverse-CDF sampling needs one uniform number per row (see :func:`draw_uniforms`).
    Removed tokens have probability exactly zero, so they can never be chosen; the
    final clamp only guards against rounding at the very end of the distribution.

    Returns:
        ``(rows,)`` positions into ``filtered``'s last dimension.
    """
    probs = (filtered - filtered.amax(dim=-1, keepdim=True)).exp()
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms.double() * cdf[:, -1])[:, None]
    positions = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    last_kept = filtered.shape[1] - 1 - torch.isfinite(filtered).flip(-1).long().argmax(dim=-1)
    return torch.minimum(positions, last_kept)


def sample_filtered(
    scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Top-k/top-p sampling, from the best ``CANDIDATES`` tokens where that is exact.

    Returns:
        ``(rows,)`` token ids.
    """
    vocab = scaled.shape[1]
    width = min(vocab, max(CANDIDATES, int(top_k.max()) + 1))
    full_lse = scaled.logsumexp(dim=-1)
    if 4 * width >= vocab:
        values, order = scaled.sort(dim=-1, descending=True, stable=True)
        filtered, _ = filter_sorted(values, top_k, top_p, full_lse)
        return order.gather(1, sample_sorted(filtered, uniforms)[:, None]).squeeze(1)
    values, order = scaled.topk(width, dim=-1, sorted=True)
    filtered, inside = filter_sorted(values, top_k, top_p, full_lse)
    tokens = order.gather(1, sample_sorted(filtered, uniforms)[:, None]).squeeze(1)
    if not bool(inside.all()):
        rows = torch.nonzero(~inside).flatten()
        values, order = scaled[rows].sort(dim=-1, descending=True, stable=True)
        filtered, _ = filter_sorted(values, top_k[rows], top_p[rows], full_lse[rows])
        picks = sample_sorted(filtered, uniforms[rows])
        tokens[rows] = order.gather(1, picks[:, None]).squeeze(1)
    return tokens


def sample_plain(scaled: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sampling from the whole distribution, in vocabulary order: no sort needed."""
    return sample_sorted(scaled, uniforms)


def select_next_tokens(
    logits: torch.Tensor,
    params: RowParams,
    generators: Sequence[torch.Generator],
    history: torch.Tensor | None = None,
    history_mask: torch.Tensor | None = None,
    allowed: tuple[Sequence[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Choose each row's next token: argmax for greedy rows, a seeded draw for the others.

    Args:
        logits: ``(rows, vocab)`` scores of the next token.
        params: per-row parameters.
        generators: one per row; greedy rows' generators are left untouched.
        history: ``(rows, window)`` recent token ids for the repetition penalty, or None.
        history_mask: which ``history`` entries count, same shape.
        allowed: rows under a grammar and, for each, a ``(vocab,)`` bool of the tokens it
            may take (see :func:`mask_disallowed`); other rows are left as they are.

    Returns:
        ``(rows,)`` token ids on the logits' device.
    """
    logits = logits.float()
    if allowed is not None:
        logits = mask_disallowed(logits, *allowed)
    if params.penalised and history is not None and history_mask is not None:
        logits = apply_repetition_penalty(logits, history, history_mask, params.penalty)
    tokens = logits.argmax(dim=-1)
    for rows, sample in (
        (params.plain, _sample_plain_rows),
        (params.filtered, _sample_filtered_rows),
    ):
        if rows:
            index = torch.tensor(rows, device=logits.device)
            uniforms = draw_uniforms([generators[row] for row in rows], logits.device)
            tokens[index] = sample(logits.index_select(0, index), params, rows, uniforms)
    return tokens


def mask_disallowed(logits: torch.Tensor, rows: Sequence[int], allowed: torch.Tensor
                    ) -> torch.Tensor:
    """Logits with the tokens a grammar forbids set to ``-inf`` in the given rows.

    This comes before the penalty, temperature, top-k and top-p, so that the filters and
    the draw see only the tokens the grammar allows (the order vLLM uses). A new
    tensor is returned: ``logits`` may be a recorded CUDA graph's output buffer.

    Args:
        logits: ``(batch, vocab)`` float scores.
        rows: the constrained rows; the others keep their logits bit for bit.
        allowed: ``(len(rows), vocab)`` bool, True for the tokens each row may take.
    """
    index = torch.tensor(list(rows), device=logits.device)
    constrained = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, constrained)


def _scaled(logits: torch.Tensor, params: RowParams, rows: Sequence[int]) -> torch.Tensor:
    return logits / params.tensor(params.temperature, rows)[:, None]


def _sample_plain_rows(
    logits: torch.Tensor, params: RowParams, rows: Sequence[int], uniforms: torch.Tensor
) -> torch.Tensor:
    return sample_plain(_scaled(logits, params, rows), uniforms)


def _sample_filtered_rows(
    logits: torch.Tensor, params: RowParams, rows: Sequence[int], uniforms: torch.Tensor
) -> torch.Tensor:
    top_k = params.tensor(params.top_k, rows)
    top_p = params.tensor(params.top_p, rows)
    return sample_filtered(_scaled(logits, params, rows), top_k, top_p, uniforms)
