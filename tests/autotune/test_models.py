"""ModelSpec resolution, weight summaries from headers, and the verified HF cache."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from autotune import cache
from autotune.cache import cache_entry_problem
from autotune.errors import ConfigError
from autotune.models import ModelSpec, hf_dir, weights_summary


def test_embedded_default_is_the_packaged_gguf():
    spec = ModelSpec.resolve()
    assert spec.embedded and spec.format == "gguf"
    assert spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.path.read_bytes()[:4] == b"GGUF"
    assert ModelSpec.resolve("default") == spec


def test_embedded_weights_summary_from_the_header():
    summary = weights_summary(ModelSpec.resolve())
    assert summary.weight_type == "Q4_1"
    assert summary.layers == 30
    # SmolLM2-135M: 134.5 M parameters, embeddings tied to the output head
    assert 130e6 < summary.parameters_total < 140e6
    assert summary.parameters_per_token == summary.parameters_total
    assert summary.bytes_per_token < summary.file_bytes


def test_resolve_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    assert ModelSpec.resolve(str(gguf)).format == "gguf"
    assert ModelSpec.resolve(str(tmp_path)).path == gguf  # a directory with one GGUF
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    spec = ModelSpec.resolve(str(hf))
    assert spec.format == "hf" and spec.path == hf


def test_resolve_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--model .*nowhere: no such file"):
        ModelSpec.resolve(str(tmp_path / "nowhere"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ConfigError, match=r"^MODEL_PATH .*notes.txt: not a GGUF"):
        ModelSpec.resolve(str(text), source="MODEL_PATH")
    with pytest.raises(ConfigError, match="never downloads"):
        ModelSpec.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hf_directory_summary_skips_untied_embeddings(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    save_file(
        {
            "model.embed_tokens.weight": np.zeros((100, 8), dtype=np.float32),
            "model.layers.0.mlp.up_proj.weight": np.zeros((16, 8), dtype=np.float32),
            "lm_head.weight": np.zeros((100, 8), dtype=np.float32),
        },
        str(tmp_path / "model.safetensors"),
    )
    summary = weights_summary(ModelSpec.resolve(str(tmp_path)))
    assert summary.parameters_total == 800 + 128 + 800
    assert summary.parameters_per_token == 128 + 800  # embedding rows are looked up, not read
    assert summary.bytes_per_token == (128 + 800) * 4
    assert summary.layers == 2 and summary.weight_type == "F32"


# ------------------------------------------------------------------ the HF cache


class FakeConverter:
    """Stands in for the transformers conversion: writes two files, counts its calls."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, gguf_path, out_dir):
        with self.lock:
            self.calls += 1
        (out_dir / "model.safetensors").write_bytes(b"weights" * 1000)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return ModelSpec.resolve(str(path))


def test_cache_builds_once_and_reuses(tmp_path, fake_gguf):
    convert = FakeConverter()
    first = hf_dir(fake_gguf, root=tmp_path / "cache", convert=convert)
    second = hf_dir(fake_gguf, root=tmp_path / "cache", convert=convert)
    assert first == second and convert.calls == 1
    assert cache_entry_problem(first, fake_gguf.sha256()) is None
    # keyed by content: the same bytes under another name share nothing, other bytes differ
    assert fake_gguf.sha256()[:16] in first.name


def test_cache_entry_with_damaged_bytes_is_rebuilt(tmp_path, fake_gguf):
    convert = FakeConverter()
    entry = hf_dir(fake_gguf, root=tmp_path, convert=convert)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(data))
    assert "checksum" in cache_entry_problem(entry, fake_gguf.sha256())
    hf_dir(fake_gguf, root=tmp_path, convert=convert)
    assert convert.calls == 2
    assert cache_entry_problem(entry, fake_gguf.sha256()) is None


def test_partial_cache_entry_is_rebuilt(tmp_path, fake_gguf):
    convert = FakeConverter()
    entry = hf_dir(fake_gguf, root=tmp_path, convert=convert)
    (entry / cache.MANIFEST).unlink()  # as if a build died before finishing
    assert "partial" in cache_entry_problem(entry, fake_gguf.sha256())
    hf_dir(fake_gguf, root=tmp_path, convert=convert)
    assert convert.calls == 2
    (entry / "config.json").write_text("{}")  # truncated file
    assert "wrong size" in cache_entry_problem(entry, fake_gguf.sha256())


def test_failed_build_leaves_no_entry(tmp_path, fake_gguf):
    def broken(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        hf_dir(fake_gguf, root=tmp_path, convert=broken)
    # neither an entry nor a half-written temporary directory is left (the lock file stays)
    assert [p for p in (tmp_path / "hf").iterdir() if p.is_dir()] == []


def test_concurrent_builders_convert_once(tmp_path, fake_gguf):
    convert = FakeConverter()
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(hf_dir(fake_gguf, root=tmp_path, convert=convert))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and convert.calls == 1


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("AUTOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "autotune"
