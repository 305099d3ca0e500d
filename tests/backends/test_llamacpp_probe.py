"""llama.cpp's extra buffer types (AMX, CPU repack): the probe, its cached verdict, the knob,
and a worker killed by SIGILL, on any CPU (the trap is injected: `backends.fake.die_by_sigill`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.config import TrialConfig
from autotune.errors import BackendError
from autotune.failures import FailureClass, classify, fix_for
from backends.llamacpp import probe as llamacpp_probe
from backends.llamacpp.probe import (
    ExtraBuffersVerdict,
    build_key,
    cached_verdict,
    extra_buffers_verdict,
    resolve_extra_buffers,
)

MACHINES = Path(__file__).parent.parent / "fixtures" / "machines"
DIES_BY_SIGILL = [sys.executable, "-c", "from backends.fake import die_by_sigill; die_by_sigill()"]


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of the test's own, so no verdict of this machine is read or written."""
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_probe_killed_by_sigill_turns_the_extra_buffers_off_and_is_cached(own_cache, monkeypatch):
    verdict = extra_buffers_verdict(command=DIES_BY_SIGILL)
    assert verdict.works is False
    assert verdict.offered == (False,), "a search tries them off only"
    assert verdict.describe().startswith("trap here (") and verdict.describe().endswith(", off")
    assert cached_verdict() == verdict, "cached for this CPU and build"

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached verdict is read, not probed again")

    monkeypatch.setattr(subprocess, "run", no_probe)
    assert resolve_extra_buffers(None) is False, "unset: off from then on"
    assert resolve_extra_buffers(True) is True, "a setting given is kept"


def test_a_probe_that_runs_makes_them_a_knob(own_cache):
    verdict = extra_buffers_verdict(command=[sys.executable, "-c", "pass"])
    assert verdict.works is True and verdict.offered == (True, False)
    assert resolve_extra_buffers(None) is True
    # --refresh-like: a new probe replaces the cached verdict.
    again = extra_buffers_verdict(refresh=True, command=DIES_BY_SIGILL)
    assert again.works is False and cached_verdict().works is False


# A probe child that dies by SIGSEGV with the extra buffers on and runs with them off, as the
# real one did on a 2-vCPU Xeon VM advertising amx_int8 (2026-12-02).
SEGFAULTS_WITH_THEM_ON = [
    sys.executable,
    "-c",
    "from backends.fake import die_with_extra_buffers; die_with_extra_buffers('SIGSEGV')",
]


def test_a_probe_killed_by_another_signal_is_run_again_with_them_off(own_cache):
    verdict = extra_buffers_verdict(command=SEGFAULTS_WITH_THEM_ON)
    assert verdict.works is False, verdict.detail
    assert "SIGSEGV with them on and ran with them off" in verdict.detail
    assert verdict.offered == (False,) and cached_verdict() == verdict
    assert resolve_extra_buffers(None) is False


def test_a_probe_that_dies_with_them_off_too_is_not_their_fault(own_cache):
    # SIGSEGV with them on, SIGABRT with them off.
    command = [
        sys.executable,
        "-c",
        "import os, signal, sys; "
        "sig = signal.SIGABRT if '--no-extra-buffers' in sys.argv else signal.SIGSEGV; "
        "signal.signal(sig, signal.SIG_DFL); os.kill(os.getpid(), sig)",
    ]
    verdict = extra_buffers_verdict(command=command)
    assert verdict.works is None, "a fault that stays with them off is not theirs"
    assert "exit -11" in verdict.detail and cached_verdict() is None


def test_a_probe_that_fails_otherwise_says_so_and_is_not_cached(own_cache):
    command = [sys.executable, "-c", "import sys; sys.exit('no such model')"]
    verdict = extra_buffers_verdict(command=command)
    assert verdict.works is None and verdict.offered == (None,)
    assert "exit 1: no such model" in verdict.detail
    assert cached_verdict() is None, "probed again next time"


def test_a_damaged_cache_is_probed_again(own_cache):
    own_cache.mkdir()
    (own_cache / "llama-extra-buffers.json").write_text("{not json")
    assert cached_verdict() is None
    assert extra_buffers_verdict(command=[sys.executable, "-c", "pass"]).works is True
    data = json.loads((own_cache / "llama-extra-buffers.json").read_text())
    assert data[build_key()]["works"] is True


def test_the_verdict_is_keyed_by_the_cpu():
    keys = {build_key(MACHINES / name) for name in ("epyc_16c32t", "desktop_8c16t")}
    assert len(keys) == 2, "another CPU's flags: another verdict"
    assert build_key() == build_key(), "stable on one machine"


def test_sigill_is_its_own_failure_class_with_a_fix():
    assert classify(-4, "") == FailureClass.ILLEGAL_INSTRUCTION
    message = "BackendError: llamacpp worker 0 (pid 7) died (killed by signal SIGILL: ...)"
    assert classify(1, message) == FailureClass.ILLEGAL_INSTRUCTION, (
        "a worker's SIGILL, told by its parent"
    )
    assert classify(-9, "") == "oom" and classify(1, "Traceback") == "crash"
    fix = fix_for(FailureClass.ILLEGAL_INSTRUCTION)
    assert "--no-extra-buffers" in fix and 'CMAKE_ARGS="-DGGML_NATIVE=OFF"' in fix
    assert fix_for("crash") is None


def test_the_knob_travels_in_the_env_contract_and_on_the_command_line():
    from autotune.cli import build_parser
    from autotune.config import config_from_args

    for value, text in ((True, "1"), (False, "0")):
        config = TrialConfig(extra_buffers=value)
        assert config.to_env()["LLAMA_EXTRA_BUFFERS"] == text
        assert TrialConfig.from_env(config.to_env()) == config
    assert "LLAMA_EXTRA_BUFFERS" not in TrialConfig().to_env(), "unset: the machine's verdict"
    parser = build_parser()
    for flags, expected in (
        ([], None),
        (["--extra-buffers"], True),
        (["--no-extra-buffers"], False),
    ):
        args = parser.parse_args(["bench", "--backend", "llamacpp", *flags])
        assert config_from_args(args).extra_buffers is expected
    with pytest.raises(Exception, match="LLAMA_EXTRA_BUFFERS"):
        TrialConfig.from_env({"LLAMA_EXTRA_BUFFERS": "maybe"})


def test_the_space_follows_the_verdict(topology):
    from autotune.knobs import Target
    from backends.llamacpp import LlamaCppBackend

    def space(offered):
        target = Target(topology, layers=30, extra_buffers=offered)
        knobs = {k.name: k for k in LlamaCppBackend.space(target).knobs}
        return target, knobs

    target, knobs = space((True, False))
    assert knobs["extra_buffers"].values == (True, False) and knobs["extra_buffers"].screen
    assert LlamaCppBackend.naive(target)["extra_buffers"] is True, "llama.cpp's own default"
    target, knobs = space((False,))
    assert "extra_buffers" not in knobs
    assert LlamaCppBackend.naive(target)["extra_buffers"] is False
    assert all(fields["extra_buffers"] is False for _, fields in LlamaCppBackend.recipes(target))
    assert LlamaCppBackend.config_changes({"workers": 2}, target)["extra_buffers"] is False
    target, knobs = space((None,))  # not probed (a simulated machine): as before
    assert "extra_buffers" not in knobs and LlamaCppBackend.naive(target)["extra_buffers"] is None


@pytest.mark.llamacpp
def test_a_worker_killed_by_sigill_names_the_class_and_the_fix(tiny_gguf, topology, monkeypatch):
    import backends.llamacpp as llamacpp
    import backends.llamacpp.pool as pool
    from backends.fake import die_by_sigill

    monkeypatch.setattr(pool, "worker_main", die_by_sigill)  # where the worker would run
    backend = llamacpp.LlamaCppBackend(
        TrialConfig(backend="llamacpp", extra_buffers=False), tiny_gguf, topology
    )
    with pytest.raises(BackendError) as caught:
        backend.load()
    backend.close()
    assert caught.value.failure_class == FailureClass.ILLEGAL_INSTRUCTION
    assert "killed by signal SIGILL: " in str(caught.value)
    assert "--no-extra-buffers" in str(caught.value) and "\n" not in str(caught.value)


def test_autotune_run_stops_at_sigill_with_the_fix_and_keeps_the_answered_lines(
    tiny_gguf, topology, tmp_path, monkeypatch
):
    import backends
    from autotune.run import CHUNK_MIN, run_job
    from autotune.workload import load_workload
    from backends.fake import FakeBackend

    class TrapsOnTheSecondChunk(FakeBackend):
        calls = 0

        def generate(self, prompts, settings):
            TrapsOnTheSecondChunk.calls += 1
            if TrapsOnTheSecondChunk.calls == 2:
                raise BackendError(
                    "worker 0 died (killed by signal SIGILL)", FailureClass.ILLEGAL_INSTRUCTION
                )
            return super().generate(prompts, settings)

    monkeypatch.setattr(backends, "create_backend", lambda c, m, t: TrapsOnTheSecondChunk(c, m, t))
    data = tmp_path / "in.jsonl"
    lines = (json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) for i in range(CHUNK_MIN * 3))
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    config = TrialConfig(backend="fake")
    with pytest.raises(BackendError) as caught:
        run_job(config, load_workload(data), out, model=tiny_gguf, topology=topology)
    assert TrapsOnTheSecondChunk.calls == 2, "no restart: it would trap again"
    assert caught.value.failure_class == FailureClass.ILLEGAL_INSTRUCTION
    assert f"{CHUNK_MIN} of {CHUNK_MIN * 3} lines answered" in str(caught.value)
    assert not out.exists(), "nothing under the final name"
    kept = (tmp_path / "out.jsonl.partial").read_text().splitlines()
    assert len(kept) == CHUNK_MIN, "the first chunk's answers are kept for the re-run"


@pytest.mark.llamacpp
def test_the_engine_hands_the_setting_to_llama_cpp(tiny_gguf, monkeypatch):
    import llama_cpp

    from backends.llamacpp.engine import LlamaEngine

    seen = []
    load = llama_cpp.llama_model_load_from_file

    def spy(path, params):
        seen.append(params.use_extra_bufts)
        return load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", spy)
    for value in (True, False):
        engine = LlamaEngine(
            str(tiny_gguf.path),
            threads=1,
            batch_size=1,
            ctx_per_sequence=128,
            n_batch=64,
            extra_buffers=value,
        )
        engine.close()
    assert seen == [True, False]


@pytest.mark.llamacpp
def test_the_real_probe_runs_here_and_its_verdict_is_kept(own_cache):
    verdict = extra_buffers_verdict()  # the embedded model, in a child process
    # Either verdict is this CPU's; a probe that could not run at all is a failure here.
    assert verdict.works is not None, verdict.detail
    if verdict.works is False:
        assert "SIGILL" in verdict.detail or "ran with them off" in verdict.detail
    assert cached_verdict() == verdict


@pytest.mark.slow
@pytest.mark.llamacpp
def test_on_this_cpu_the_embedded_model_decodes_a_long_prompt(own_cache, tmp_path, cli):
    """The real probe on the embedded model, then a bench whose prompts run past the point
    where a trapping CPU dies (a 400-token prefill): on an AMX VM that traps, the verdict
    turns the extra buffers off and the bench still answers every prompt."""
    verdict = extra_buffers_verdict(refresh=True)
    assert verdict.works is not None, verdict.detail
    amx = "amx_int8" in Path("/proc/cpuinfo").read_text()
    print(f"amx_int8 advertised: {amx}; verdict: {verdict.describe()}")
    long = "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 40
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"id": f"l{i}", "prompt": long}) + "\n" for i in range(2)))
    result = cli(
        "bench",
        "--backend",
        "llamacpp",
        "--threads",
        str(len(os.sched_getaffinity(0))),
        "--workload",
        str(data),
        "--prompts",
        "2",
        "--max-new-tokens",
        "4",
        "--json",
        env={"AUTOTUNE_CACHE": str(own_cache)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["details"]["extra_buffers"] is (verdict.works is not False)


def test_detect_shows_the_cached_verdict(own_cache, cli):
    verdict = ExtraBuffersVerdict(False, "a 400-token decode died by SIGILL", build_key())
    llamacpp_probe._store(verdict)
    result = cli("detect", env={"AUTOTUNE_CACHE": str(own_cache)})
    assert result.returncode == 0, result.stderr
    assert "llama.cpp extra buffers" in result.stdout and "trap here" in result.stdout
    result = cli("detect", "--json", env={"AUTOTUNE_CACHE": str(own_cache)})
    assert json.loads(result.stdout)["llama_extra_buffers"]["works"] is False
