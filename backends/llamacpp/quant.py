"""GGUF weight-type variants of a model (F16, Q8_0, Q5_K_M, Q4_K_M, Q4_1, Q4_0), made once.

llama.cpp's own quantizer (``llama_model_quantize``) writes them, with ``allow_requantize`` so
that an already quantized source such as the embedded Q4_1 model is dequantized to f32 inside
llama.cpp and quantized again to the target type. Variants are cached beside the HF copies,
keyed by the source's content hash, verified by manifest like every cache entry.
"""

from __future__ import annotations

import os
from pathlib import Path

from autotune.cache import cache_root, cached_build
from autotune.errors import BackendError
from autotune.models import ModelSpec, weights_summary

__all__ = ["FTYPES", "QUANT_BITS", "QUANT_COST", "gguf_variant"]

# QUANTS names -> llama_ftype values (llama.h)
FTYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}
# Bits per weight of each type, for a variant's size before it exists.
QUANT_BITS = {"f16": 16.0, "q8_0": 8.5, "q5_k_m": 5.7, "q4_k_m": 4.9, "q4_1": 5.0, "q4_0": 4.5}
# The arithmetic of each type relative to q8_0's on a CPU (its dequantisation), for the speed
# model (`autotune.simulate`); a type not listed costs what q4_1 does.
QUANT_COST = {"f16": 1.6, "q8_0": 1.0, "q5_k_m": 1.35, "q4_k_m": 1.25, "q4_1": 1.1, "q4_0": 1.05}


def _quantize(source: Path, target: Path, ftype: int) -> None:
    import llama_cpp

    from backends.llamacpp.engine import silence_llama_logs

    silence_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise BackendError(f"llama.cpp could not quantize {source} (status {status})")


def gguf_variant(spec: ModelSpec, quant: str | None, *, root: Path | None = None) -> Path:
    """Path of the GGUF to load for ``quant``: the model's own file, or a cached variant."""
    if spec.format != "gguf":
        raise BackendError(f"{spec.path}: the llamacpp backend needs a GGUF model")
    if quant is None or weights_summary(spec).weight_type.lower() == quant:
        return spec.path
    source_sha = spec.sha256()
    entry = (root or cache_root()) / "gguf" / f"{spec.path.stem}-{source_sha[:16]}-{quant}"
    cached_build(
        entry,
        source_sha,
        lambda out_dir: _quantize(spec.path, out_dir / "model.gguf", FTYPES[quant]),
    )
    return entry / "model.gguf"
