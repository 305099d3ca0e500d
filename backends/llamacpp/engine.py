"""One llama.cpp model and context decoding up to ``batch_size`` sequences together.

This is continuous batching over llama.cpp's public C API (through llama-cpp-python's ctypes
bindings): every step builds one ``llama_batch`` holding one new token per generating sequence
plus prompt tokens of newly admitted ones (each with its own ``seq_id``), runs one
``llama_decode`` for all of them, samples each sequence from its own logits, and frees a
finished sequence's KV cells so its slot takes the next prompt at once.

The KV cache is not unified (``kv_unified = False``): each sequence attends only to its own
cells, so its logits do not depend on what else is in the batch.

Runs inside a worker process (see `backends.llamacpp.worker`); imports llama_cpp at module level.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from backends.sampling import sample_token

__all__ = ["EngineItem", "EngineResult", "LlamaEngine", "silence_llama_logs"]


@dataclass
class EngineItem:
    """A prompt to generate for: its index in the workload and its text."""

    index: int
    text: str


@dataclass
class EngineResult:
    """What one sequence produced, with monotonic-clock timestamps (comparable across processes)."""

    index: int
    token_ids: list[int]
    text: str
    prompt_tokens: int
    start_s: float
    first_token_s: float | None
    end_s: float
    error: str | None = None
    prefill_tokens: int = 0  # prompt tokens decoded for it (the rest came from the slot's KV)
    cut: bool = False  # stopped by ``run``'s ``cut`` before it ended: its tokens so far


@dataclass
class _Sequence:
    item: EngineItem
    prompt: list[int]
    fed: int = 0  # prompt tokens already decoded (or reused from the slot's cache)
    reused: int = 0  # prompt tokens whose KV the slot kept from its previous sequence
    generated: list[int] = field(default_factory=list)
    start_s: float = 0.0
    first_token_s: float | None = None
    rng: np.random.Generator | None = None

    @property
    def position(self) -> int:
        return self.fed + len(self.generated)


_LOG_CALLBACK = None


def silence_llama_logs() -> None:
    """llama.cpp prints its load log to stderr; a trial's stderr must stay readable."""
    global _LOG_CALLBACK

    @llama_cpp.llama_log_callback
    def _ignore(level, text, user_data):  # noqa: ARG001
        return None

    _LOG_CALLBACK = _ignore  # keep a reference: ctypes must not free the callback
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


def _common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):  # stops at the shorter list
        if x != y:
            break
        count += 1
    return count


class LlamaEngine:
    """A loaded model with a context of ``batch_size`` sequence slots."""

    def __init__(
        self,
        model_path: str,
        *,
        threads: int,
        prefill_threads: int | None = None,
        batch_size: int,
        ctx_per_sequence: int,
        n_batch: int,
        workers: int = 1,
        gpu_layers: int = 0,
        extra_buffers: bool = True,
    ) -> None:
        silence_llama_logs()
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = True  # N workers share the GGUF's pages
        # Set always: the C default (-1) lets a CUDA build decide by itself. All is a number
        # above any layer count, as llama-cpp-python's Llama(n_gpu_layers=-1) passes it; the
        # layers split over the GPUs the worker sees (CUDA_VISIBLE_DEVICES).
        model_params.n_gpu_layers = 0x7FFFFFFF if gpu_layers == -1 else gpu_layers
        # The extra buffer types (AMX tiles, repacked q4_0/q4_1/q8_0): faster where the CPU
        # runs them, SIGILL where it advertises AMX but traps it (`backends.llamacpp.probe`).
        model_params.use_extra_bufts = extra_buffers
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.batch_size = batch_size
        self.ctx_per_sequence = ctx_per_sequence
        # Workers sharing the task queue: each step takes at most its share of its free slots,
        # so the first worker to wake cannot take every prompt while the others sit idle.
        self.workers = workers
        # One decode holds at most one token per generating sequence plus prompt chunks.
        self.batch_capacity = max(n_batch, batch_size)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = ctx_per_sequence * batch_size
        params.n_batch = self.batch_capacity
        params.n_ubatch = min(n_batch, self.batch_capacity)
        params.n_seq_max = batch_size
        params.n_threads = threads
        params.n_threads_batch = prefill_threads or threads
        params.kv_unified = False
        params.no_perf = True
        # Flash attention's online softmax rounds differently depending on how a prompt is
        # split across decode steps; with it off, greedy output at batch 16 equals batch 1
        # token for token (measured; at 32 sequences ggml's shape-dependent kernels can still
        # flip a near-tie).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.batch = llama_cpp.llama_batch_init(self.batch_capacity, 0, 1)
        # Tokens whose KV each slot still holds from its previous sequence. A new prompt
        # reuses the prefix it shares with them, but never more than distinct prompts share
        # (the chat template's system prompt): a prompt seen before in this slot is decoded
        # again, as a production run over unique prompts would, so a measurement that
        # repeats its prompts borrows no work.
        self.slot_cache: list[list[int]] = [[] for _ in range(batch_size)]
        self._shared_prefix: dict[bool, int] = {}
        template = llama_cpp.llama_model_chat_template(self.model, None)
        self.chat_template = template.decode() if template else None
        self._formatter: Any = None  # llama_cpp's Jinja2ChatFormatter, built when first used

    # ------------------------------------------------------------------ text <-> tokens

    def format_prompt(self, text: str, chat_template: bool) -> str:
        """The prompt text as the model sees it: the model's own chat template, if asked."""
        if not chat_template or not self.chat_template:
            return text
        if self._formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            eos = llama_cpp.llama_vocab_eos(self.vocab)
            bos = llama_cpp.llama_vocab_bos(self.vocab)
            self._formatter = Jinja2ChatFormatter(
                template=self.chat_template,
                eos_token=self.piece(eos, special=True).decode(errors="replace"),
                bos_token=self.piece(bos, special=True).decode(errors="replace")
                if bos >= 0
                else "",
            )
        return self._formatter(messages=[{"role": "user", "content": text}]).prompt

    def shared_prefix(self, chat_template: bool) -> int:
        """Tokens every formatted prompt starts with (the template's system prompt)."""
        if chat_template not in self._shared_prefix:
            a, b = (self.tokenize(self.format_prompt(t, chat_template)) for t in ("a", "b"))
            self._shared_prefix[chat_template] = _common_prefix(a, b)
        return self._shared_prefix[chat_template]

    def tokenize(self, text: str) -> list[int]:
        """Tokens of ``text``; special tokens written in it (<|im_start|>) are parsed."""
        data = text.encode()
        capacity = len(data) + 16
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buffer, capacity, self.add_bos, True
        )
        if count < 0:  # buffer too small: llama.cpp returns minus the size it needs
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buffer, capacity, self.add_bos, True
            )
        return list(buffer[:count])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for."""
        buffer = ctypes.create_string_buffer(64)
        length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -length, 0, special)
        return buffer.raw[:length]

    def detokenize(self, tokens: list[int]) -> str:
        """Text of generated tokens (special tokens left out)."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ generation

    def run(
        self,
        take: Callable[[bool], EngineItem | None],
        emit: Callable[[EngineResult], None],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        chat_template: bool = True,
        ignore_eos: bool = False,
        cut: Callable[[], bool] | None = None,
    ) -> None:
        """Generate until ``take`` has no more items and every slot is finished, or until
        ``cut()`` says to stop (checked before every decode step): then every running
        sequence and every item still to take is emitted at once, ``cut``, with the tokens it
        had.

        ``take(block)`` returns the next item or None. ``block`` is True only when every slot
        is idle, so a busy engine never waits for work; None from a blocking take means the
        work is over, None from a non-blocking one only that nothing is queued right now.
        ``emit`` receives each result as soon as its sequence ends. With ``ignore_eos`` every
        sequence generates exactly ``max_new_tokens`` (an end-of-sequence token is kept).
        """
        slots: list[_Sequence | None] = [None] * self.batch_size
        batch = self.batch
        wants_logits: list[tuple[int, int]] = []  # (slot, row in batch) of this step

        def add(token: int, position: int, slot: int, logits: bool) -> None:
            row = batch.n_tokens
            batch.token[row] = token
            batch.pos[row] = position
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = slot
            batch.logits[row] = logits
            batch.n_tokens = row + 1
            if logits:
                wants_logits.append((slot, row))

        while True:
            if cut is not None and cut():
                self._stop(slots, take, emit)
                return
            # Admit new prompts into free slots, at most this worker's share of them per step.
            free = sum(s is None for s in slots)
            allowance = -(-free // self.workers)
            for slot in range(self.batch_size):
                if slots[slot] is not None:
                    continue
                idle = all(s is None for s in slots)
                if allowance == 0 and not idle:
                    break
                allowance -= 1
                item = take(idle)
                if item is None:
                    if idle:
                        return  # a blocking take found no more work: the round is over
                    break  # nothing queued right now: keep decoding what is active
                sequence = self._admit(item, chat_template, max_new_tokens, seed)
                if isinstance(sequence, EngineResult):  # rejected: emit the error, keep going
                    emit(sequence)
                    continue
                # Keep the shared prefix's KV cells, drop the rest; at least the last prompt
                # token is decoded again, since its logits are needed.
                reuse = _common_prefix(self.slot_cache[slot], sequence.prompt)
                reuse = min(reuse, self.shared_prefix(chat_template), len(sequence.prompt) - 1)
                llama_cpp.llama_memory_seq_rm(self.memory, slot, reuse, -1)
                sequence.fed = sequence.reused = reuse
                slots[slot] = sequence
            if all(s is None for s in slots):
                continue  # every admitted item was rejected: take again (blocking)

            # One decode: a token for every generating sequence, then prompt chunks.
            batch.n_tokens = 0
            wants_logits.clear()
            for slot, seq in enumerate(slots):
                if seq is not None and seq.fed == len(seq.prompt):
                    add(seq.generated[-1], seq.position - 1, slot, True)
            for slot, seq in enumerate(slots):
                if seq is None or seq.fed == len(seq.prompt):
                    continue
                room = self.batch_capacity - batch.n_tokens
                if room <= 0:
                    break
                chunk = seq.prompt[seq.fed : seq.fed + room]
                for offset, token in enumerate(chunk):
                    last = seq.fed + offset == len(seq.prompt) - 1
                    add(token, seq.fed + offset, slot, last)
                seq.fed += len(chunk)

            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            now = time.monotonic()

            for slot, row in wants_logits:
                seq = slots[slot]
                pointer = llama_cpp.llama_get_logits_ith(self.ctx, row)
                logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
                token = sample_token(logits, temperature, top_p, seq.rng)
                if seq.first_token_s is None:
                    seq.first_token_s = now
                finished = not ignore_eos and llama_cpp.llama_vocab_is_eog(self.vocab, token)
                if not finished:
                    seq.generated.append(token)
                if finished or len(seq.generated) >= max_new_tokens:
                    emit(self._result(seq, now))
                    # Every token but a last one cut off by max_new_tokens was decoded.
                    fed = seq.generated if finished else seq.generated[:-1]
                    self.slot_cache[slot] = seq.prompt + fed
                    slots[slot] = None

    def _result(self, seq: _Sequence, now: float, cut: bool = False) -> EngineResult:
        """What ``seq`` produced, ending at ``now`` (``cut``: stopped before its end)."""
        return EngineResult(
            index=seq.item.index,
            token_ids=list(seq.generated),
            text=self.detokenize(seq.generated),
            prompt_tokens=len(seq.prompt),
            start_s=seq.start_s,
            first_token_s=seq.first_token_s,
            end_s=now,
            prefill_tokens=seq.fed - seq.reused,  # the whole prompt less the reused, once fed
            cut=cut,
        )

    def _stop(self, slots: list, take: Callable[[bool], EngineItem | None], emit) -> None:
        """`run`'s cut: each running sequence emitted with the tokens it has (its slot keeps
        the KV it decoded, for the next round's prefix), then each item left to take, with
        none, up to the round's end."""
        now = time.monotonic()
        for slot, seq in enumerate(slots):
            if seq is None:
                continue
            emit(self._result(seq, now, cut=True))
            # Decoded so far: the prompt's fed part, then every generated token but the last.
            fed = seq.prompt[: seq.fed]
            self.slot_cache[slot] = fed + seq.generated[:-1] if seq.fed == len(seq.prompt) else fed
            slots[slot] = None
        while (item := take(True)) is not None:
            emit(
                EngineResult(
                    index=item.index,
                    token_ids=[],
                    text="",
                    prompt_tokens=0,
                    start_s=now,
                    first_token_s=None,
                    end_s=now,
                    cut=True,
                )
            )

    # ------------------------------------------------------------------ scoring

    def score(
        self,
        text: str,
        answer: list[int],
        ids: list[list[int]] | None,
        *,
        k: int,
        chat_template: bool = True,
    ) -> tuple[list, list, list | None]:
        """Teacher forcing: decode ``text``'s prompt and then ``answer`` (whatever this model
        would have generated) in slot 0, with logits at every answer position; per position
        the top ``k`` (ids, log-probabilities) and the log-probabilities of ``ids[i]``
        (`backends.base.top_k_scores`). Prompt and answer go in chunks of the batch
        capacity, the prompt-processing path: one pass, not a decode step per token."""
        from backends.base import top_k_scores

        prompt = self.tokenize(self.format_prompt(text, chat_template))
        tokens = prompt + list(answer[:-1])
        first = len(prompt) - 1  # its logits predict answer[0]
        llama_cpp.llama_memory_seq_rm(self.memory, 0, 0, -1)
        self.slot_cache[0] = []
        batch, rows = self.batch, []
        top_ids, top_logprobs, asked = [], [], []
        for start in range(0, len(tokens), self.batch_capacity):
            chunk = tokens[start : start + self.batch_capacity]
            batch.n_tokens = len(chunk)
            rows.clear()
            for row, token in enumerate(chunk):
                position = start + row
                batch.token[row] = token
                batch.pos[row] = position
                batch.n_seq_id[row] = 1
                batch.seq_id[row][0] = 0
                batch.logits[row] = position >= first
                if position >= first:
                    rows.append((row, position - first))
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            for row, index in rows:
                pointer = llama_cpp.llama_get_logits_ith(self.ctx, row)
                logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))
                found = top_k_scores(logits, k, None if ids is None else ids[index])
                top_ids.append(found[0])
                top_logprobs.append(found[1])
                asked.append(found[2])
        self.slot_cache[0] = tokens
        return top_ids, top_logprobs, None if ids is None else asked

    def _admit(self, item: EngineItem, chat_template: bool, max_new_tokens: int, seed: int):
        start = time.monotonic()
        prompt = self.tokenize(self.format_prompt(item.text, chat_template))
        if len(prompt) + max_new_tokens > self.ctx_per_sequence:
            return EngineResult(
                index=item.index,
                token_ids=[],
                text="",
                prompt_tokens=len(prompt),
                start_s=start,
                first_token_s=None,
                end_s=time.monotonic(),
                error=(
                    f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceeds "
                    f"ctx_per_sequence {self.ctx_per_sequence}"
                ),
            )
        # A generator per request, seeded by its workload index: sampled output does not
        # depend on which worker or slot the request lands in.
        rng = np.random.default_rng([seed, item.index])
        return _Sequence(item=item, prompt=prompt, start_s=start, rng=rng)

    def answer(
        self, text: str, *, max_new_tokens: int, chat_template: bool, ignore_eos: bool = False
    ) -> EngineResult | None:
        """One prompt, greedy, alone: its result (None where the engine emitted none)."""
        items, results = [EngineItem(index=0, text=text)], []
        self.run(
            lambda block: items.pop() if items else None,
            results.append,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            ignore_eos=ignore_eos,
        )
        return results[0] if results else None

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None
