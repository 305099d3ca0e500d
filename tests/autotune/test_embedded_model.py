"""The real embedded model loads in llama-cpp-python and in transformers and answers (slow)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from autotune.cache import cache_entry_problem
from autotune.models import ModelSpec, hf_dir

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Name three primary colors."}]


def names_colours(answer: str) -> bool:
    return "red" in answer.lower() and "blue" in answer.lower()


def test_llama_cpp_answers_a_prompt():
    # Through the engine every llama.cpp run uses, with this machine's extra-buffers verdict:
    # llama-cpp-python's high-level `Llama` cannot turn them off, and on a VM that advertises
    # AMX but traps it (by SIGSEGV on a 2-vCPU Xeon VM, 2026-12-02) it dies in its first decode.
    from backends.llamacpp.engine import LlamaEngine
    from backends.llamacpp.probe import resolve_extra_buffers

    engine = LlamaEngine(
        str(ModelSpec.resolve().path),
        threads=2,
        batch_size=1,
        ctx_per_sequence=512,
        n_batch=512,
        extra_buffers=resolve_extra_buffers(None),
    )
    try:
        result = engine.answer(QUESTION[0]["content"], max_new_tokens=24, chat_template=True)
    finally:
        engine.close()
    assert result is not None and result.error is None, result
    assert names_colours(result.text), result.text


def test_transformers_loads_the_same_gguf_through_the_cache(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ModelSpec.resolve()
    root = tmp_path_factory.mktemp("cache")
    directory = hf_dir(spec, root=root)  # the real dequantization, ~20 s here
    assert cache_entry_problem(directory, spec.sha256()) is None
    assert (directory / "model.safetensors").is_file()

    start = time.perf_counter()
    assert hf_dir(spec, root=root) == directory  # verified and reused, no second conversion
    assert time.perf_counter() - start < 10

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    inputs: Any = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert names_colours(answer), answer
