"""llama.cpp backend specifics: batching equals batch 1, workers, faults, quant, pinning."""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from autotune.config import TrialConfig
from autotune.errors import BackendError
from autotune.models import ModelSpec, weights_summary
from autotune.workload import DEFAULT_WORKLOAD, GenerationSettings, load_workload
from backends import create_backend
from backends.llamacpp.quant import gguf_variant

pytestmark = pytest.mark.llamacpp


def generate(model, topology, prompts, settings, **layout):
    config = TrialConfig(backend="llamacpp", **layout)
    with create_backend(config, model, topology) as backend:
        return backend.generate(prompts, settings)


def test_batched_decoding_equals_batch_1(tiny_gguf, topology):
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:12]
    settings = GenerationSettings(max_new_tokens=12)
    one = generate(tiny_gguf, topology, prompts, settings, threads_per_worker=2)
    batched = generate(tiny_gguf, topology, prompts, settings, threads_per_worker=2, batch_size=8)
    assert [c.token_ids for c in batched] == [c.token_ids for c in one]
    assert [c.text for c in batched] == [c.text for c in one]


def test_two_workers_share_the_queue(tiny_gguf, topology):
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:16]
    completions = generate(
        tiny_gguf, topology, prompts, GenerationSettings(max_new_tokens=4), workers=2
    )
    assert [c.id for c in completions] == [p.id for p in prompts]
    assert {c.worker_rank for c in completions} == {0, 1}
    assert all(c.ttft_s is not None and 0 <= c.ttft_s <= c.latency_s for c in completions)


@pytest.mark.parametrize(("workers", "first_step"), [(1, 16), (2, 8), (4, 4)])
def test_a_worker_takes_only_its_share_per_step(tiny_gguf, monkeypatch, workers, first_step):
    # With 16 free slots a worker could take every queued prompt at once and leave the other
    # workers idle; it takes at most ceil(free slots / workers) per decode step.
    import backends.llamacpp.engine as engine_module
    from backends.llamacpp.engine import EngineItem, LlamaEngine

    engine = LlamaEngine(
        str(tiny_gguf.path),
        threads=1,
        batch_size=16,
        ctx_per_sequence=256,
        n_batch=512,
        workers=workers,
    )
    queue = [EngineItem(index=i, text=f"prompt {i}") for i in range(32)]
    taken_before_decode = []
    real_decode = engine_module.llama_cpp.llama_decode

    def decode(ctx, batch):
        taken_before_decode.append(32 - len(queue))
        return real_decode(ctx, batch)

    monkeypatch.setattr(engine_module.llama_cpp, "llama_decode", decode)
    results = []
    engine.run(lambda block: queue.pop(0) if queue else None, results.append, max_new_tokens=2)
    engine.close()
    assert taken_before_decode[0] == first_step
    assert len(results) == 32


def test_a_killed_worker_ends_the_run_with_its_name(tiny_gguf, topology):
    prompts = load_workload(DEFAULT_WORKLOAD).prompts * 4
    config = TrialConfig(backend="llamacpp", workers=2)
    backend = create_backend(config, tiny_gguf, topology)
    backend.load()
    victim = backend.pids[1]
    timer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
    timer.start()
    try:
        with pytest.raises(
            BackendError, match=r"worker 1 \(pid \d+\) died \(killed by signal SIGKILL\)"
        ):
            backend.generate(prompts, GenerationSettings(max_new_tokens=64))
    finally:
        timer.cancel()
        backend.close()
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in backend.pids
    )


def test_prompt_too_long_for_the_context_fails_that_request_only(tiny_gguf, topology):
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:4]  # one of them is long
    completions = generate(
        tiny_gguf, topology, prompts, GenerationSettings(max_new_tokens=4), ctx_per_sequence=128
    )
    failed = [c for c in completions if c.error]
    assert failed and len(failed) < len(completions)
    assert "exceeds ctx_per_sequence 128" in failed[0].error


def test_quant_variant_is_built_once_and_loads(tiny_gguf, topology, tmp_path):
    path = gguf_variant(tiny_gguf, "q8_0", root=tmp_path)
    assert weights_summary(ModelSpec.resolve(str(path))).weight_type == "Q8_0"
    modified = path.stat().st_mtime_ns
    assert gguf_variant(tiny_gguf, "q8_0", root=tmp_path) == path
    assert path.stat().st_mtime_ns == modified
    assert gguf_variant(tiny_gguf, None, root=tmp_path) == tiny_gguf.path


def test_pinning_sets_each_workers_affinity(tiny_gguf, topology):
    if topology.usable_cpus < 2:
        pytest.skip("needs 2 usable CPUs to pin 2 workers apart")
    config = TrialConfig(backend="llamacpp", workers=2, pinning="spread")
    with create_backend(config, tiny_gguf, topology) as backend:
        affinities = [psutil.Process(pid).cpu_affinity() for pid in backend.pids]
    order = sorted(topology.affinity_cpus)
    assert affinities == [[order[0]], [order[1]]]


@pytest.mark.slow
def test_embedded_model_batch_16_repeats_itself_and_mostly_agrees_with_batch_1(topology):
    # Batching is allowed to change greedy answers a little (ggml picks kernels by shape):
    # measured on llama-cpp-python 0.3.36, 22 of these 24 prompts give batch 1's tokens at
    # batch 16. What must hold: the same layout gives the same tokens every time, and most
    # sequences agree.
    model = ModelSpec.resolve()
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:24]
    settings = GenerationSettings(max_new_tokens=32)
    one = generate(model, topology, prompts, settings, threads_per_worker=2)
    batched = generate(model, topology, prompts, settings, threads_per_worker=2, batch_size=16)
    again = generate(model, topology, prompts, settings, threads_per_worker=2, batch_size=16)
    assert [c.token_ids for c in batched] == [c.token_ids for c in again]
    same = sum(a.token_ids == b.token_ids for a, b in zip(one, batched, strict=True))
    assert same >= 18, f"only {same} of 24 sequences equal batch 1's"


def test_a_worker_that_fails_reports_why(topology, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 256)  # the magic bytes, then nothing sensible
    config = TrialConfig(backend="llamacpp")
    backend = create_backend(config, ModelSpec.resolve(str(broken)), topology)
    with pytest.raises(BackendError, match=r"worker 0 failed:[\s\S]*could not load"):
        backend.load()
    backend.close()


def test_sampled_output_does_not_depend_on_the_layout(tiny_gguf, topology):
    # each request has its own generator seeded by (seed, index): same tokens in any slot
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:6]
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=11)
    one = generate(tiny_gguf, topology, prompts, sampled)
    batched = generate(tiny_gguf, topology, prompts, sampled, workers=2, batch_size=3)
    greedy = generate(tiny_gguf, topology, prompts, GenerationSettings(max_new_tokens=8))
    assert [c.token_ids for c in batched] == [c.token_ids for c in one]
    assert [c.token_ids for c in one] != [c.token_ids for c in greedy]


def test_repeated_passes_compute_the_same_prefill_no_borrowed_cache(tiny_gguf, topology):
    # The slots keep their KV between passes; a prompt met again in its old slot must still
    # be computed (beyond the template's shared prefix), or later passes measure less work.
    from autotune.measure import Pacing, benchmark
    from autotune.workload import TINY_WORKLOAD

    config = TrialConfig(
        backend="llamacpp", batch_size=16, max_new_tokens=4, model=str(tiny_gguf.path)
    )
    workload = load_workload(TINY_WORKLOAD)
    result = benchmark(config, workload, tiny_gguf, topology, Pacing(repeats=3))
    prefill = [sample.prefill_tokens for sample in result.samples]
    assert len(set(prefill)) == 1, prefill
    prompt_tokens = sum(c.prompt_tokens for c in result.completions)
    shared = prompt_tokens - prefill[0]
    assert 0 <= shared <= len(result.completions) * 40, "at most the template's prefix is reused"
    assert result.prefill_tokens_per_s > 0 and result.ttft_p95_s >= result.ttft_p50_s


def test_a_cut_pass_stops_what_still_runs_and_the_next_pass_answers_all(tiny_gguf, topology):
    prompts = load_workload(DEFAULT_WORKLOAD).prompts[:24]
    settings = GenerationSettings(max_new_tokens=64, ignore_eos=True)
    config = TrialConfig(backend="llamacpp", workers=2, batch_size=4)
    with create_backend(config, tiny_gguf, topology) as backend:
        # Width 8: once 16 have finished, the queue is empty and the last window closed.
        cut = backend.generate_pass(prompts, settings, cut_after=16)
        again = backend.generate(prompts, settings)
    finished = [c for c in cut if not c.cut]
    stopped = [c for c in cut if c.cut]
    assert len(cut) == 24 and len(finished) >= 16 and stopped, [c.cut for c in cut]
    # What was stopped had started last and has fewer tokens than asked; it has no error.
    assert all(len(c.token_ids) < 64 and c.error is None for c in stopped)
    assert {c.id for c in stopped} <= {p.id for p in prompts[8:]}
    # The workers go on: the next pass answers every prompt, and what finished in the cut
    # pass answered token for token as it does (a slot's kept cache after a cut is right).
    assert not any(c.cut for c in again) and all(len(c.token_ids) == 64 for c in again)
    full = {c.id: c.token_ids for c in again}
    assert all(c.token_ids == full[c.id] for c in finished)
