"""A tiny random Llama as a GGUF file, for tests that need a model but not a good one.

It copies the embedded SmolLM2's tokenizer (so chat templates and detokenizing are real) and
gives it 2 layers of width 64 with seeded random weights: llama.cpp and transformers both load
it in well under a second, and greedy decoding of it is as deterministic as of a real model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
)


def build_tiny_llama(
    path: Path, source_gguf: Path, *, layers: int = 2, width: int = 64, seed: int = 0
) -> Path:
    """Write a tiny random Llama GGUF at ``path`` with the tokenizer of ``source_gguf``."""
    import gguf

    reader = gguf.GGUFReader(str(source_gguf), "r")
    writer = gguf.GGUFWriter(str(path), "llama")
    heads, kv_heads, ffn = 4, 2, 2 * width
    writer.add_name("tiny-random-llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(width // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    for key in TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is None:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 2.0 / np.sqrt(shape[-1])).astype(np.float32)

    head_dim = width // heads
    writer.add_tensor("token_embd.weight", weight(vocab, width))
    writer.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    for layer in range(layers):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", weight(width, width))
        writer.add_tensor(prefix + "attn_k.weight", weight(kv_heads * head_dim, width))
        writer.add_tensor(prefix + "attn_v.weight", weight(kv_heads * head_dim, width))
        writer.add_tensor(prefix + "attn_output.weight", weight(width, width))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(ffn, width))
        writer.add_tensor(prefix + "ffn_up.weight", weight(ffn, width))
        writer.add_tensor(prefix + "ffn_down.weight", weight(width, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
