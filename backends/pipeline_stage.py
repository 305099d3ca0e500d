"""One stage of the ``pipeline`` backend: a contiguous block of decoder layers on one rank.

Each stage builds the model's skeleton on the meta device (no memory), then loads from the
safetensors files only the tensors it owns: stage 0 the embeddings, every stage its layers
(renumbered from 0, so its KV cache is a cache of its own layers), the last stage the final
norm and the LM head. The layers run through the model class's own ``forward`` (masks, rotary
positions, attention), which is what makes the split bit-for-bit the single-process model.

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

import hashlib
import itertools
import json
import platform
import time
from collections import deque
from pathlib import Path

from autotune.config import TrialConfig
from backends.base import Completion
from backends.partition import StageCosts, balanced, format_boundaries

__all__ = ["PipelineStage", "load_stage", "measure_profile"]

STEP, RELEASE, END, TOKENS = 1, 2, 3, 4
_HEADER = 6
_PROFILE_PROMPT = 64  # tokens of the prefill the compute profile times
_PROFILE_STEPS = 16  # decode steps it times


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def load_stage(model_dir: str, layers: range, *, first: bool, last: bool, dtype: str, device: str):
    """The model with only this stage's weights loaded; returns (model, full config)."""
    import copy

    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    local = copy.deepcopy(config)
    local.num_hidden_layers = len(layers)
    if getattr(local, "layer_types", None):
        local.layer_types = [config.layer_types[i] for i in layers]
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(local, dtype=torch_dtype)
    state, embed = {}, None
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                layer = _layer_of(key)
                if layer is not None:
                    if layer in layers:
                        renamed = f"model.layers.{layer - layers.start}.{key.split('.', 3)[3]}"
                        state[renamed] = weights.get_tensor(key)
                elif key.startswith("model.embed_tokens."):
                    embed = weights.get_tensor(key)
                    if first:
                        state[key] = embed
                elif key.startswith(("model.norm.", "lm_head.")) and last:
                    state[key] = weights.get_tensor(key)
    if last and "lm_head.weight" not in state:
        state["lm_head.weight"] = embed  # tied embeddings: the head is the embedding matrix
    state = {k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if last:
        # assign=True replaced embed_tokens' parameter; make sure the head has its own real one.
        model.lm_head.weight = torch.nn.Parameter(state["lm_head.weight"], requires_grad=False)
    if not last:
        model.model.norm = torch.nn.Identity()  # the final norm belongs to the last stage
    with torch.device(device):
        # Buffers computed in __init__ (rotary frequencies) were made on meta; make them real.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=local)
    owned = [*model.model.layers.parameters(), *model.model.rotary_emb.buffers()]
    if first:
        owned += list(model.model.embed_tokens.parameters())
    if last:
        owned += [*model.model.norm.parameters(), *model.lm_head.parameters()]
    missing = sum(t.is_meta for t in owned)
    if missing:
        raise RuntimeError(f"stage with layers {layers}: {missing} of its tensors were not loaded")
    model.eval()
    return model, config


def _forward(model, *, hidden=None, input_ids=None, mask, positions, cache, last: bool):
    """Run this stage's layers; the last stage returns float32 logits of each row's last
    position, the others the hidden states."""
    if input_ids is not None:
        hidden = model.model.embed_tokens(input_ids)
    out = model.model(
        inputs_embeds=hidden,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
    ).last_hidden_state
    if last:
        # As generate() does (logits_to_keep=1): the head on the last position only.
        return model.lm_head(out[:, -1:, :])[:, -1, :].float()
    return out


def _positions(mask):
    """Position ids from the 2-D mask, as transformers' generate() makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _sample(logits, settings, generator):
    """Greedy when temperature is 0, else temperature + top-p with this micro-batch's RNG."""
    import torch

    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > settings.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def measure_profile(model_dir: str, *, dtype: str, device: str, batch_size: int) -> dict:
    """Seconds spent in each decoder layer, the embeddings and the head, for one prefill of
    `_PROFILE_PROMPT` tokens and `_PROFILE_STEPS` decode steps of ``batch_size`` rows."""
    import torch
    from transformers import AutoConfig, DynamicCache

    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    model, _ = load_stage(
        model_dir, range(layers), first=True, last=True, dtype=dtype, device=device
    )
    spent = {"first": 0.0, "last": 0.0, "layers": [0.0] * layers}
    began = {}

    def timer(name, index=None):
        def pre(*_):
            began[name, index] = time.perf_counter()

        def post(*_):
            took = time.perf_counter() - began[name, index]
            if index is None:
                spent[name] += took
            else:
                spent[name][index] += took

        return pre, post

    handles = []
    watched = [(model.model.embed_tokens, "first", None), (model.lm_head, "last", None)]
    watched += [(layer, "layers", i) for i, layer in enumerate(model.model.layers)]
    for module, name, index in watched:
        pre, post = timer(name, index)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, _PROFILE_PROMPT)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
    with torch.inference_mode():
        for measured in (False, True):  # the first pass warms up, the second is kept
            if measured:
                spent.update(first=0.0, last=0.0, layers=[0.0] * layers)
            mask = torch.ones_like(ids)
            cache = DynamicCache(config=model.config)
            token = ids
            for _ in range(_PROFILE_STEPS + 1):
                logits = _forward(
                    model,
                    input_ids=token.to(device),
                    mask=mask.to(device),
                    positions=_positions(mask)[:, -token.shape[1] :].to(device),
                    cache=cache,
                    last=True,
                )
                token = logits.argmax(-1, keepdim=True).cpu()
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    for handle in handles:
        handle.remove()
    return spent


def _profile_path(model_dir: str, dtype: str, threads: int, batch_size: int) -> Path:
    import torch

    from autotune.models import cache_root

    config_text = (Path(model_dir) / "config.json").read_text()
    key = json.dumps(
        [
            str(Path(model_dir).resolve()),
            config_text,
            dtype,
            threads,
            batch_size,
            torch.__version__,
            platform.machine(),
            platform.processor(),
        ]
    )
    return cache_root() / "profiles" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


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

            from backends.hf import load_tokenizer, stop_token_ids

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
            path = _profile_path(
                spec["model_dir"],
                self.config.dtype,
                self.config.threads_per_worker,
                self.config.batch_size,
            )
            if path.exists():
                profile = json.loads(path.read_text())
            else:
                profile = measure_profile(
                    spec["model_dir"],
                    dtype=self.config.dtype,
                    device=self.ctx.device,
                    batch_size=self.config.batch_size,
                )
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(".partial")
                partial.write_text(json.dumps(profile))
                partial.replace(path)
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
            tensor = tensor.contiguous()
            self.pending_sends.append((dist.isend(tensor, dst), tensor))

    def _recv(self, src: int, shape, dtype):
        import torch.distributed as dist

        tensor = self.torch.empty(shape, dtype=dtype, device=self._comm_device(dtype))
        try:
            dist.recv(tensor, src)
        except RuntimeError as error:
            from backends.torch_rank import peer_failure

            raise peer_failure(self.ctx, src, error) from None
        return tensor

    def _comm_device(self, dtype):
        # Hidden states travel on the stage's device (nccl between GPUs); headers, masks and
        # token ids on the CPU (gloo).
        return self.ctx.device if dtype == self.dtype else "cpu"

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
            out = _forward(
                self.model,
                hidden=hidden,
                input_ids=None if input_ids is None else input_ids.to(self.ctx.device),
                mask=mask.to(self.ctx.device),
                positions=positions.to(self.ctx.device),
                cache=cache,
                last=self.last,
            )
        self.busy_s += time.perf_counter() - began
        if not self.last:
            rows, q_len = out.shape[0], out.shape[1]
            self._send_header(self.next_rank, STEP, mb, rows, q_len, mask.shape[1], int(prefill))
            self._send(self.next_rank, mask.cpu(), positions.cpu(), out)
            return
        if prefill:
            generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + mb)
            self.generators[mb] = generator
        tokens = _sample(out.cpu(), self.settings, self.generators[mb])
        if self.first:
            self.local_tokens.append((mb, tokens))
        else:
            self._send_header(0, TOKENS, mb, tokens.shape[0])
            self._send(0, tokens)

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
            if kind == END or kind == RELEASE:
                self._release(mb)
                if not self.last:
                    self._send_header(self.next_rank, kind, mb)
                if kind == END:
                    self._flush()
                    from backends.torch_rank import send_object

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
        from backends.hf import length_sorted_batches, prompt_token_ids

        torch = self.torch
        pad = self.tokenizer.pad_token_id
        ids = [prompt_token_ids(self.tokenizer, p.text, settings.chat_template) for p in prompts]
        batches = length_sorted_batches([len(x) for x in ids], self.config.batch_size)
        waiting = deque(enumerate(batches))
        in_flight = self.ctx.world + 1  # at least one per stage, plus one so stage 0 never idles
        active: dict[int, dict] = {}
        results: list[Completion | None] = [None] * len(prompts)
        step_gaps: list[float] = []
        steps = 0

        def step(state, prefill: bool) -> None:
            nonlocal steps
            steps += 1
            if self.kv_cache and not prefill:
                # Only the newest token goes down the ring; the caches hold the rest.
                input_ids = state["ids"][:, -1:]
                positions = _positions(state["mask"])[:, -1:]
            else:
                input_ids, positions = state["ids"], _positions(state["mask"])
            self._run_step(state["mb"], prefill, state["mask"], positions, input_ids=input_ids)

        def admit() -> None:
            mb, members = waiting.popleft()
            width = max(len(ids[i]) for i in members)
            rows = [[pad] * (width - len(ids[i])) + ids[i] for i in members]
            mask = [[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in members]
            state = {
                "mb": mb,
                "members": members,
                "ids": torch.tensor(rows, dtype=torch.int64),
                "mask": torch.tensor(mask, dtype=torch.int64),
                "new": [[] for _ in members],
                "finished": [False] * len(members),
                "start": time.monotonic(),
                "arrivals": [],
            }
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
            state["arrivals"].append(time.monotonic())
            tokens = tokens.tolist()
            for row, token in enumerate(tokens):
                if state["finished"][row]:
                    tokens[row] = pad  # as generate() does for rows already done
                elif token in self.stop_ids:
                    state["finished"][row] = True
                else:
                    state["new"][row].append(token)
            column = torch.tensor(tokens, dtype=torch.int64)[:, None]
            state["ids"] = torch.cat([state["ids"], column], dim=1)
            state["mask"] = torch.cat([state["mask"], torch.ones_like(column)], dim=1)
            if all(state["finished"]) or len(state["arrivals"]) >= settings.max_new_tokens:
                self._finish(state, prompts, ids, results, step_gaps)
                del active[mb]
                self._release(mb)
                if self.ctx.world > 1:
                    self._send_header(self.next_rank, RELEASE, mb)
                if waiting:
                    admit()
            else:
                step(state, prefill=False)
        busy = [self.busy_s]
        if self.ctx.world > 1:
            from backends.torch_rank import recv_object

            self._send_header(self.next_rank, END, -1)
            self._flush()
            busy += [recv_object(rank, self.ctx) for rank in range(1, self.ctx.world)]
        stats = {
            "steps": steps,
            "decode_step_s": sum(step_gaps) / len(step_gaps) if step_gaps else None,
            "stage_busy_s": busy,
        }
        return results, stats

    def _finish(self, state, prompts, ids, results, step_gaps) -> None:
        arrivals, start = state["arrivals"], state["start"]
        step_gaps.extend(b - a for a, b in itertools.pairwise(arrivals))
        for row, index in enumerate(state["members"]):
            tokens = state["new"][row]
            results[index] = Completion(
                id=prompts[index].id,
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=tuple(tokens),
                prompt_tokens=len(ids[index]),
                worker_rank=0,
                latency_s=arrivals[-1] - start,
                ttft_s=arrivals[0] - start,
            )
