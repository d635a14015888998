"""Continuous batching over a Hugging Face causal language model.

One thread drives the engine by calling :meth:`LLMEngine.step` in a loop; other threads
call :meth:`LLMEngine.add` and :meth:`LLMEngine.cancel` at any time. Each step admits
waiting requests into free slots (one batched prefill), then runs one batched decode
pass for every running sequence and samples each row with its own parameters. A new
request therefore joins the running batch at the next step, and a sequence that
finishes leaves at once, handing its slot and its cache rows to the next one.

A prefill computes only what it must. Keys and values of prompt prefixes are kept in
blocks (``prefix.py``) and copied into a new prompt's row instead of being computed
again; identical prompts admitted together are computed once. A prompt with more than
``prefill_chunk_tokens`` left to compute goes in chunks, one a step, so that running
sequences keep getting a token every step instead of waiting for a whole long prefill.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from tritonop_backend.errors import RequestError
from tritonop_backend.llm.chat_tools import GRAMMAR_TOKENS, detect_tool_format, render_chat
from tritonop_backend.llm.grammar import CallWatch, GrammarTokens
from tritonop_backend.llm.graphs import StaticDecoder, width_bucket
from tritonop_backend.llm.kv import KVBuffer, KVShape, Window, cache_keyword
from tritonop_backend.llm.lean import LeanDecoder
from tritonop_backend.llm.params import GenerationPolicy, GenerationRequest
from tritonop_backend.llm.prefix import (
    BLOCK_TOKENS,
    DEFAULT_BUDGET_BYTES,
    BlockKey,
    PrefixCache,
    block_keys,
)
from tritonop_backend.llm.sampling import RowParams, make_generator, select_next_tokens
from tritonop_backend.llm.text import TextStream

LOGGER = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, CONTEXT, ERROR = "stop", "length", "cancelled", "context", "error"
"""Finish reasons: eos, a stop string or a complete structured output; max_tokens; cancel();
the context is full; a failure."""


DEFAULT_CHUNK_TOKENS = 512
"""Prompt tokens computed in one step, by default, when a prompt is longer: a chunk of
SmolLM2-135M takes about as long as a few decode steps of a full batch on one core."""


DEFER_MIN_TOKENS = 128
"""Prompt tokens that a prompt must be able to take from the cache one step later (blocks
that another prompt admitted with it is about to store) for it to wait that step: for
fewer, computing them costs less than the wait."""


MAX_FAILED_STEPS = 3
"""Model passes failing in a row, with none succeeding between, after which the engine
gives up: a fault that survives new inputs is the device's, not a request's."""


class QueueFullError(RuntimeError):
    """Every slot and every queue place is taken; the adapter answers 503 / UNAVAILABLE."""


class EngineFailedError(RuntimeError):
    """The engine hit a fault it cannot recover from (a sticky CUDA error, say).

    It takes no more requests and reports not ready, so that the orchestrator replaces
    the process; only a new process gets a fresh device context.
    """


class TokenLogprob(NamedTuple):
    """One generated token's log probability and the most likely tokens at its step.

    Log probabilities are ``log_softmax`` of the model's raw logits for that step, in
    float32: before the repetition penalty, temperature, top-k, top-p and any grammar mask,
    as OpenAI and vLLM report them. They describe the model, not the sampler.

    Attributes:
        token: the generated token's id.
        logprob: its log probability.
        top: ``(token, logprob)`` of the most likely tokens, best first, as many as asked.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class GenerationEvent(NamedTuple):
    """What one step produced for one request.

    Attributes:
        request_id: as given to :meth:`LLMEngine.add`.
        text: new text since the previous event (valid UTF-8, possibly empty on the last).
        finish_reason: None while generating; then one of "stop", "length", "cancelled",
            "context" or "error".
        prompt_tokens: tokens in the prompt, after the chat template.
        completion_tokens: tokens generated so far (an end-of-sequence token counts).
        token_ids: the tokens generated since the previous event (a token that completes
            no character yet, or is held back as a possible stop string, waits for one).
        error: what went wrong, when ``finish_reason`` is "error".
        logprobs: for a request that asked for them, an entry for each token in
            ``token_ids`` except an end-of-sequence token, which ends the text and is no
            part of it.
    """

    request_id: Hashable
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(eq=False)
class _Sequence:
    """Host-side state of one request, queued or running."""

    request_id: Hashable
    prompt_ids: list[int]
    request: GenerationRequest
    stream: TextStream
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    length: int = 0
    """Tokens held in the KV cache for this sequence."""
    reported: int = 0
    """Generated tokens already handed out in events."""
    matcher: Any = None
    """The llguidance matcher of a request with a ``response_format``; None without one, and
    while a grammar waits for its trigger."""
    watch: tuple[CallWatch, Any] | None = None
    """Under ``tool_choice: auto``: the watch for the start of a call and the matcher that
    applies from there; None once it applies (then in :attr:`matcher`), or without one."""
    logprobs: list[TokenLogprob] | None = None
    """Entries of the generated tokens (end of sequence left out) when the request asked."""
    logprobs_reported: int = 0
    blocks: list[BlockKey] | None = None
    """The prompt's whole blocks as the prefix cache keys them, once computed."""
    done: int = 0
    """Prompt tokens computed so far, while the prompt is computed in chunks."""
    computed: torch.Tensor | None = None
    """Their keys and values meanwhile, laid out as ``KVBuffer.read_row`` gives them: out of
    the buffer, whose free rows the padding rows of a fixed-shape decode step write."""

    def event(self, text: str, reason: str | None, error: str | None = None) -> GenerationEvent:
        """The next event of this sequence, carrying the tokens not reported yet."""
        fresh = tuple(self.generated[self.reported :])
        self.reported = len(self.generated)
        entries: tuple[TokenLogprob, ...] = ()
        if self.logprobs is not None:
            entries = tuple(self.logprobs[self.logprobs_reported :])
            self.logprobs_reported = len(self.logprobs)
        return GenerationEvent(
            self.request_id,
            text,
            reason,
            len(self.prompt_ids),
            len(self.generated),
            fresh,
            error,
            entries,
        )

    @property
    def penalty_span(self) -> int:
        """How many of the latest cached tokens the repetition penalty looks at (0: none)."""
        params = self.request.params
        return 0 if params.repetition_penalty == 1.0 else min(params.repeat_last_n, self.length)

    @property
    def total(self) -> int:
        """Prompt plus generated tokens: what must fit in the context."""
        return len(self.prompt_ids) + len(self.generated)


class LLMEngine:
    """Continuous-batching text generation over one causal LM on one device."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        policy: GenerationPolicy,
        *,
        max_sequences: int = 8,
        max_waiting: int = 64,
        max_prefill_tokens: int = 4096,
        device: torch.device | str | None = None,
        static_decode: bool | None = None,
        prefix_cache_bytes: int = DEFAULT_BUDGET_BYTES,
        prefill_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        """Wrap a loaded model; nothing runs until the first step.

        Args:
            model: a ``transformers`` causal LM in eval mode, already on ``device``.
            tokenizer: its tokenizer.
            policy: defaults and limits; ``max_context_tokens`` sizes the cache.
            max_sequences: sequences decoded together (the batch's rows).
            max_waiting: requests that may wait beyond those; more get QueueFullError.
            max_prefill_tokens: padded prompt tokens admitted in one step, so that a burst
                of long prompts does not stall running sequences for too long.
            device: where the model lives; by default the device of its parameters.
            static_decode: run decode steps at fixed shapes, recorded once and replayed
                as CUDA graphs on a GPU (see ``graphs.py``); None means on for CUDA. On
                the CPU it runs the same fixed-shape step eagerly (slower: for tests).
            prefix_cache_bytes: keys and values of prompt prefixes kept for later prompts
                that begin alike (see ``prefix.py``), at most this many bytes; 0 turns
                prefix caching off, and with it the single prefill of identical prompts
                admitted together.
            prefill_chunk_tokens: a prompt with more tokens to compute than this is computed
                in chunks of this many, one a step, with the running sequences decoding a
                token between two chunks; 0 computes every prompt whole.
        """
        policy.validate()
        if max_sequences < 1 or max_waiting < 0:
            raise ValueError("max_sequences must be >= 1 and max_waiting >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.policy = self._tool_policy(policy)
        self.max_sequences = max_sequences
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        if prefill_chunk_tokens < 0:
            raise ValueError("prefill_chunk_tokens must be >= 0")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._partial: _Sequence | None = None
        """The prompt being computed in chunks, holding a slot; None when there is none."""
        self.device = torch.device(device) if device is not None else _model_device(model)
        self._check_model(model, tokenizer, policy)
        self._eos = _eos_ids(model, tokenizer)
        self._grammar = GrammarTokens(tokenizer, self._eos)
        self._kv = _allocate_cache(model, policy, max_sequences, self.device)
        self._cache = self._kv.cache()
        self._cache_keyword = cache_keyword(model)
        self.prefix_cache = (PrefixCache(self._kv.shape, prefix_cache_bytes, self.device)
                             if prefix_cache_bytes > 0 else None)
        """The kept prompt prefixes; None when prefix caching is off."""
        if static_decode is None:
            static_decode = self.device.type == "cuda"
        self._static = (
            StaticDecoder(model, self._kv, self._cache, max_sequences, graphs=True)
            if static_decode and StaticDecoder.supports(model)
            else None
        )
        self._lean = LeanDecoder.build(model, self._kv) if self._static is None else None
        """The decode pass of Llama-layout models with packed layers (``lean.py``), or None."""
        self._token_bytes: dict[int, bytes] = {}
        self._running: list[_Sequence] = []
        self._rows: RowParams | None = None
        self._waiting: deque[_Sequence] = deque()
        self._cancelled: set[Hashable] = set()
        self._known: set[Hashable] = set()
        self._reserved: set[Hashable] = set()
        """Requests holding a place while their prompts are tokenized, not yet queued."""
        self._lock = threading.Condition()
        self._failed_steps = 0
        self.failure: str | None = None
        """Why the engine stopped for good; None while it is healthy."""

    # Called from any thread -------------------------------------------------------------

    def add(self, request_id: Hashable, request: GenerationRequest) -> None:
        """Queue a request; it starts at the next step that has a free slot.

        The request's place is taken before its prompt is templated and tokenized, so that
        a full engine refuses at once instead of spending tokenizer time on a request it
        cannot take (and callers waiting behind it do not pay for that time either).

        Raises:
            RequestError: on ``text_input`` when the prompt leaves no room to generate, on
                ``response_format`` when its grammar cannot be used with this model.
            QueueFullError: when all slots and queue places are taken.
            EngineFailedError: when the engine has failed for good (see :attr:`ready`).
            ValueError: when ``request_id`` is already queued or running.
        """
        self._reserve(request_id)
        try:
            prompt_ids = self.encode_request(request)
            limit = self.policy.max_context_tokens - 1
            if len(prompt_ids) > limit:
                raise RequestError(
                    "text_input",
                    f"the prompt is {len(prompt_ids)} tokens; at most {limit} fit in the context",
                )
            grammar = request.response_format
            matcher = self._grammar.matcher(grammar) if grammar is not None else None
            trigger = grammar.trigger if grammar is not None else None
            # A call's control token stays in the text: where the gateway finds the call.
            controls = self._controls(trigger.controls) if trigger is not None else {}
            shown = controls
            if grammar is not None and grammar.type == "tool_calls" and self.policy.tool_tokens:
                shown = {**controls, **{i: name for name, i in self.policy.tool_tokens}}
            sequence = _Sequence(
                request_id=request_id,
                prompt_ids=prompt_ids,
                request=request,
                stream=TextStream(self.tokenizer, request.params.stop, shown=shown),
                generator=make_generator(request.params.seed),
                matcher=matcher if trigger is None else None,
                watch=(None if trigger is None
                       else (CallWatch(trigger, frozenset(controls)), matcher)),
                logprobs=[] if request.logprobs is not None else None,
            )
        except BaseException:
            with self._lock:
                self._reserved.discard(request_id)
            raise
        with self._lock:
            self._reserved.discard(request_id)
            if self.failure is not None:  # failed while this prompt was being tokenized
                raise EngineFailedError(self.failure)
            self._known.add(request_id)
            self._cancelled.discard(request_id)  # a cancel for an earlier use of the id
            self._waiting.append(sequence)
            self._lock.notify_all()

    def _reserve(self, request_id: Hashable) -> None:
        """Take a place for a request about to be tokenized, or refuse it now."""
        if self.failure is not None:
            raise EngineFailedError(self.failure)
        with self._lock:
            if request_id in self._known or request_id in self._reserved:
                raise ValueError(f"request {request_id!r} is already in the engine")
            if len(self._known) + len(self._reserved) >= self.max_sequences + self.max_waiting:
                raise QueueFullError(
                    f"{self.max_sequences} sequences running and {self.max_waiting} waiting"
                )
            self._reserved.add(request_id)

    def cancel(self, request_id: Hashable) -> bool:
        """Stop a request at the next step; it gets a final "cancelled" event.

        Returns:
            Whether the request was still queued or running.
        """
        with self._lock:
            if request_id not in self._known:
                return False
            self._cancelled.add(request_id)
            self._lock.notify_all()
            return True

    def cancel_all(self) -> None:
        """Cancel everything, e.g. when the model is unloaded."""
        with self._lock:
            self._cancelled.update(self._known)
            self._lock.notify_all()

    def has_work(self) -> bool:
        """Whether a step would do anything."""
        with self._lock:
            return bool(self._known)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block the driving thread until there is something to do, or the timeout passes."""
        with self._lock:
            return self._lock.wait_for(lambda: bool(self._known), timeout)

    def encode_request(self, request: GenerationRequest) -> list[int]:
        """Token ids of a request's prompt in its format; the chat template is applied once."""
        if request.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("messages", "this model's tokenizer has no chat template")
            assert request.chat is not None
            text = render_chat(self._render, request.chat, self.policy.tool_format)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if request.raw:
            return list(self.tokenizer(request.prompt)["input_ids"])
        return self.encode_prompt(request.prompt)

    def _render(self, messages: list[dict[str, Any]], **options: Any) -> str:
        """The chat template's text of ``messages`` (``options``: tools, generation prompt)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, as one user turn of the chat template when the policy says so."""
        if self.policy.apply_chat_template:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in the text (a piece of a character, possibly).

        From llguidance's reading of the vocabulary, which undoes byte-level and
        SentencePiece byte encodings; a tokenizer it cannot read decodes the token alone.
        """
        cached = self._token_bytes.get(token)
        if cached is None:
            try:
                cached = bytes(self._grammar.tokens().decode_bytes([token]))
            except RequestError:
                cached = self.tokenizer.decode([token]).encode("utf-8")
            self._token_bytes[token] = cached
        return cached

    @property
    def ready(self) -> bool:
        """Whether the engine can serve; False for good once a fault proved sticky."""
        return self.failure is None

    @property
    def running(self) -> int:
        """Sequences holding a slot: those in the batch and a prompt being computed in chunks.

        The chunked prompt counts from its first chunk: a pass works on it, so the engine
        is busy (an autoscaler or a wait for idleness reading this gauge must see it).
        """
        return len(self._running) + (self._partial is not None)

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        with self._lock:
            return len(self._waiting)

    # Called from the driving thread only ------------------------------------------------

    def step(self) -> list[GenerationEvent]:
        """Admit waiting requests, then decode one token for every running sequence.

        Returns:
            One event per request that produced text or finished in this step.
        """
        # Everything that touches the cache runs in inference mode, cancellations included:
        # the buffer's rows are inference tensors, which may not be changed outside it.
        with torch.inference_mode():
            events = self._apply_cancellations()
            admitted = self._admit()
            if admitted or self._partial is not None:
                chunked = [self._partial] if self._partial is not None else []
                events += self._guarded([*admitted, *chunked], self._prefill, admitted)
            if self._running:
                events += self._guarded(list(self._running), self._decode)
        return events

    def _apply_cancellations(self) -> list[GenerationEvent]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            queued = [seq for seq in self._waiting if seq.request_id in cancelled]
            self._waiting = deque(seq for seq in self._waiting if seq.request_id not in cancelled)
        running = [seq for seq in self._running if seq.request_id in cancelled]
        if self._partial is not None and self._partial.request_id in cancelled:
            queued.append(self._partial)
            self._partial = None
        self._release(running)
        self._forget(queued)
        return [_final(seq, CANCELLED) for seq in queued + running]

    def _admit(self) -> list[_Sequence]:
        """Pop as many waiting requests as free slots and the prefill budget allow.

        The budget counts the prompt tokens that the pass computes: not those found in the
        prefix cache, nor a prompt identical to one admitted with it. Some prompts wait
        for the next step (the first in the queue never does): one whose uncached part is
        mostly blocks that a prompt admitted in this step is about to store, so that it
        finds them in the cache; and one that would make a pass of prompts found in the
        cache compute many more tokens in each row (a pass computes as many in every row).

        A prompt with more than ``prefill_chunk_tokens`` to compute becomes the one computed
        in chunks (:attr:`_partial`), which holds a slot but joins the batch only with its
        last chunk; one at a time: a second such prompt, or a copy of it, waits at the head
        of the queue (the copy then finds its blocks in the cache). Beside admitted prompts
        its chunk shrinks to their width, but not below a quarter of a chunk (see
        :meth:`_prefill`), which the budget counts.
        """
        admitted: list[_Sequence] = []
        chunk = self.prefill_chunk_tokens
        width = 0
        reusing = False
        prompts: set[tuple[int, ...]] = set()
        pending: set[bytes] = set()
        with self._lock:
            while self._waiting and len(self._running) + len(admitted) + \
                    (self._partial is not None) < self.max_sequences:
                seq = self._waiting[0]
                prompt = tuple(seq.prompt_ids)
                computed, shared, fresh = self._uncached(seq, prompt in prompts, pending)
                if admitted and shared >= DEFER_MIN_TOKENS and computed <= 2 * shared:
                    break
                if 0 < chunk < computed:
                    if self._partial is not None:
                        break
                    self._partial = seq
                    pending.update(fresh[: chunk // BLOCK_TOKENS])
                    # Not in ``prompts``: a copy of it is no copy to this pass, which computes
                    # one chunk of it; the copy waits and finds its blocks in the cache.
                    self._waiting.popleft()
                    continue
                if reusing and computed > 2 * width + BLOCK_TOKENS:
                    break
                rows = len(admitted) + 1 + (self._partial is not None)
                floor = _chunk_floor(chunk) if self._partial is not None else 0
                if admitted and max(width, computed, floor) * rows > self.max_prefill_tokens:
                    break
                reusing = reusing or computed < len(prompt)
                width = max(width, computed)
                prompts.add(prompt)
                pending.update(fresh[: computed // BLOCK_TOKENS])
                self._waiting.popleft()
                admitted.append(seq)
        return admitted

    def _uncached(
        self, seq: _Sequence, duplicate: bool, pending: set[bytes]
    ) -> tuple[int, int, list[bytes]]:
        """What a prefill of ``seq`` would compute, given the prefix cache.

        Returns:
            Prompt tokens to compute; of those, tokens in blocks that prompts admitted in
            this step will store (``pending``); the digests of the blocks it would store.
        """
        if self.prefix_cache is None:
            return len(seq.prompt_ids), 0, []
        if duplicate:
            return 0, 0, []
        keys = self._block_keys(seq)
        usable = self._usable_blocks(seq)
        held = self.prefix_cache.lookup(keys, usable)
        shared = 0
        for key in keys[held:usable]:
            if key.digest not in pending:
                break
            shared += 1
        size = self.prefix_cache.block_tokens
        return (len(seq.prompt_ids) - held * size, shared * size,
                [key.digest for key in keys[held:]])

    def _block_keys(self, seq: _Sequence) -> list[BlockKey]:
        if seq.blocks is None:
            assert self.prefix_cache is not None
            seq.blocks = block_keys(seq.prompt_ids, self.prefix_cache.block_tokens)
        return seq.blocks

    def _usable_blocks(self, seq: _Sequence) -> int:
        """Blocks a prompt may take from the cache: its last token is always computed, for
        the logits of the first generated token."""
        assert self.prefix_cache is not None
        return (len(seq.prompt_ids) - 1) // self.prefix_cache.block_tokens

    def _guarded(
        self,
        sequences: list[_Sequence],
        action: Callable[..., list[GenerationEvent]],
        *args: Any,
    ) -> list[GenerationEvent]:
        """Run a model pass; if it fails, end the sequences in it with an "error" event.

        A pass may fail midway, after some layers wrote their keys and values: those
        writes land in columns (decode) or rows (prefill) that no live sequence reads
        before they are written again, and ``end`` only moves after the model returns,
        so the sequences outside the pass keep a consistent cache and carry on. When
        the fault is the device's (a sticky CUDA error, or passes failing again and
        again whatever they hold), the engine fails for good: see :attr:`ready`.
        """
        try:
            events = action(*args)
        except Exception as error:  # reported to each affected request, not swallowed
            LOGGER.exception("generation step failed for %d sequences", len(sequences))
            running = [seq for seq in sequences if seq in self._running]
            if self._partial in sequences:
                self._partial = None
            self._release(running)
            self._forget([seq for seq in sequences if seq not in running])
            message = f"{type(error).__name__}: {error}"
            events = [_final(seq, ERROR, error=message) for seq in sequences]
            self._failed_steps += 1
            sticky = not self._device_works()
            if sticky or self._failed_steps >= MAX_FAILED_STEPS:
                events += self._fail(
                    f"the device failed ({message})" if sticky else
                    f"{self._failed_steps} model passes failed in a row; last: {message}"
                )
            return events
        self._failed_steps = 0
        return events

    def _device_works(self) -> bool:
        """Whether the device still runs work: a sticky CUDA error fails every later call."""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return bool((torch.ones(1, device=self.device) + 1).item() == 2)
        except Exception:
            return False

    def _fail(self, reason: str) -> list[GenerationEvent]:
        """Stop for good: end every request still queued or running, refuse new ones."""
        LOGGER.error("LLM engine failed; it reports not ready from now on: %s", reason)
        self.failure = reason
        with self._lock:
            leaving = [*self._running, *self._waiting]
            self._waiting.clear()
        if self._partial is not None:
            leaving.append(self._partial)
            self._partial = None
        self._running = []
        self._rows = None
        self._forget(leaving)
        return [_final(seq, ERROR, error=f"the engine failed: {reason}") for seq in leaving]

    def _prefill(self, admitted: list[_Sequence]) -> list[GenerationEvent]:
        """Run the new prompts as one left-padded batch into fresh rows; sample a first token.

        Each row's prompt ends at column ``end - 1``, as every running row does. The pass
        computes the last ``width`` tokens of each row, ``width`` being the longest part of
        a prompt not found in the prefix cache; the tokens before those are copied from the
        cache. A prompt identical to an earlier one in the batch is not computed at all: it
        takes a copy of that one's row and samples from its logits.

        A prompt computed in chunks (:attr:`_partial`) comes last, in the row after the
        others: the pass computes its next chunk after a copy of the part computed before,
        kept aside between passes; with its last chunk it joins the batch. Beside new
        prompts the chunk is no wider than they are, as every row computes as many tokens:
        four 40-token prompts beside a 512-token chunk would cost five 512-token rows. It
        still moves a quarter of a chunk, so that prompts found in the cache (a token or two
        each) arriving every step never hold it to a token a step.
        """
        first = len(self._running)
        partial = self._partial
        unique, copies, sources = self._distinct(admitted) if partial is None else \
            (admitted, [], list(range(len(admitted))))
        rows_in_pass = [*unique, *([partial] if partial is not None else [])]
        targets = [len(seq.prompt_ids) for seq in unique]
        known = [self._cached_tokens(seq) for seq in unique]
        if partial is not None:
            have = partial.done or self._cached_tokens(partial)
            chunk = self.prefill_chunk_tokens
            if unique:  # no wider than the prompts beside it: a pass pads every row to one
                widest = max(t - k for t, k in zip(targets, known, strict=True))
                chunk = min(chunk, max(widest, _chunk_floor(chunk)))
            targets.append(min(len(partial.prompt_ids), have + chunk))
            known.append(have)
        width = max(target - have for target, have in zip(targets, known, strict=True))
        span = max(targets)
        if not self._running:
            self._kv.start = self._kv.end = 0
        self._kv.make_room(first, span)
        end = self._kv.end
        reused = [self._reused(seq, target - width) if target > width else None
                  for seq, target in zip(rows_in_pass, targets, strict=True)]
        rows = (first, first + len(rows_in_pass))
        prompts, mask = self._pad_prompts(
            [seq.prompt_ids[:target] for seq, target in zip(rows_in_pass, targets, strict=True)],
            span)
        self._kv.tokens[rows[0] : rows[1], end - span : end] = prompts
        for row, (data, target) in enumerate(zip(reused, targets, strict=True)):
            if data is not None:
                self._kv.write_row(first + row, end - target, data)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, span - width :]
        self._kv.window = Window(rows=rows, read_from=end - span, write_at=end - width)
        logits = self._forward(prompts[:, span - width :], mask, positions)
        if not bool(mask.all()):
            self._kv.clear_padding(rows, mask)
        self._store_prefixes(rows_in_pass, targets, first, end)
        if partial is not None:
            if targets[-1] < len(partial.prompt_ids):  # more chunks to come
                partial.done = targets[-1]
                partial.computed = self._kv.read_row(rows[1] - 1, end - partial.done, end)
                logits = logits[:-1]
            else:
                unique.append(partial)
                partial.computed = None
                self._partial = None
        if copies:
            self._kv.copy_rows([first + source for source in sources[len(unique) :]],
                               list(range(first + len(unique), first + len(unique) +
                                          len(copies))), end - span)
            logits = logits.index_select(0, torch.tensor(sources, device=logits.device))
        admitted = unique + copies
        if not admitted:
            return []
        longest = max(len(seq.prompt_ids) for seq in admitted)
        self._kv.start = min(self._kv.start, end - longest) if self._running else end - longest
        for seq in admitted:
            seq.length = len(seq.prompt_ids)
        self._running.extend(admitted)
        self._rows = None
        return self._sample_and_emit(logits, (first, first + len(admitted)),
                                     _row_params(admitted, self.device))

    def _reused(self, seq: _Sequence, tokens: int) -> torch.Tensor:
        """Keys and values of a prompt's first ``tokens`` tokens, computed before: from the
        prompt's own row of the previous step (a chunked prompt), or from the prefix cache."""
        if seq.computed is not None and seq.done >= tokens:
            return seq.computed[:, :, :tokens]
        assert self.prefix_cache is not None
        return self.prefix_cache.fetch(self._block_keys(seq), tokens)

    def _distinct(
        self, admitted: list[_Sequence]
    ) -> tuple[list[_Sequence], list[_Sequence], list[int]]:
        """Split prompts into those to compute and copies of them (prefix caching on).

        Returns:
            The distinct prompts, the repeats, and for each of both, in that order, the
            index of the distinct prompt whose row and logits it takes.
        """
        if self.prefix_cache is None:
            return admitted, [], list(range(len(admitted)))
        index: dict[tuple[int, ...], int] = {}
        unique: list[_Sequence] = []
        copies: list[_Sequence] = []
        copy_sources: list[int] = []
        for seq in admitted:
            prompt = tuple(seq.prompt_ids)
            if prompt in index:
                copies.append(seq)
                copy_sources.append(index[prompt])
            else:
                index[prompt] = len(unique)
                unique.append(seq)
        return unique, copies, [*range(len(unique)), *copy_sources]

    def _cached_tokens(self, seq: _Sequence) -> int:
        """Leading prompt tokens whose keys and values the prefix cache holds."""
        if self.prefix_cache is None:
            return 0
        held = self.prefix_cache.lookup(self._block_keys(seq), self._usable_blocks(seq))
        return held * self.prefix_cache.block_tokens

    def _store_prefixes(
        self, sequences: list[_Sequence], lengths: list[int], first: int, end: int
    ) -> None:
        """Keep the whole blocks of the prompts just computed; a failure only loses them."""
        if self.prefix_cache is None:
            return
        kv = self._kv
        for row, (seq, size) in enumerate(zip(sequences, lengths, strict=True)):
            column = end - size

            def read(lo: int, hi: int, row: int = first + row, column: int = column
                     ) -> torch.Tensor:
                return kv.read_row(row, column + lo, column + hi)

            whole = size // self.prefix_cache.block_tokens
            try:
                self.prefix_cache.store(self._block_keys(seq)[:whole], read)
            except Exception:  # memory, say: the requests go on without it
                LOGGER.exception("could not keep a prompt's prefix; emptying the prefix cache")
                self.prefix_cache.clear()
                return

    def _decode(self) -> list[GenerationEvent]:
        """One token for every running sequence, in one forward pass."""
        count = len(self._running)
        self._kv.make_room(count, 0)
        if self._static is not None:
            self._pack_for_static(count)
        end = self._kv.end
        last = torch.tensor([seq.generated[-1] for seq in self._running], device=self.device)
        self._kv.tokens[:count, end] = last
        lengths = torch.tensor([seq.length for seq in self._running], device=self.device)
        logits = self._static_forward(last, lengths, end) if self._static else None
        if logits is None and self._lean is not None:
            logits = self._lean_forward(last, lengths, count, end)
        if logits is None:
            width = end - self._kv.start + 1
            columns = torch.arange(width, device=self.device)
            mask = columns[None, :] >= (width - 1 - lengths)[:, None]
            self._kv.window = Window(rows=(0, count), read_from=self._kv.start, write_at=end)
            logits = self._forward(last[:, None], mask, lengths[:, None])
        self._kv.end += 1
        for seq in self._running:
            seq.length += 1
        if self._rows is None:
            self._rows = _row_params(self._running, self.device)
        return self._sample_and_emit(logits, (0, count), self._rows)

    def _pack_for_static(self, count: int) -> None:
        """Move the live window to column 0 when that lets the step read a narrower bucket.

        The fixed-shape step reads columns 0..end; once the longest sequences have left,
        ``start`` moves right and those columns are dead. One copy of the window puts the
        step back into the width bucket of the sequences still running.
        """
        kv = self._kv
        if width_bucket(kv.end + 1, kv.capacity) > width_bucket(kv.end - kv.start + 1,
                                                                  kv.capacity):
            kv.pack_left(count)

    def _static_forward(
        self, last: torch.Tensor, lengths: torch.Tensor, end: int
    ) -> torch.Tensor | None:
        """The fixed-shape decode pass; None (and off from now on) if the model refuses it.

        A model whose forward pass cannot be recorded (a host synchronisation inside, say)
        falls back to the eager step, which writes the same cache column again.
        """
        assert self._static is not None
        try:
            return self._static.forward(last, lengths, end)
        except Exception:
            LOGGER.exception("fixed-shape decode failed; decoding eagerly from now on")
            self._static = None
            return None

    def _lean_forward(
        self, last: torch.Tensor, lengths: torch.Tensor, count: int, end: int
    ) -> torch.Tensor | None:
        """The lean decode pass; None (and off from now on) if it fails on this model.

        ``transformers``' pass then writes the same cache column again.
        """
        assert self._lean is not None
        try:
            return self._lean.forward(last, lengths, count, self._kv.start, end)
        except Exception:
            LOGGER.exception("lean decode step failed; decoding with transformers from now on")
            self._lean = None
            return None

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The model on the current window; the next-token logits of each row."""
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_keyword: self._cache},
            use_cache=True,
            logits_to_keep=1,
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    def _pad_prompts(
        self, prompts: list[list[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and their mask, built on the host and copied once."""
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = True
        return ids.to(self.device), mask.to(self.device)

    def _sample_and_emit(
        self, logits: torch.Tensor, rows: tuple[int, int], params: RowParams
    ) -> list[GenerationEvent]:
        """Pick the next token of rows ``lo..hi``, turn it into events, retire finished rows."""
        lo, hi = rows
        sequences = self._running[lo:hi]
        history, history_mask = self._history(sequences, lo) if params.penalised else (None, None)
        generators = [seq.generator for seq in sequences]
        constrained = [row for row, seq in enumerate(sequences) if seq.matcher is not None]
        allowed = (constrained, self._grammar.masks(
            [sequences[row].matcher for row in constrained], logits.shape[-1], logits.device)
        ) if constrained else None
        chosen = select_next_tokens(logits, params, generators, history, history_mask, allowed)
        tokens = chosen.tolist()
        asking = [row for row, seq in enumerate(sequences) if seq.logprobs is not None]
        entries = _logprobs(logits, chosen, tokens, asking, sequences) if asking else {}
        events: list[GenerationEvent] = []
        finished: list[_Sequence] = []
        for row, (seq, token) in enumerate(zip(sequences, tokens, strict=True)):
            if seq.logprobs is not None and int(token) not in self._eos:
                seq.logprobs.append(entries[row])
            try:
                event = self._advance(seq, int(token))
            except Exception as error:  # this sequence's text handling, not the batch's
                LOGGER.exception("request %r failed after its token", seq.request_id)
                event = _final(seq, ERROR, error=f"{type(error).__name__}: {error}")
            if event is not None:
                events.append(event)
                if event.finish_reason is not None:
                    finished.append(seq)
        self._release(finished)
        return events

    def _history(
        self, sequences: list[_Sequence], lo: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The recent tokens (``repeat_last_n``) of each row, for the repetition penalty."""
        spans = [seq.penalty_span for seq in sequences]
        width = max(spans, default=0)
        if width == 0:
            return None, None
        end = self._kv.end
        history = self._kv.tokens[lo : lo + len(sequences), end - width : end]
        span = torch.tensor(spans, device=self.device)
        mask = torch.arange(width, device=self.device)[None, :] >= (width - span)[:, None]
        return history, mask

    def _advance(self, seq: _Sequence, token: int) -> GenerationEvent | None:
        """Record one sampled token and decide whether the sequence is done."""
        seq.generated.append(token)
        params = seq.request.params
        reason: str | None = None
        text = ""
        if token in self._eos:
            reason = STOP
        else:
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                raise RuntimeError(f"the grammar refused token {token}: "
                                   f"{seq.matcher.get_error()[:300]}")
            unchecked = seq.watch is not None and not self._watch(seq, token)
            text = seq.stream.push(token)
            if seq.stream.stopped or unchecked:
                reason = STOP
            elif seq.matcher is not None and seq.matcher.is_stopped():
                reason = STOP  # the structured output is complete: nothing else may follow
            elif len(seq.generated) >= params.max_tokens:
                reason = LENGTH
            elif seq.total >= self.policy.max_context_tokens:
                reason = CONTEXT
        if reason is not None:
            text += seq.stream.finish()
        if not text and reason is None:
            return None
        return seq.event(text, reason)

    def _watch(self, seq: _Sequence, token: int) -> bool:
        """Under ``auto``: once the sampled token begins a call, hand the sequence to its
        grammar, fed the tokens that hold the call's start. False when they do not fit it
        (a token sampled freely ran past the start into something else): the sequence then
        ends there, so that no call is written that its grammar did not check."""
        assert seq.watch is not None
        watch, matcher = seq.watch
        back = watch.push(token, self.token_bytes(token))
        if back is None:
            return True
        seq.watch = None
        if back and not matcher.consume_tokens(seq.generated[-back:]):
            LOGGER.info("request %r: its call's start does not fit the grammar: %s",
                        seq.request_id, matcher.get_error()[:300])
            return False
        seq.matcher = matcher
        return True

    def _tool_policy(self, policy: GenerationPolicy) -> GenerationPolicy:
        """The policy with the template's tool format and the ids of the control tokens its
        grammar writes; ``fallback`` where the vocabulary lacks one of them."""
        tool_format = detect_tool_format(self._render)
        names = GRAMMAR_TOKENS.get(tool_format, ())
        ids = {name: i for i, name in self._controls(names).items()}
        if len(ids) < len(names):
            LOGGER.warning("the chat template writes tool calls in %s, but %s is not one token "
                           "of the vocabulary: tools use the fallback format", tool_format,
                           ", ".join(name for name in names if name not in ids))
            tool_format, ids = "fallback", {}
        return dataclasses.replace(policy, tool_format=tool_format,
                                   tool_tokens=tuple((name, ids[name]) for name in names
                                                     if name in ids))

    def _controls(self, names: Iterable[str]) -> dict[int, str]:
        """Control tokens this vocabulary has (as single tokens): id -> name."""
        ids = {}
        for name in names:
            token = self.tokenizer.convert_tokens_to_ids(name)
            if isinstance(token, int) and token != self.tokenizer.unk_token_id:
                ids[token] = name
        return ids

    def _release(self, leaving: Iterable[_Sequence]) -> None:
        """Drop sequences from the batch: move the last live rows into their places."""
        leaving = [seq for seq in leaving if seq in self._running]
        if not leaving:
            return
        gone = {id(seq) for seq in leaving}
        keep = len(self._running) - len(leaving)
        holes = [row for row, seq in enumerate(self._running[:keep]) if id(seq) in gone]
        movers = [
            row for row, seq in enumerate(self._running) if row >= keep and id(seq) not in gone
        ]
        self._kv.move_rows(movers, holes)
        order = list(self._running)
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = self._running[mover]
        self._running = order[:keep]
        self._rows = None
        longest = max((seq.length for seq in self._running), default=0)
        self._kv.start = self._kv.end - longest
        self._forget(leaving)

    def _forget(self, sequences: Iterable[_Sequence]) -> None:
        with self._lock:
            for seq in sequences:
                self._known.discard(seq.request_id)

    @staticmethod
    def _check_model(model: Any, tokenizer: Any, policy: GenerationPolicy) -> None:
        """Refuse a policy that the model cannot honour, at load rather than per request."""
        config = model.config.get_text_config()
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and policy.max_context_tokens > limit:
            raise ValueError(
                f"max_context_tokens {policy.max_context_tokens} exceeds the model's {limit}"
            )
        if policy.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the policy applies a chat template but the tokenizer has none")


def _allocate_cache(
    model: Any, policy: GenerationPolicy, max_sequences: int, device: torch.device
) -> KVBuffer:
    """The whole key/value cache, allocated at load so that what fits is known then.

    Raises:
        ValueError: naming maxSequences and maxContextLength when the cache does not fit.
    """
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next(model.parameters()).dtype
    shape = KVShape(config.num_hidden_layers, heads, head_dim, dtype)
    context = policy.max_context_tokens
    try:
        return KVBuffer(shape, max_sequences, context + max(64, context // 4), device)
    except MemoryError as error:
        raise ValueError(
            f"the key/value cache for maxSequences={max_sequences} x "
            f"maxContextLength={context} does not fit: it {error}; lower maxSequences "
            "or maxContextLength, or give the pod more memory"
        ) from None


def _chunk_floor(chunk: int) -> int:
    """The least a chunk moves beside new prompts: a quarter of a chunk, so that prompts
    found in the cache (a token or two to compute each) never hold it to a token a step."""
    return max(1, chunk // 4)


def _final(seq: _Sequence, reason: str, error: str | None = None) -> GenerationEvent:
    """The last event of a sequence that was stopped from outside."""
    text = "" if reason == ERROR else seq.stream.finish()
    return seq.event(text, reason, error)


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, tokens: list[int], rows: list[int],
              sequences: list[_Sequence]) -> dict[int, TokenLogprob]:
    """The entries of the rows that asked for log probabilities, computed for those rows only.

    ``logits`` are the model's own (the sampler works on copies): ``log_softmax`` in float32
    of the raw distribution, before penalty, temperature, top-k, top-p and grammar mask.
    """
    index = torch.tensor(rows, device=logits.device)
    logp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = logp.gather(1, chosen.index_select(0, index)[:, None]).squeeze(1).tolist()
    width = max(sequences[row].request.logprobs or 0 for row in rows)
    values, ids = (logp.topk(width, dim=-1) if width else (logp[:, :0], logp[:, :0].long()))
    values_list, ids_list = values.tolist(), ids.tolist()
    entries = {}
    for place, row in enumerate(rows):
        count = sequences[row].request.logprobs or 0
        top = tuple(zip(ids_list[place][:count], values_list[place][:count], strict=True))
        entries[row] = TokenLogprob(int(tokens[row]), picked[place], top)
    return entries


def _row_params(sequences: list[_Sequence], device: torch.device) -> RowParams:
    """The sampling parameters of these sequences, one row each, in order."""
    params = [seq.request.params for seq in sequences]
    return RowParams(
        [p.temperature for p in params],
        [p.top_k for p in params],
        [p.top_p for p in params],
        [p.repetition_penalty for p in params],
        device=device,
    )


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the generation config (which may list several)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(item) for item in value)
    return frozenset(ids)


def _model_device(model: Any) -> torch.device:
    return torch.device(next(model.parameters()).device)
