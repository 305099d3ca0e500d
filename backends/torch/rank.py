"""The body of every rank that torchrun starts for the ``ddp`` and ``pipeline`` backends.

Two ways in, one code path:

- from autotune (``backends.torch.torchrun.RankGroup``): the spec comes in the JSON file named by
  ``AUTOTUNE_RANK_SPEC``; rank 0 connects back to the parent over a Unix socket and serves
  ``("generate", prompts, settings)`` requests until ``("close",)``;
- by hand, on one node or several (see the README's multi-node section)::

      torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
          -m backends.torch.rank --backend ddp --workload prompts.jsonl --output out.jsonl

  rank 0 reads the workload, every rank generates its part, rank 0 writes one JSONL line per
  prompt in input order.

Every rank runs the same loop: rank 0 sends the next request to the others on a control group
(rank 0 never waits on that send; the others wait without a practical timeout, since the parent
may idle between requests), then every rank does its part of the work, where each wait on
another rank is bounded by the collective timeout. A rank that
fails writes its traceback to ``<rundir>/rank<N>.error`` and exits 1; torchrun's agent then
stops the others.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import pickle
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client
from pathlib import Path

__all__ = [
    "RANK_WORKERS",
    "RankContext",
    "main",
    "peer_failure",
    "recv_object",
    "send_object",
    "shard",
]

# kind -> "module:class" of the object that does one rank's work.
RANK_WORKERS = {
    "ddp": "backends.torch.ddp:DDPRank",
    "pipeline": "backends.torch.pipeline_stage:PipelineStage",
}


@dataclass
class RankContext:
    """Where this rank stands in the group."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: str  # the torch device its inputs go on: cpu or its (first) GPU
    place: str  # its placement entry: cpu, cuda:2, or a block cuda:2+3
    nccl: bool  # the group talks over NCCL (every rank on GPUs of its own), else gloo
    timeout_s: float
    spec: dict
    control: object = None  # a gloo group without a practical timeout, for requests


def shard(count: int, rank: int, world: int) -> range:
    """This rank's contiguous share of ``count`` items: even split, remainder to the first ranks.

    Over all ranks the shares cover ``range(count)`` exactly once, in order.
    """
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def _device(devices: list[str], local_rank: int) -> tuple[str, str, bool]:
    """This rank's torch device and placement entry (``devices``, one per rank, from
    `Backend.devices`), and whether the group can talk over NCCL: only where every rank has
    GPUs of its own (NCCL refuses two ranks on one device; gloo moves tensors through host
    memory and works for shared GPUs and CPU ranks alike)."""
    from autotune.placement import parse_placement, shared_gpus

    placement = parse_placement(",".join(devices))
    mine = placement[local_rank]
    if mine.is_gpu:
        import torch

        torch.cuda.set_device(mine.gpus[0])
    nccl = all(d.is_gpu for d in placement) and not shared_gpus(placement)
    return mine.torch, str(mine), nccl


# ---------------------------------------------------------------- point to point, with names


def send_object(obj, dst: int) -> None:
    """Send a picklable object to rank ``dst`` (length, then bytes)."""
    import torch
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst)
    dist.send(data, dst)


def recv_object(src: int, ctx: RankContext):
    """Receive what `send_object` sent from ``src``; a timeout names the rank waited on."""
    import torch
    import torch.distributed as dist

    try:
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, src)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src)
    except RuntimeError as error:
        raise peer_failure(ctx, src, error) from None
    return pickle.loads(data.numpy().tobytes())


def peer_failure(ctx: RankContext, src: int, error: Exception) -> RuntimeError:
    """The error of a receive from ``src`` that failed: it names ``src`` as the one at fault
    (the parent's report looks for "hung or died")."""
    # gloo prefixes its messages with its source location; the rest is what happened.
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0] if str(error) else "")
    detail = detail[:160] or type(error).__name__
    return RuntimeError(
        f"rank {ctx.rank} got nothing from rank {src} within the collective timeout "
        f"({ctx.timeout_s:g} s): rank {src} hung or died ({detail})"
    )


# ---------------------------------------------------------------- the loop


def _post_request(message, ctx: RankContext, posted: list) -> list:
    """Rank 0: send ``message`` to every other rank without waiting for them.

    Sends on the control group never block rank 0: a rank that hangs is then found by the
    bounded receives of the work itself, not by a request that waits for ever. Returns the
    sends still in flight (their tensors must live until they complete).
    """
    import torch
    import torch.distributed as dist

    posted = [(work, data) for work, data in posted if not work.is_completed()]
    data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    for dst in range(1, ctx.world):
        posted.append((dist.isend(size, dst, group=ctx.control), size))
        posted.append((dist.isend(data, dst, group=ctx.control), data))
    return posted


def _take_request(ctx: RankContext):
    """Ranks > 0: wait (as long as the parent idles) for rank 0's next request."""
    import torch
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    dist.recv(size, 0, group=ctx.control)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, 0, group=ctx.control)
    return pickle.loads(data.numpy().tobytes())


def _die_with_parent() -> None:
    """If torchrun's agent dies, this rank gets SIGKILL instead of living on as an orphan."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker(kind: str, ctx: RankContext):
    module_name, class_name = RANK_WORKERS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)(ctx)


def run_rank(spec: dict, requests=None, on_result=None) -> None:
    """Join the group, build this rank's worker, and serve requests until told to close.

    ``requests`` (rank 0 only, by-hand mode) is an iterable of requests used instead of the
    parent's socket; each answer is passed to ``on_result``.
    """
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    rundir = Path(spec.get("rundir") or ".")
    conn = None
    try:
        pins = spec.get("pins")
        if pins:
            os.sched_setaffinity(0, pins[local_rank])
        torch.set_num_threads(spec["config"]["threads_per_worker"])
        started = time.monotonic()
        device, place, nccl = _device(spec["devices"], local_rank)
        timeout_s = float(spec["timeout_s"])
        backend = "cpu:gloo,cuda:nccl" if nccl else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        # Requests wait on the parent, who may idle for as long as it likes between them.
        control = dist.new_group(backend="gloo", timeout=timedelta(days=30))
        ctx = RankContext(
            rank, world, local_rank, local_world, device, place, nccl, timeout_s, spec, control
        )
        worker = _worker(spec["kind"], ctx)
        mine = {"pid": os.getpid(), "load_s": time.monotonic() - started}
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)  # bounded: a rank stuck loading ends the run
        if rank == 0 and spec.get("address"):
            conn = Client(spec["address"], family="AF_UNIX")
            conn.send(
                (
                    "ready",
                    {
                        "pids": [e["pid"] for e in everyone],
                        "load_times_s": [e["load_s"] for e in everyone],
                        "info": getattr(worker, "info", {}),
                    },
                )
            )
        source = iter(requests) if requests is not None else None
        posted: list = []
        while True:
            message: tuple  # ("generate", prompts, settings), ("score", ...) or ("close",)
            if rank == 0:
                if source is not None:
                    message = next(source, ("close",))
                else:
                    try:
                        message = conn.recv()
                    except (EOFError, OSError):
                        message = ("close",)  # the parent went away
                posted = _post_request(message, ctx, posted)
            else:
                message = _take_request(ctx)
            if message[0] == "close":
                for work, _ in posted:  # every rank must hear it before rank 0 leaves
                    work.wait(timedelta(seconds=timeout_s))
                break
            if message[0] == "score":  # teacher forcing (`Backend.score`)
                _, requests, settings, k = message
                result = worker.score(requests, settings, k)
            else:
                _, prompts, settings = message
                result = worker.generate(prompts, settings)
            if rank == 0:
                if conn is not None:
                    conn.send(("result", result))
                else:
                    on_result(result)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - any failure is reported, then the rank exits
        text = f"rank {rank} (pid {os.getpid()}):\n{traceback.format_exc()}"
        try:
            (rundir / f"{spec.get('error_prefix', '')}rank{rank}.error").write_text(text)
            if conn is not None:
                conn.send(("error", text))
        finally:
            sys.stderr.write(text)
            sys.stderr.flush()
            os._exit(1)  # no atexit teardown that could wait on the others


def _by_hand(argv: list[str]) -> None:
    """By-hand mode: one workload file in, one completions file out (written by rank 0)."""
    from autotune.config import add_config_arguments, config_from_args
    from autotune.errors import AutotuneError
    from autotune.models import ModelSpec, hf_dir
    from autotune.workload import load_workload

    parser = argparse.ArgumentParser(prog="torchrun ... -m backends.torch.rank")
    from backends import summaries

    add_config_arguments(parser, summaries())
    parser.add_argument("--workload", required=True, help="JSONL of prompts")
    parser.add_argument("--output", required=True, help="JSONL of completions (rank 0 writes)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        config = config_from_args(args)
        if config.backend not in RANK_WORKERS:
            raise AutotuneError(f"--backend must be one of {', '.join(RANK_WORKERS)}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if config.processes != world:
            flag = "--stages" if config.stages > 1 else "--workers"
            raise AutotuneError(
                f"{flag} {config.processes}, but torchrun started {world} ranks "
                "(--nnodes x --nproc-per-node); they must agree"
            )
        model = ModelSpec.resolve(config.model)
        workload = load_workload(args.workload) if rank == 0 else None
        from autotune.topology import detect
        from backends import backend_class
        from backends.torch.torchrun import RankGroupBackend

        cls = backend_class(config.backend)
        if not issubclass(cls, RankGroupBackend):
            raise AutotuneError(f"--backend {config.backend} does not run under torchrun")
        topology = detect()
        cls.validate(config, topology)
        spec = cls.rank_spec(config, str(hf_dir(model)), topology)
    except AutotuneError as error:
        print(f"autotune: error: {error}", file=sys.stderr)
        sys.exit(2)
    output = Path(args.output).absolute()
    # A failing rank's traceback goes beside the output (OUT.rank1.error), not into the cwd.
    spec = {**spec, "rundir": str(output.parent), "error_prefix": output.name + "."}

    def write(result) -> None:
        from autotune.files import write_jsonl

        completions = result[0] if isinstance(result, tuple) else result  # (completions, stats)
        write_jsonl(output, (completion.to_dict() for completion in completions))

    requests = [("generate", workload.prompts, config.generation)] if rank == 0 else None
    run_rank(spec, requests, on_result=write)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``-m backends.torch.rank``."""
    _die_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    spec_path = os.environ.get("AUTOTUNE_RANK_SPEC")
    if spec_path and not argv:
        run_rank(json.loads(Path(spec_path).read_text()))
    else:
        _by_hand(argv)


if __name__ == "__main__":
    main()
