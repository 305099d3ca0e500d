"""One stage of the ``pipeline`` backend: a contiguous block of decoder layers on one rank,
and its part of the schedule (the loading is in ``pipeline_load``).

The schedule is a ring: stage 0 -> 1 -> ... -> last -> stage 0. Stage 0 batches the prompts
exactly as the hf backend does (length-sorted, ``batch_size`` per micro-batch), keeps
``stages + 1`` micro-batches in flight, and for each sends one step (the prefill, then one
token at a time) down the ring; the last stage samples and sends the tokens back. Sends are
asynchronous, so no stage ever waits on a send and the ring cannot deadlock; every receive is
bounded by the collective timeout and names the rank it waited on.

Message down the ring: a header ``[kind, micro-batch, rows, q_len, kv_len, prefill]`` then the
2-D attention mask, the position ids and the hidden states. Back to stage 0: a header and the
sampled tokens.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from autotune.config import TrialConfig
from backends.base import Completion
from backends.sampling import sample_token
from backends.torch.partition import StageCosts, balanced, format_boundaries
from backends.torch.pipeline_load import cached_profile, forward_stage, load_stage, positions_of

__all__ = ["Kind", "MicroBatch", "PipelineStage"]

_HEADER = 6


class Kind(IntEnum):
    """What a message down (or back up) the ring carries; the first value of its header."""

    STEP = 1  # run your layers on the hidden states that follow
    RELEASE = 2  # this micro-batch is done: drop its KV cache
    END = 3  # the round is over
    TOKENS = 4  # (last stage to stage 0) the sampled tokens that follow


@dataclass
class MicroBatch:
    """A micro-batch in flight at stage 0: its rows, what they generated, their timing."""

    mb: int
    members: list[int]  # indices of its prompts in the workload
    ids: object  # tensor (rows, tokens so far), left-padded
    mask: object  # tensor (rows, tokens so far)
    new: list[list[int]]  # generated tokens per row, end-of-sequence left out
    finished: list[bool]
    start: float
    arrivals: list[float] = field(default_factory=list)  # when each step's tokens came back


class PipelineStage:
    """This rank's stage: its layers, its KV caches (one per micro-batch in flight), its part
    of the ring schedule."""

    def __init__(self, ctx) -> None:
        import torch

        self.torch, self.ctx = torch, ctx
        spec = ctx.spec
        self.config = TrialConfig.from_dict(spec["config"])
        self.first, self.last = ctx.rank == 0, ctx.rank == ctx.world - 1
        self.next_rank, self.prev_rank = (ctx.rank + 1) % ctx.world, (ctx.rank - 1) % ctx.world
        ranges = spec["ranges"]
        self.info: dict = {}
        if ranges is None:  # compute strategy: rank 0 measures, everyone gets the split
            ranges = self._compute_partition(spec)
        self.ranges = [range(a, b) for a, b in ranges]
        self.info["boundaries"] = format_boundaries(self.ranges)
        self.model, self.model_config = load_stage(
            spec["model_dir"],
            self.ranges[ctx.rank],
            first=self.first,
            last=self.last,
            dtype=self.config.dtype,
            device=ctx.device,
        )
        self.dtype = getattr(torch, self.config.dtype)
        self.kv_cache = self.config.kv_cache
        self.caches: dict[int, object] = {}
        self.generators: dict[int, object] = {}
        self.pending_sends: list = []
        if self.first:
            from transformers import GenerationConfig

            from backends.torch.hf import load_tokenizer, stop_token_ids

            self.tokenizer = load_tokenizer(spec["model_dir"])
            self.stop_ids = stop_token_ids(
                self.tokenizer, GenerationConfig.from_model_config(self.model_config)
            )
            self.local_tokens: deque = deque()  # a one-stage pipeline hands tokens to itself

    # ------------------------------------------------------------ partition

    def _compute_partition(self, spec) -> list[list[int]]:
        import torch.distributed as dist

        box = [None]
        if self.first:
            profile = cached_profile(
                spec["model_dir"],
                dtype=self.config.dtype,
                threads=self.config.threads_per_worker,
                device=self.ctx.device,
                batch_size=self.config.batch_size,
            )
            costs = StageCosts(tuple(profile["layers"]), profile["first"], profile["last"])
            ranges = balanced(costs, self.ctx.world)
            box = [[[r.start, r.stop] for r in ranges]]
            self.info["profile"] = profile
        dist.broadcast_object_list(box, src=0, group=self.ctx.control)
        return box[0]

    # ------------------------------------------------------------ messages

    def _send(self, dst: int, *tensors) -> None:
        """Send tensors without waiting (the ring would deadlock on blocking sends)."""
        import torch.distributed as dist

        self.pending_sends = [(w, t) for w, t in self.pending_sends if not w.is_completed()]
        for tensor in tensors:
            if not self.ctx.nccl:
                tensor = tensor.cpu()  # gloo carries host tensors only
            tensor = tensor.contiguous()
            self.pending_sends.append((dist.isend(tensor, dst), tensor))

    def _recv(self, src: int, shape, dtype):
        import torch.distributed as dist

        tensor = self.torch.empty(shape, dtype=dtype, device=self._comm_device(dtype))
        try:
            dist.recv(tensor, src)
        except RuntimeError as error:
            from backends.torch.rank import peer_failure

            raise peer_failure(self.ctx, src, error) from None
        return tensor

    def _comm_device(self, dtype):
        # Hidden states travel on the stage's device where every stage has a GPU of its own
        # (nccl); headers, masks and token ids, and everything in a group with a CPU stage or
        # a shared GPU, through host memory (gloo).
        return self.ctx.device if dtype == self.dtype and self.ctx.nccl else "cpu"

    def _send_header(self, dst, *values) -> None:
        header = list(values) + [0] * (_HEADER - len(values))
        self._send(dst, self.torch.tensor(header, dtype=self.torch.int64))

    def _flush(self) -> None:
        for work, _ in self.pending_sends:
            work.wait()
        self.pending_sends = []

    # ------------------------------------------------------------ one step, any stage

    def _run_step(self, mb: int, prefill: bool, mask, positions, *, hidden=None, input_ids=None):
        """This stage's layers for one step of micro-batch ``mb``; pass it on down the ring."""
        torch = self.torch
        cache = None
        if self.kv_cache:
            if prefill:
                from transformers import DynamicCache

                self.caches[mb] = DynamicCache(config=self.model.config)
            cache = self.caches[mb]
        began = time.perf_counter()
        with torch.inference_mode():
            out = forward_stage(
                self.model,
                hidden=None if hidden is None else hidden.to(self.ctx.device),
                input_ids=None if input_ids is None else input_ids.to(self.ctx.device),
                mask=mask.to(self.ctx.device),
                positions=positions.to(self.ctx.device),
                cache=cache,
                last=self.last,
            )
        self.busy_s += time.perf_counter() - began
        if not self.last:
            rows, q_len = out.shape[0], out.shape[1]
            self._send_header(
                self.next_rank, Kind.STEP, mb, rows, q_len, mask.shape[1], int(prefill)
            )
            self._send(self.next_rank, mask.cpu(), positions.cpu(), out)
            return
        if prefill:
            self.generators[mb] = np.random.default_rng([self.settings.seed, mb])
        tokens = self._sample(out, mb)
        if self.first:
            self.local_tokens.append((mb, tokens))
        else:
            self._send_header(0, Kind.TOKENS, mb, tokens.shape[0])
            self._send(0, tokens)

    def _sample(self, logits, mb: int):
        """One token per row: greedy on the tensor, else the shared sampler with this
        micro-batch's generator."""
        settings = self.settings
        if settings.greedy:
            return logits.argmax(dim=-1).cpu()
        rows = logits.float().cpu().numpy()
        drawn = [
            sample_token(row, settings.temperature, settings.top_p, self.generators[mb])
            for row in rows
        ]
        return self.torch.tensor(drawn, dtype=self.torch.int64)

    def _release(self, mb: int) -> None:
        self.caches.pop(mb, None)
        self.generators.pop(mb, None)

    # ------------------------------------------------------------ a round

    def generate(self, prompts, settings):
        """Every stage takes part; stage 0 returns (completions in input order, stats)."""
        self.settings = settings
        self.busy_s = 0.0  # this stage's compute time in the round (the report's per-stage time)
        if self.first:
            return self._lead(prompts, settings)
        self._follow()
        return None

    def _follow(self) -> None:
        """Stages after the first: receive, run, pass on, until the end of the round."""
        torch = self.torch
        while True:
            kind, mb, rows, q_len, kv_len, prefill = (
                int(x) for x in self._recv(self.prev_rank, (_HEADER,), torch.int64)
            )
            if kind in (Kind.END, Kind.RELEASE):
                self._release(mb)
                if not self.last:
                    self._send_header(self.next_rank, kind, mb)
                if kind == Kind.END:
                    self._flush()
                    from backends.torch.rank import send_object

                    send_object(self.busy_s, 0)
                    return
                continue
            mask = self._recv(self.prev_rank, (rows, kv_len), torch.int64)
            positions = self._recv(self.prev_rank, (rows, q_len), torch.int64)
            hidden = self._recv(
                self.prev_rank, (rows, q_len, self.model_config.hidden_size), self.dtype
            )
            self._run_step(mb, bool(prefill), mask, positions, hidden=hidden)

    def _lead(self, prompts, settings):
        """Stage 0: micro-batches in, steps down the ring, tokens back, completions out."""
        from backends.torch.hf import length_sorted_batches, prompt_token_ids

        torch = self.torch
        pad = self.tokenizer.pad_token_id
        ids = [prompt_token_ids(self.tokenizer, p.text, settings.chat_template) for p in prompts]
        batches = length_sorted_batches([len(x) for x in ids], self.config.batch_size)
        waiting = deque(enumerate(batches))
        in_flight = self.ctx.world + 1  # at least one per stage, plus one so stage 0 never idles
        active: dict[int, MicroBatch] = {}
        results: list[Completion | None] = [None] * len(prompts)
        step_gaps: list[float] = []
        steps = 0

        def step(state, prefill: bool) -> None:
            nonlocal steps
            steps += 1
            if self.kv_cache and not prefill:
                # Only the newest token goes down the ring; the caches hold the rest.
                input_ids = state.ids[:, -1:]
                positions = positions_of(state.mask)[:, -1:]
            else:
                input_ids, positions = state.ids, positions_of(state.mask)
            self._run_step(state.mb, prefill, state.mask, positions, input_ids=input_ids)

        def admit() -> None:
            mb, members = waiting.popleft()
            width = max(len(ids[i]) for i in members)
            rows = [[pad] * (width - len(ids[i])) + ids[i] for i in members]
            mask = [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in members]
            state = MicroBatch(
                mb=mb,
                members=members,
                ids=torch.tensor(rows, dtype=torch.int64),
                mask=torch.tensor(mask, dtype=torch.int64),
                new=[[] for _ in members],
                finished=[False] * len(members),
                start=time.monotonic(),
            )
            active[mb] = state
            step(state, prefill=True)

        for _ in range(min(in_flight, len(waiting))):
            admit()
        while active:
            if self.local_tokens:
                mb, tokens = self.local_tokens.popleft()
            else:
                header = self._recv(self.prev_rank, (_HEADER,), torch.int64)
                _, mb, rows = (int(x) for x in header[:3])
                tokens = self._recv(self.prev_rank, (rows,), torch.int64)
            state = active[mb]
            state.arrivals.append(time.monotonic())
            tokens = tokens.tolist()
            for row, token in enumerate(tokens):
                if state.finished[row]:
                    tokens[row] = pad  # as generate() does for rows already done
                elif token in self.stop_ids and not settings.ignore_eos:
                    state.finished[row] = True
                else:
                    state.new[row].append(token)
            column = torch.tensor(tokens, dtype=torch.int64)[:, None]
            state.ids = torch.cat([state.ids, column], dim=1)
            state.mask = torch.cat([state.mask, torch.ones_like(column)], dim=1)
            if all(state.finished) or len(state.arrivals) >= settings.max_new_tokens:
                self._finish(state, prompts, ids, results, step_gaps)
                del active[mb]
                self._release(mb)
                if self.ctx.world > 1:
                    self._send_header(self.next_rank, Kind.RELEASE, mb)
                if waiting:
                    admit()
            else:
                step(state, prefill=False)
        busy = [self.busy_s]
        if self.ctx.world > 1:
            from backends.torch.rank import recv_object

            self._send_header(self.next_rank, Kind.END, -1)
            self._flush()
            busy += [recv_object(rank, self.ctx) for rank in range(1, self.ctx.world)]
        stats = {
            "steps": steps,
            "decode_step_s": sum(step_gaps) / len(step_gaps) if step_gaps else None,
            "stage_busy_s": busy,
        }
        return results, stats

    # ------------------------------------------------------------ scoring

    def score(self, requests, settings, k: int):
        """Teacher forcing down the stages, one request at a time (every stage has the same
        requests): stage 0 embeds the prompt and the answer, each stage runs its layers
        without a cache and passes the hidden states on, the last scores every answer
        position (`backends.base.top_k_scores`) and sends them to stage 0, which returns
        them as `TokenScores`."""
        from backends.base import TokenScores, top_k_scores
        from backends.torch.rank import recv_object, send_object

        torch = self.torch
        results = []
        for request in requests:
            tokens = None
            if self.first:
                from backends.torch.hf import prompt_token_ids

                prompt = prompt_token_ids(self.tokenizer, request.text, settings.chat_template)
                tokens = torch.tensor([prompt + list(request.answer[:-1])], dtype=torch.int64)
                start, length, hidden = len(prompt) - 1, tokens.shape[1], None
            else:
                start, length = (int(x) for x in self._recv(self.prev_rank, (2,), torch.int64))
                hidden = self._recv(
                    self.prev_rank, (1, length, self.model_config.hidden_size), self.dtype
                )
            mask = torch.ones((1, length), dtype=torch.int64)
            with torch.inference_mode():
                out = forward_stage(
                    self.model,
                    hidden=None if hidden is None else hidden.to(self.ctx.device),
                    input_ids=None if tokens is None else tokens.to(self.ctx.device),
                    mask=mask.to(self.ctx.device),
                    positions=positions_of(mask).to(self.ctx.device),
                    cache=None,
                    last=False,
                )
                if self.last:
                    logits = self.model.lm_head(out[0, start:]).float().cpu().numpy()
            if not self.last:
                self._send(self.next_rank, torch.tensor([start, length], dtype=torch.int64), out)
                scored = recv_object(self.ctx.world - 1, self.ctx) if self.first else None
            else:
                asked = request.ids
                scored = [
                    top_k_scores(row, k, None if asked is None else asked[index])
                    for index, row in enumerate(logits)
                ]
                if not self.first:
                    send_object(scored, 0)
            if self.first:
                rows = ([s[0] for s in scored], [s[1] for s in scored], [s[2] for s in scored])
                asked = None if request.ids is None else rows[2]
                results.append(TokenScores.of(request.id, (rows[0], rows[1], asked)))
        self._flush()
        return results if self.first else None

    def _finish(self, state: MicroBatch, prompts, ids, results, step_gaps) -> None:
        arrivals, start = state.arrivals, state.start
        step_gaps.extend(b - a for a, b in itertools.pairwise(arrivals))
        for row, index in enumerate(state.members):
            tokens = state.new[row]
            results[index] = Completion(
                id=prompts[index].id,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=tuple(tokens),
                prompt_tokens=len(ids[index]),
                worker_rank=0,
                latency_s=arrivals[-1] - start,
                ttft_s=arrivals[0] - start,
                prefill_tokens=len(ids[index]),
                finished_at=arrivals[-1],
            )
