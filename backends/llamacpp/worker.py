"""The body of one llama.cpp worker process (started with the spawn method).

Protocol, over the worker's own pipe to the parent:

- worker -> parent ``("ready", rank, pid, load_s)`` once the model is loaded;
- parent -> worker ``("generate", settings)``: the worker then takes ``(index, text)`` items
  from the shared task queue until it takes a ``None`` (one per worker ends a round), sends
  ``("result", rank, EngineResult)`` for each item as it finishes, then ``("done", rank)``;
  once the pool's cut event is set, it sends what it runs and what it takes then as results
  marked ``cut``, up to its marker;
- parent -> worker ``("score", requests, settings)``: teacher forcing of each
  (text, answer, ids, k) with `LlamaEngine.score`, answered by one ``("scores", rank, list)``;
- parent -> worker ``("close",)``: free the model and exit;
- worker -> parent ``("error", rank, traceback)`` if anything fails, then exit code 1.

Items come from one shared queue, so a fast worker takes more of them.
"""

from __future__ import annotations

import os
import queue
import time
import traceback


def worker_main(rank, model_path, engine_kwargs, cpu_set, visible_gpus, tasks, cut, conn) -> None:
    """Load the model once, then serve generate rounds until told to close. ``visible_gpus``:
    this worker's CUDA_VISIBLE_DEVICES (None: leave it as it is). ``cut``: the pool's event
    that stops a round's running sequences (`WorkerPool.cut`)."""
    try:
        if cpu_set is not None:
            os.sched_setaffinity(0, cpu_set)
        if visible_gpus is not None:  # before llama_cpp is imported and CUDA starts
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
        start = time.monotonic()
        from backends.llamacpp.engine import EngineItem, LlamaEngine

        engine = LlamaEngine(model_path, **engine_kwargs)
        conn.send(("ready", rank, os.getpid(), time.monotonic() - start))
        while True:
            message = conn.recv()
            if message[0] == "close":
                engine.close()
                return
            if message[0] == "score":
                _, requests, settings = message
                scored = [
                    engine.score(text, answer, ids, k=k, chat_template=settings["chat_template"])
                    for text, answer, ids, k in requests
                ]
                conn.send(("scores", rank, scored))
                continue
            round_over = False

            def take(block: bool):
                nonlocal round_over
                if round_over:
                    return None
                try:
                    task = tasks.get() if block else tasks.get_nowait()
                except queue.Empty:
                    return None
                if task is None:  # this worker's end-of-round marker
                    round_over = True
                    return None
                return EngineItem(index=task[0], text=task[1])

            def emit(result) -> None:
                conn.send(("result", rank, result))

            # run() returns only when a blocking take comes back empty, i.e. at the marker.
            engine.run(take, emit, cut=cut.is_set, **message[1])
            conn.send(("done", rank))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent went away: just exit
        return
    except BaseException:  # noqa: BLE001 - any failure goes to the parent as text
        try:
            conn.send(("error", rank, traceback.format_exc()))
        finally:
            os._exit(1)
