"""The torch backends: ``hf`` (one process, transformers batching), ``ddp`` (data-parallel
ranks) and ``pipeline`` (decoder layers split over ranks), the last two under torch's launcher
(`torchrun`: the parent's side of a rank group; `rank`: every rank's program). The torch
helpers they share (dtypes, memory, speed terms, tokenizer) are in `hf`. Nothing here imports
torch at module level: each backend imports it inside the methods that run a model.
"""
