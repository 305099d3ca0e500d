"""Loading one pipeline stage's part of a model, and the per-layer time profile.

Each stage builds the model's skeleton on the meta device (no memory), then loads from the
safetensors files only the tensors it owns: stage 0 the embeddings, every stage its layers
(renumbered from 0, so its KV cache is a cache of its own layers), the last stage the final
norm and the LM head. The layers run through the model class's own ``forward`` (masks, rotary
positions, attention), which is what makes the split bit-for-bit the single-process model.

`measure_profile` times each layer, the embeddings and the head on the whole model; the
``compute`` partition balances the stages on it (`cached_profile` keeps it once measured).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any

from autotune.files import atomic_write

__all__ = ["cached_profile", "forward_stage", "load_stage", "measure_profile", "positions_of"]

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


def forward_stage(model, *, hidden=None, input_ids=None, mask, positions, cache, last: bool):
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


def positions_of(mask):
    """Position ids from the 2-D mask, as transformers' generate() makes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


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
    watched: list[tuple[Any, str, int | None]] = [
        (model.model.embed_tokens, "first", None),
        (model.lm_head, "last", None),
    ]
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
                logits = forward_stage(
                    model,
                    input_ids=token.to(device),
                    mask=mask.to(device),
                    positions=positions_of(mask)[:, -token.shape[1] :].to(device),
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

    from autotune.cache import cache_root

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


def cached_profile(model_dir: str, *, dtype: str, threads: int, device: str, batch_size: int):
    """`measure_profile`, measured once per model, dtype, threads, micro-batch size and
    machine, and kept under the autotune cache."""
    path = _profile_path(model_dir, dtype, threads, batch_size)
    if path.exists():
        return json.loads(path.read_text())
    profile = measure_profile(model_dir, dtype=dtype, device=device, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(profile))
    return profile
