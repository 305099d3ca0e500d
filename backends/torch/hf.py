"""The ``hf`` backend: one process, one transformers model, ``generate`` on padded batches.

Seed 000's recipe: load once, format each prompt with the chat template, left-pad batches of
``batch_size`` prompts, decode only the new tokens. The workload is sorted by prompt length
before batching (less padding) and the input order restored afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from autotune.errors import BackendError, ConfigError
from autotune.knobs import BackendSpace, Knob, Target
from autotune.models import hf_dir
from autotune.placement import default_placement
from autotune.workload import GenerationSettings, Prompt
from backends.base import (
    Backend,
    Completion,
    ScoreRequest,
    SpeedTerms,
    TokenScores,
    gpu_threads,
    threads_knob,
)

__all__ = [
    "DTYPE_BYTES",
    "HFBackend",
    "TransformersEngine",
    "generate_in_batches",
    "length_sorted_batches",
    "load_tokenizer",
    "prompt_token_ids",
    "stop_token_ids",
    "torch_dtypes",
    "torch_memory_bytes",
    "torch_speed_terms",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def torch_dtypes(target: Target) -> tuple[str, ...]:
    """float32, and bfloat16 where the machine computes it natively (AVX512-BF16, AMX); on a
    GPU host float16 too (a CPU's float16 matmuls are slow, so not offered there)."""
    flags = set(target.topology.cpu_flags)
    if target.gpus:
        return ("float32", "bfloat16", "float16")
    if flags & {"avx512_bf16", "amx_bf16"}:
        return ("float32", "bfloat16")
    return ("float32",)


# Torch on a CPU runs eager kernels in fp32/bf16: measured on 2 vCPUs at 0.2-0.7x llama.cpp.
_CPU_SPEED = 0.35


def torch_speed_terms(config, shape, *, gpu_launch_s: float, **more) -> SpeedTerms:
    """The speed model's terms of a torch layout (`Backend.speed_terms`): the weights at the
    dtype, eager kernels at `_CPU_SPEED` of llama.cpp's on a CPU, ``gpu_launch_s`` per layer
    and step on a GPU (eager transformers is launch-bound on small models), fp32 without
    tensor cores; ``more``: the layout's own terms (a pipeline's stage shares)."""
    return SpeedTerms(
        weight_bytes=shape.parameters * DTYPE_BYTES[config.dtype],
        cpu_cost=1.0 / _CPU_SPEED,
        gpu_launch_s=gpu_launch_s,
        fp32_on_gpu=config.dtype == "float32",
        **more,
    )


def torch_memory_bytes(config, shape, *, weight_copies: float, kv_copies: int) -> float:
    """Weights and KV cache of a torch layout: ``weight_copies`` of the weights at the dtype,
    ``kv_copies`` batches of KV cache (a factor 2 on the cache covers the activations)."""
    width = DTYPE_BYTES[config.dtype]
    weights = shape.parameters * width * weight_copies
    kv = shape.kv_bytes_per_token(width) * config.ctx_per_sequence * config.batch_size * 2
    return weights + kv * kv_copies


class TransformersEngine:
    """A loaded transformers causal LM and tokenizer that generate for batches of prompts.

    Shared by every torch backend that runs whole models (hf, and each DDP rank).
    """

    def __init__(self, directory: str, *, dtype: str, threads: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as transformers_logging

        from autotune.placement import parse_placement

        transformers_logging.disable_progress_bar()  # keep a run's stderr for what matters
        torch.set_num_threads(threads)
        self.torch = torch
        (place,) = parse_placement(device)
        self.gpus = place.gpus
        self.device = place.torch  # where the inputs go: the CPU or the (first) GPU
        self.tokenizer = load_tokenizer(directory)
        kwargs: dict = {"dtype": getattr(torch, dtype)}
        if len(place.gpus) > 1:
            # A block of GPUs (seed 003: gpus // workers each): the layers spread over them.
            kwargs["device_map"] = "auto"
            kwargs["max_memory"] = {
                g: torch.cuda.get_device_properties(g).total_memory for g in place.gpus
            }
        self.model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        if len(place.gpus) <= 1:
            self.model.to(self.device)
        self.model.eval()
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.first_token_s: float | None = None  # of the last batch, time.monotonic()

    def prompt_ids(self, text: str, chat_template: bool) -> list[int]:
        """Token ids of one prompt as the model sees it."""
        return prompt_token_ids(self.tokenizer, text, chat_template)

    def generate_batch(
        self, batch_ids: list[list[int]], settings: GenerationSettings
    ) -> list[tuple[list[int], str]]:
        """Generate for prompts given as token ids; (new token ids, text) per prompt."""
        torch = self.torch
        width = max(len(ids) for ids in batch_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids])
        kwargs = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad}
        if settings.ignore_eos:
            kwargs["min_new_tokens"] = settings.max_new_tokens  # EOS is masked until then
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            torch.manual_seed(settings.seed)
            kwargs.update(
                do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None
            )
        first_token = _FirstToken(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                streamer=first_token,
                **kwargs,
            )
        self.first_token_s = first_token.at
        results = []
        for row in output[:, width:].tolist():
            tokens = []
            for token in row:
                if token in self.stop_ids and not settings.ignore_eos:
                    break
                tokens.append(token)
            results.append((tokens, self.tokenizer.decode(tokens, skip_special_tokens=True)))
        return results

    def score(
        self, text: str, answer: Sequence[int], ids, *, k: int, chat_template: bool
    ) -> tuple[list, list, list | None]:
        """Teacher forcing: one forward of ``text``'s prompt and ``answer`` (but its last
        token); per answer position, the top ``k`` (ids, log-probabilities) and the
        log-probabilities of ``ids[i]`` (`backends.base.top_k_scores`)."""
        from backends.base import top_k_scores

        torch = self.torch
        prompt = self.prompt_ids(text, chat_template)
        tokens = torch.tensor([prompt + list(answer[:-1])], device=self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=tokens).logits[0, len(prompt) - 1 :]
        rows = logits.float().cpu().numpy()
        found = [
            top_k_scores(row, k, None if ids is None else ids[index])
            for index, row in enumerate(rows)
        ]
        asked = None if ids is None else [f[2] for f in found]
        return [f[0] for f in found], [f[1] for f in found], asked

    def score_all(self, requests, settings: GenerationSettings, k: int) -> list[TokenScores]:
        """`score` each of ``requests`` (`backends.base.ScoreRequest`), in order."""
        return [
            TokenScores.of(
                r.id, self.score(r.text, r.answer, r.ids, k=k, chat_template=settings.chat_template)
            )
            for r in requests
        ]


class _FirstToken:
    """A generate() streamer that notes when the first new token exists (time.monotonic()):
    generate() calls ``put`` once with the prompt, then once per step. Works for any batch
    size (transformers' text streamers take one row only)."""

    def __init__(self, device: str) -> None:
        self.device, self.calls, self.at = device, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            if str(self.device).startswith("cuda"):
                import torch

                torch.cuda.synchronize()  # the token exists once the GPU has computed it
            self.at = time.monotonic()

    def end(self) -> None:
        pass


def load_tokenizer(directory: str):
    """The model's tokenizer, left-padding, with a pad token (the EOS token if it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_token_ids(tokenizer, text: str, chat_template: bool) -> list[int]:
    """Token ids of one prompt as the model sees it (chat template applied if asked and known)."""
    if chat_template and tokenizer.chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def stop_token_ids(tokenizer, generation_config) -> set[int]:
    """Every token that ends a sequence: the generation config's EOS ids and the tokenizer's."""
    value = generation_config.eos_token_id
    ids = set(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    ids.add(tokenizer.eos_token_id)
    return ids


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of prompts of similar length (less padding), shortest first.

    Every torch backend batches this way, so they all see the same batches for one workload.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class HFBackend(Backend):
    """transformers batching in this process."""

    name = "hf"
    reads = frozenset({"dtype", "placement"})
    first_guess_load_s = 8.0
    first_guess_tokens_per_s = 25.0
    answer_family = "torch"
    continuous_batching = False  # static batches: each starts from empty
    baseline_rank = 1

    @classmethod
    def space(cls, target: Target) -> BackendSpace:
        on_gpu = (lambda chosen: True) if target.gpus else None  # it runs on cuda:0 there
        return BackendSpace(
            cls.name,
            (
                threads_knob(target.cpus, None, on_gpu),
                Knob("batch_size", target.batch_sizes),
                Knob("dtype", torch_dtypes(target), ordered=False, screen=True, weights=True),
            ),
        )

    @classmethod
    def recipes(cls, target: Target) -> list[tuple[str, dict]]:
        """Seed 000: transformers on all CPUs, batch 4 and 8; on a GPU host the threads a GPU
        process gets (`gpu_threads`), so the recipes are layouts of the space the steps can
        move from."""
        threads = gpu_threads(target.cpus, 1) if target.gpus else target.cpus
        return [
            (
                f"seed 000: transformers batch {batch}",
                {"threads_per_worker": threads, "batch_size": batch},
            )
            for batch in (4, 8)
        ]

    @classmethod
    def default_devices(cls, config, gpus: int):
        # What `model.to("cuda")` gives: the first GPU (a block only when asked for).
        return default_placement(min(gpus, 1), 1)

    @classmethod
    def predict_memory_bytes(cls, config, shape) -> float:
        data = torch_memory_bytes(config, shape, weight_copies=1, kv_copies=1)
        return data + cls.process_overhead_bytes

    @classmethod
    def speed_terms(cls, config, shape) -> SpeedTerms:
        return torch_speed_terms(config, shape, gpu_launch_s=0.0011)

    @classmethod
    def gpu_process_bytes(cls, config, shape) -> float:
        return torch_memory_bytes(config, shape, weight_copies=1, kv_copies=1)

    @classmethod
    def validate(cls, config, topology) -> None:
        if config.workers != 1:
            raise ConfigError(
                f"the hf backend is one process (workers must be 1, got {config.workers}); "
                "use the ddp backend for several"
            )
        super().validate(config, topology)

    def __init__(self, config, model, topology) -> None:
        super().__init__(config, model, topology)
        self.engine: TransformersEngine | None = None

    def load(self) -> None:
        self.engine = TransformersEngine(
            str(hf_dir(self.model)),
            dtype=self.config.dtype,
            threads=self.config.threads_per_worker,
            device=self.devices(self.config, self.topology)[0],
        )

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[Completion]:
        return generate_in_batches(self.engine, prompts, settings, self.config.batch_size, rank=0)

    def score(
        self, requests: Sequence[ScoreRequest], settings: GenerationSettings, k: int
    ) -> list[TokenScores]:
        """Teacher forcing: one forward per request (`TransformersEngine.score`)."""
        if self.engine is None:
            raise BackendError("hf backend: score() before load()")
        return self.engine.score_all(requests, settings, k)

    def close(self) -> None:
        self.engine = None


def generate_in_batches(
    engine: TransformersEngine,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    batch_size: int,
    rank: int,
) -> list[Completion]:
    """Sort by length, generate batch by batch, return completions in input order."""
    ids = [engine.prompt_ids(p.text, settings.chat_template) for p in prompts]
    results: list[Completion | None] = [None] * len(prompts)
    for members in length_sorted_batches([len(x) for x in ids], batch_size):
        began = time.monotonic()
        outputs = engine.generate_batch([ids[i] for i in members], settings)
        latency = time.monotonic() - began  # a batch finishes together: one latency for all
        ttft = None if engine.first_token_s is None else engine.first_token_s - began
        for index, (tokens, text) in zip(members, outputs, strict=True):
            results[index] = Completion(
                id=prompts[index].id,
                text=text,
                token_ids=tuple(tokens),
                prompt_tokens=len(ids[index]),
                worker_rank=rank,
                latency_s=latency,
                ttft_s=ttft,
                prefill_tokens=len(ids[index]),  # generate() computes every prompt token
                finished_at=began + latency,
            )
    return results  # type: ignore[return-value]
